"""Test helpers (plain functions, imported as `from helpers import ...`): synthetic MNIST-format
data, the tools' environment, real servers on free ports, throw-away pipeline repositories."""

from __future__ import annotations

import contextlib
import copy
import os
import pwd
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psycopg
import pytest
import torch
import yaml
from mlflow import MlflowClient
from mlflow.entities import ViewType
from PIL import Image, ImageDraw, ImageFont

from mnist_cnn.cli import run_stage
from mnist_cnn.config import Params, validate
from mnist_cnn.core import refusal
from mnist_cnn.core.model import Net
from mnist_cnn.files import atomic_path
from object_store import BUCKET, ObjectStore

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (synthetic MNIST data)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with atomic_path(path) as tmp:
        tmp.write_bytes(header + array.tobytes())


def render_digits(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Digits drawn with a font, randomly shifted and noised: learnable, MNIST-shaped."""
    rng = np.random.default_rng(seed)
    font = ImageFont.load_default(size=22)
    labels = rng.integers(0, 10, size=count).astype(np.uint8)
    images = np.zeros((count, 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        canvas = Image.new("L", (28, 28), 0)
        dx, dy = rng.integers(-3, 4, size=2)
        ImageDraw.Draw(canvas).text((8 + dx, 2 + dy), str(label), fill=255, font=font)
        noise = rng.integers(0, 40, size=(28, 28))
        images[i] = np.clip(np.asarray(canvas, dtype=np.int64) + noise * (rng.random((28, 28)) < 0.1), 0, 255)
    return images, labels


def untrained_with_refusal(count: int = 200) -> tuple[Net, np.ndarray, np.ndarray, dict[str, torch.Tensor]]:
    """An untrained report's network (seed 0), `count` rendered digits and the refusal statistics fitted on them."""
    torch.manual_seed(0)
    net = Net().eval()
    images, labels = render_digits(count, seed=0)
    budget = make_params().evaluate
    stats = refusal.fit(net, torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long(), 0, budget)
    return net, images, labels, stats


def write_synthetic_mnist(directory: Path, n_train: int = 1000, n_test: int = 300) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, count, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = render_digits(count, seed)
        write_idx(directory / f"{prefix}-images-idx3-ubyte", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels)
    return directory


def tool_env(**extra: str) -> dict[str, str]:
    """Environment for DVC/MLflow subprocesses: this venv first, no telemetry, no outside store."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_"))}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", DVC_NO_ANALYTICS="1", **extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def http_server(
    cmd: list[str], cwd: Path, ready_path: str, port: int, timeout: float = 120, **env: str
) -> Iterator[str]:
    """Start a real server (mlflow ui, mlflow models serve) on 127.0.0.1:port; yield its base URL
    once `ready_path` answers; stop it afterwards. Its output goes to a file, never a pipe that
    could fill up and block it."""
    log = cwd / f"server-{port}.log"
    with log.open("w") as sink:
        process = subprocess.Popen(cmd, cwd=cwd, env=tool_env(**env), stdout=sink, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert process.poll() is None, f"{cmd[0]} exited:\n{log.read_text()}"
            try:
                with urllib.request.urlopen(base + ready_path, timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"{' '.join(cmd)} did not answer {ready_path} within {timeout} s:\n{log.read_text()}")
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)


def stage_error(main: Callable[[], None], capsys: pytest.CaptureFixture[str]) -> str:
    """Run a stage's main() in this process as `python -m mnist_cnn.<stage>` does (config.run_stage;
    use the `in_process` fixture and monkeypatch.chdir): it must exit 2 with exactly one `error:`
    line on stderr, which is returned. (test_config proves the real process prints no traceback.)"""
    with pytest.raises(SystemExit) as exit_info:
        run_stage(main)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


def run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, cwd=cwd, env=tool_env(**env), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def store_client(repo: Path) -> MlflowClient:
    """A client of the sqlite store that the stages use in `repo` (store.local_store)."""
    return MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")


def all_runs(client: MlflowClient) -> list:
    """Every run of the experiment `mnist-cnn`, deleted ones too."""
    experiment = client.get_experiment_by_name("mnist-cnn")
    assert experiment is not None
    return client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL, max_results=1000)


def overridden(raw: dict | None = None, **overrides: object) -> dict:
    """The one way tests override params: a deep copy of raw (default: the repo's params.yaml, parsed
    but not validated) with each `section__key=value` (or top-level `key=value`) set."""
    params = copy.deepcopy(raw) if raw is not None else yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted, value in overrides.items():
        *sections, key = re.split(r"__|\.", dotted)
        node = params
        for section in sections:
            node = node[section]
        node[key] = value
    return params


def make_params(**overrides: object) -> Params:
    """The repo's params, validated, with `section__key=value` overrides (see `overridden`)."""
    return validate(overridden(**overrides))


def trained_one_epoch(images: torch.Tensor, labels: torch.Tensor) -> Net:
    """The train stage's model (params.yaml's, on the CPU in fp32) after one epoch on uint8 images
    (N, 1, 28, 28) and their labels, in eval mode."""
    from mnist_cnn.core.training import build, train_epoch  # imports MLflow: only the tests that train pay for it

    params = make_params(train__device="cpu", train__precision="fp32", train__cuda_graph=False)
    step = build(params, images, labels)
    train_epoch(step, len(images), params.train.batch_size)
    return step.net.eval()


def write_params(directory: Path, data_dir: Path, **overrides: object) -> None:
    """The repo's params.yaml made offline and fed from data_dir (synthetic data: no checksums),
    2 epochs, a short detector training, a few robustness points (every corruption and curve point is
    tested in-process, in test_corruptions.py); overrides as `section__key=value` or `key=value`."""
    offline = {"data__mirrors": [], "data__npm_package": "", "data__source_dir": str(data_dir)}
    robustness = {"robustness__angles": [0, 20], "robustness__shifts": [0, 4], "robustness__scales": [0.8, 1.0],
                  "robustness__corruptions": ["shot_noise", "rotate", "translate", "fog"]}  # fmt: skip
    small = {**robustness, "data__verify_sha256": False, "train__epochs": 2, "train__eval_batch_size": 500,
             "detector__steps": 20, "detector__negatives": 200}  # fmt: skip
    defaults = {**offline, **small}
    params = overridden(**{**defaults, **overrides})
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def copy_prepared(prepared: Path, work: Path, data_dir: Path, **overrides: object) -> Path:
    """A working directory with `prepared`'s data/ (after download and preprocess) and fresh params."""
    shutil.copytree(prepared / "data", work / "data")
    write_params(work, data_dir, **overrides)
    return work


def temp_files(root: Path) -> list[Path]:
    """The *.tmp files under root (files.atomic_path's), outside DVC's and MLflow's own directories."""
    return [p for p in root.rglob("*.tmp") if ".dvc" not in p.parts and "mlruns" not in p.parts]


def error_with_a_file_in_the_way(
    main: Callable[[], None], work: Path, in_the_way: str, capsys: pytest.CaptureFixture[str]
) -> str:
    """A regular file where a stage run in `work` (as its working directory) writes the directory
    `in_the_way`: the stage's one error line, which must name it; the file is left as it was, and
    no temp file anywhere. (Tests run as root, for whom a read-only directory stops nothing.)"""
    blocker = work / in_the_way
    if blocker.is_dir():
        shutil.rmtree(blocker)
    blocker.write_text("not a directory\n")
    with contextlib.chdir(work):
        line = stage_error(main, capsys)
    assert in_the_way in line, line
    assert blocker.read_text() == "not a directory\n"
    assert not temp_files(work)
    return line


@contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """A full disk as root meets it: a write() past `limit` bytes fails with EFBIG as it fails with
    ENOSPC (Python ignores SIGXFSZ); only the soft limit is lowered, so it can be raised back."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


class RunsACommand:
    """A pickle payload that would run a shell command when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (os.system, (f"touch {self.marker}",))


def make_pipeline_repo(path: Path, data_dir: Path, **overrides: object) -> Path:
    """A fresh git + DVC repository with this project's pipeline, fed from data_dir, offline."""
    path.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(REPO / name, path / name)
    shutil.copytree(REPO / "src", path / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    write_params(path, data_dir, **overrides)
    run(["git", "init", "-q", "-b", "main"], path)
    run(["git", "config", "user.email", "test@example.invalid"], path)
    run(["git", "config", "user.name", "test"], path)
    run(["dvc", "init", "-q"], path)
    run(["git", "add", "-A"], path)
    run(["git", "commit", "-qm", "pipeline"], path)
    return path


def postgres_bin() -> Path | None:
    """PostgreSQL's server binaries: on PATH, else Debian's /usr/lib/postgresql/<major>/bin (newest)."""
    if initdb := shutil.which("initdb"):
        return Path(initdb).resolve().parent
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


def as_unprivileged() -> tuple[list[str], str | None] | None:
    """(command prefix, user) to run PostgreSQL with, which refuses to run as root: root runs it as the
    `postgres` system user (Debian's package creates it) or else `nobody`. None: no way to drop root."""
    if os.geteuid() != 0:
        return [], None
    user = next((u for u in ("postgres", "nobody") if _user_exists(u)), None)
    if user and (runuser := shutil.which("runuser")):
        return [runuser, "-u", user, "--"], user
    if user and (setpriv := shutil.which("setpriv")):
        return [setpriv, f"--reuid={user}", f"--regid={pwd.getpwnam(user).pw_gid}", "--init-groups"], user
    return None


def _user_exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
        return True
    except KeyError:
        return False


@contextmanager
def postgres_cluster(bin_dir: Path, prefix: list[str], user: str | None) -> Iterator[str]:
    """A throwaway PostgreSQL cluster (initdb in a temp dir), listening on 127.0.0.1:<free port> only
    (password auth), with an empty `mlflow` database; yields its SQLAlchemy URI. Stopped and removed
    afterwards."""
    password = "throwaway"
    base = Path(tempfile.mkdtemp(prefix="pg-"))  # not under pytest's root-only temp dirs: the user must reach it
    if user:
        os.chown(base, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
    (base / "password").write_text(password)
    data, port = base / "data", free_port()

    def pg(tool: str, *args: str) -> None:
        result = subprocess.run(
            [*prefix, str(bin_dir / tool), *args], cwd=base, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, f"{tool} failed:\n{result.stdout}\n{result.stderr}"

    try:
        pg("initdb", "-D", str(data), "-U", "mlflow", f"--pwfile={base / 'password'}", "--auth=scram-sha-256")
        options = f"-h 127.0.0.1 -p {port} -k {base}"  # TCP on loopback only; the socket in the temp dir
        pg("pg_ctl", "start", "-D", str(data), "-o", options, "-l", str(base / "server.log"), "-w", "-t", "60")
        try:
            dsn = f"postgresql://mlflow:{password}@127.0.0.1:{port}/postgres"
            with psycopg.connect(dsn, autocommit=True) as connection:
                connection.execute("CREATE DATABASE mlflow")
            yield f"postgresql+psycopg://mlflow:{password}@127.0.0.1:{port}/mlflow"
        finally:
            pg("pg_ctl", "stop", "-D", str(data), "-m", "fast", "-w", "-t", "60")
    finally:
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class TeamServer:
    url: str  # the `mlflow server`
    root: Path  # its working directory; artifacts/ is its artifact destination unless `store` is given
    backend: str  # its --backend-store-uri
    why_not_postgres: str | None  # None when the backend is PostgreSQL
    artifacts: str = ""  # its --artifacts-destination
    store: ObjectStore | None = None  # the object store that holds the artifacts, if one does


@contextmanager
def team_server(root: Path, store: ObjectStore | None = None) -> Iterator[TeamServer]:
    """`mlflow server` as a team runs it, with a proxied artifact destination: on a PostgreSQL cluster
    of its own where the binaries exist (CI has them), else on a sqlite file, so that the server path
    is tested either way. The artifacts go to `store`'s bucket (s3://mnist-cnn/mlflow, with the store's
    key pair and endpoint in the server's environment, as docs/operations.md runs it) or else to root/artifacts."""
    bin_dir, unprivileged = postgres_bin(), as_unprivileged()
    why_not = "no PostgreSQL server binaries (initdb) on PATH or under /usr/lib/postgresql" if bin_dir is None else None
    if bin_dir and unprivileged is None:
        why_not = "running as root with no unprivileged user (postgres, nobody) and no runuser/setpriv"
    with ExitStack() as stack:
        if why_not is None:
            backend = stack.enter_context(postgres_cluster(bin_dir, *unprivileged))
        else:
            backend = f"sqlite:///{root / 'team.db'}"
        port = free_port()
        cmd = [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        artifacts, env = str(root / "artifacts"), {}
        if store is not None:
            artifacts, env = f"s3://{BUCKET}/mlflow", {**store.env(), "MLFLOW_S3_ENDPOINT_URL": store.endpoint}
        cmd += ["--backend-store-uri", backend, "--artifacts-destination", artifacts]
        # A new store's migrations take a while, longer on a busy machine.
        url = stack.enter_context(http_server(cmd, root, "/health", port, timeout=300, **env))
        yield TeamServer(url, root, backend, why_not, artifacts, store)
