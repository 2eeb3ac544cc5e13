"""A team tracking server on PostgreSQL: a throwaway PostgreSQL cluster (initdb in a temp dir, a
free port, 127.0.0.1 only), `mlflow server` on it, and the pipeline plus two queued experiments
run in parallel (`dvc queue start -j 2`) against that server."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from mlflow import MlflowClient

from helpers import VENV_BIN, free_port, http_server, make_pipeline_repo, run, tool_env

pytestmark = pytest.mark.slow

PASSWORD = "throwaway"


def postgres_bin() -> Path | None:
    """PostgreSQL's server binaries: on PATH, else Debian's /usr/lib/postgresql/<major>/bin (newest)."""
    if initdb := shutil.which("initdb"):
        return Path(initdb).resolve().parent
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


def as_unprivileged() -> tuple[list[str], str | None]:
    """(command prefix, user): PostgreSQL refuses to run as root, so root runs it as the
    `postgres` system user (Debian's package creates it) or else `nobody`."""
    if os.geteuid() != 0:
        return [], None
    user = next((u for u in ("postgres", "nobody") if _exists(u)), None)
    if user is None:
        pytest.skip("running as root, and no unprivileged user (postgres, nobody) to run PostgreSQL as")
    if runuser := shutil.which("runuser"):
        return [runuser, "-u", user, "--"], user
    if setpriv := shutil.which("setpriv"):
        return [setpriv, f"--reuid={user}", f"--regid={pwd.getpwnam(user).pw_gid}", "--init-groups"], user
    pytest.skip("running as root, and neither runuser nor setpriv to drop to an unprivileged user")


def _exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
        return True
    except KeyError:
        return False


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A PostgreSQL cluster of its own, listening on 127.0.0.1:<free port> only (password auth),
    with an empty `mlflow` database; yields its SQLAlchemy URI. Stopped and removed afterwards."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (initdb) on PATH or under /usr/lib/postgresql")
    prefix, user = as_unprivileged()
    base = Path(tempfile.mkdtemp(prefix="pg-"))  # not under pytest's root-only temp dirs: the user must reach it
    if user:
        os.chown(base, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
    (base / "password").write_text(PASSWORD)
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
            dsn = f"postgresql://mlflow:{PASSWORD}@127.0.0.1:{port}/postgres"
            with psycopg.connect(dsn, autocommit=True) as connection:
                connection.execute("CREATE DATABASE mlflow")
            yield f"postgresql+psycopg://mlflow:{PASSWORD}@127.0.0.1:{port}/mlflow"
        finally:
            pg("pg_ctl", "stop", "-D", str(data), "-m", "fast", "-w", "-t", "60")
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def server(postgres: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("postgres-server")
    port = free_port()
    cmd = [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    cmd += ["--backend-store-uri", postgres, "--artifacts-destination", str(root / "artifacts")]
    with http_server(cmd, root, "/health", port, timeout=180) as base:
        yield base, root


def wait_for_queue(repo: Path, timeout: float = 900) -> str:
    deadline = time.monotonic() + timeout
    while any(word in (status := run(["dvc", "queue", "status"], repo).stdout) for word in ("Queued", "Running")):
        assert time.monotonic() < deadline, f"the queue did not drain within {timeout} s:\n{status}"
        time.sleep(5)
    return status


def test_pipeline_and_parallel_experiments_on_postgres(
    server: tuple[str, Path], tmp_path: Path, synthetic_mnist: Path
) -> None:
    url, root = server
    repo = make_pipeline_repo(tmp_path / "repo", synthetic_mnist)
    run(["dvc", "repro"], repo, MLFLOW_TRACKING_URI=url)
    run(["dvc", "exp", "run", "--queue", "-n", "no-augment", "-S", "augment=false"], repo)
    run(["dvc", "exp", "run", "--queue", "-n", "seed-7", "-S", "seed=7"], repo)
    # Two workers at once, as two teammates would; one thread each on a 2-core machine.
    try:
        # Output to a file: the detached workers inherit it, and a pipe would stay open until they exit.
        with (tmp_path / "queue.log").open("w") as log:
            env = tool_env(MLFLOW_TRACKING_URI=url, OMP_NUM_THREADS="1")
            start = ["dvc", "queue", "start", "-j", "2"]
            subprocess.run(start, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=120, check=True)
        status = wait_for_queue(repo)
    finally:
        subprocess.run(["dvc", "queue", "stop", "--kill"], cwd=repo, env=tool_env(), capture_output=True, timeout=60)
    assert status.count("Success") == 2, status
    assert not (repo / "mlruns").exists()  # nothing went to a local store

    client = MlflowClient(tracking_uri=url)
    experiment = client.get_experiment_by_name("mnist-cnn")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    assert len(runs) == 3, [(r.info.run_id, r.info.status) for r in runs]
    assert sorted(r.data.tags.get("dvc.exp_name", "") for r in runs[1:]) == ["no-augment", "seed-7"]
    for r in runs:
        assert r.info.status == "FINISHED", r.info
        for key in ("train_loss", "test_loss", "test_accuracy"):
            assert [m.step for m in client.get_metric_history(r.info.run_id, key)] == [1, 2], (r.info.run_id, key)
        # Artifacts went through the server into its artifact destination.
        assert "confusion_matrix.png" in {Path(a.path).name for a in client.list_artifacts(r.info.run_id, "reports")}
    local = client.download_artifacts(runs[0].info.run_id, "reports/confusion_matrix.png", str(tmp_path))
    assert Path(local).read_bytes() == (repo / "reports/confusion_matrix.png").read_bytes()
    assert len(list((root / "artifacts").rglob("confusion_matrix.png"))) == 3
    assert len(list((root / "artifacts").rglob("MLmodel"))) == 3  # each run's logged model

    # The registry is the server's: one version per run; both aliases name versions of this model.
    versions = client.search_model_versions("name='mnist-cnn'")
    assert sorted(v.run_id for v in versions) == sorted(r.info.run_id for r in runs)
    aliases = client.get_registered_model("mnist-cnn").aliases
    assert {"champion", "challenger"} <= set(aliases)
    assert {str(aliases["champion"]), str(aliases["challenger"])} <= {v.version for v in versions}
