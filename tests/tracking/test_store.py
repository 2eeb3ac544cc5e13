"""Where runs go (DVC_ROOT, MLFLOW_TRACKING_URI) and the run shared by the stages."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from helpers import REPO, tool_env
from mnist_cnn.cli import UserError
from mnist_cnn.config import validate
from mnist_cnn.paths import RUN_FILE
from mnist_cnn.tracking import store


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for name in ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    yield tmp_path
    mlflow.end_run()


def test_store_follows_dvc_root(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert store.store_root() == in_tmp
    repo = in_tmp / "repo"
    repo.mkdir()
    monkeypatch.setenv("DVC_ROOT", str(repo))  # as in `dvc exp run --temp`, run from a copy
    uri, artifacts = store.local_store()
    assert uri == f"sqlite:///{repo}/mlruns/mlflow.db"
    assert artifacts == (repo / "mlruns" / "artifacts").as_uri()


def test_setup_creates_the_experiment_once(in_tmp: Path) -> None:
    first = store.setup()
    assert store.setup() == first
    experiment = mlflow.get_experiment(first)
    assert experiment.name == "mnist-cnn"
    assert experiment.artifact_location == (in_tmp / "mlruns" / "artifacts").as_uri()
    assert (in_tmp / "mlruns" / "mlflow.db").exists()


# Each process waits, after its imports, until both have arrived, then opens the new store.
OPEN_TOGETHER = """
import sys, time
from pathlib import Path
from mnist_cnn.tracking import store
Path(sys.argv[1]).touch()
while len(list(Path.cwd().glob("arrived-*"))) < 2:
    time.sleep(0.01)
print(store.setup())
"""


@pytest.mark.slow
def test_two_processes_opening_a_new_store_at_once_both_get_the_experiment(tmp_path: Path) -> None:
    """Queued experiments run in parallel in a fresh checkout: both stages open the new sqlite store, where
    MLflow creates the tables on first open; without a lock one of them failed on a table the other made."""
    env = tool_env()
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_TOGETHER, f"arrived-{i}"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [process.communicate(timeout=180) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    assert outputs[0][0].strip() == outputs[1][0].strip() != ""  # one experiment, the same id
    assert (tmp_path / "mlruns" / "mlflow.db").exists()


def test_tracking_uri_env_overrides(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = in_tmp / "elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}")
    store.setup()
    assert other.exists()
    assert not (in_tmp / "mlruns").exists()


def test_start_run_logs_params_and_tags_and_records_id(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVC_EXP_NAME", "bushy-vase")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc123")
    params = validate(yaml.safe_load((REPO / "params.yaml").read_text()))
    with store.start_run(params) as run:
        run_id = run.info.run_id
    assert json.loads(RUN_FILE.read_text())["run_id"] == run_id
    logged = mlflow.get_run(run_id)
    assert logged.data.params["augment"] == "True"
    assert logged.data.params["train.lr"] == "0.001"
    assert logged.data.tags["dvc.exp_name"] == "bushy-vase"
    assert logged.data.tags["git.commit"] == "abc123"
    assert logged.info.run_name == "bushy-vase"
    with store.reopen_run() as again:
        assert again.info.run_id == run_id
        mlflow.log_metric("later_stage", 1.0)
    assert mlflow.get_run(run_id).data.metrics["later_stage"] == 1.0
    assert mlflow.get_run(run_id).info.status == "FINISHED"


def test_reopen_without_train_is_a_user_error(in_tmp: Path) -> None:
    with pytest.raises(UserError, match="train stage"), store.reopen_run():
        pass


def test_unreachable_tracking_server_fails_fast_and_clearly(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(UserError, match=f"MLflow store http://127.0.0.1:{port}"):
        store.setup()
    assert time.monotonic() - started < 10


def test_runs_of_dead_processes_are_marked_failed(in_tmp: Path) -> None:
    """What kill -9 leaves behind (a RUNNING run whose process is gone) is cleaned up by the next train."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    experiment_id = store.setup()
    client = mlflow.MlflowClient()
    host = socket.gethostname()
    orphan = client.create_run(experiment_id, tags={"host": host, "pid": str(dead.pid)}).info.run_id
    alive = client.create_run(experiment_id, tags={"host": host, "pid": str(os.getpid())}).info.run_id
    elsewhere = client.create_run(experiment_id, tags={"host": "another-host", "pid": str(dead.pid)}).info.run_id
    assert store.mark_dead_runs_failed(experiment_id) == [orphan]
    assert client.get_run(orphan).info.status == "FAILED"
    assert client.get_run(alive).info.status == "RUNNING"  # a parallel run still going
    assert client.get_run(elsewhere).info.status == "RUNNING"  # cannot tell from here
