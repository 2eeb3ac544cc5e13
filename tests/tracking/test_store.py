"""Where runs go (DVC_ROOT, MLFLOW_TRACKING_URI), and one run per pipeline execution: how an execution is
told apart, which run a stage logs into, what a run is named and tagged, and a sweep's parent run."""

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
from mnist_cnn.config import Params, flat, validate
from mnist_cnn.paths import RUN_FILE
from mnist_cnn.tracking import provenance, store


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for name in ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "MLFLOW_TRACKING_URI", store.PARENT_RUN_ENV):
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
from mnist_cnn.tracking import provenance, store
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


@pytest.fixture
def params() -> Params:
    return validate(yaml.safe_load((REPO / "params.yaml").read_text()))


def test_the_train_run_has_every_param_its_names_and_the_later_stages_of_its_execution_reuse_it(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch, params: Params
) -> None:
    monkeypatch.setenv("DVC_EXP_NAME", "bushy-vase")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc123")
    with store.start_run(params) as run:
        run_id = run.info.run_id
        mlflow.log_metric("epoch/train_loss", 0.5, step=1)
    assert json.loads(RUN_FILE.read_text())["run_id"] == run_id
    logged = mlflow.get_run(run_id)
    assert logged.data.params["augment"] == "True"
    assert logged.data.params["train.lr"] == "0.001"
    assert logged.data.params["register.seed_std.ood"] == "0.026"  # nested sections, every leaf
    assert logged.data.params["evaluate.refused_training"] == "0.01"
    assert len(logged.data.params) == len(flat(params))
    tags = logged.data.tags
    assert (tags["dvc.exp_name"], tags["git.commit"], logged.info.run_name) == ("bushy-vase", "abc123", "bushy-vase")
    assert tags[store.EXECUTION_TAG] == provenance.execution_key()
    assert len(tags["code.digest"]) == 12 and tags["git.dirty"] in ("true", "false")
    assert "mlflow.parentRunId" not in tags and store.TRAIN_RUN_TAG not in tags

    # A later stage of the same execution (here: the same process) logs into the train stage's run.
    with store.execution_run(params) as again:
        assert again.info.run_id == run_id
        assert store.log_new({"ood_accuracy": 0.8, "robust_fog": 0.7}) == {"ood_accuracy": 0.8, "robust_fog": 0.7}
    with store.execution_run(params):
        assert store.log_new({"ood_accuracy": 0.9, "test_accuracy": 0.99}) == {"test_accuracy": 0.99}
    client = mlflow.MlflowClient()
    assert [m.value for m in client.get_metric_history(run_id, "ood_accuracy")] == [0.8]  # one value per run
    assert mlflow.get_run(run_id).info.status == "FINISHED"


def test_a_later_execution_with_train_cached_gets_its_own_run_linked_to_the_training_run(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch, params: Params
) -> None:
    monkeypatch.setenv("DVC_EXP_NAME", "first")
    with store.start_run(params) as run:
        mlflow.log_metric("robust_fog", 0.5)
    trained = run.info.run_id
    monkeypatch.setenv("DVC_EXP_NAME", "second")
    monkeypatch.setattr(store, "execution_key", lambda: "host:1:2.000")  # another `dvc exp run`
    changed = validate(flat_to_raw(params, **{"robustness.corruption_samples": 500}))
    with store.execution_run(changed) as later:
        store.log_new({"robust_fog": 0.6})
    with store.execution_run(changed) as same:  # the next stage of that execution
        assert same.info.run_id == later.info.run_id
    second = mlflow.get_run(later.info.run_id)
    assert later.info.run_id != trained and second.info.run_name == "second"
    assert second.data.tags[store.TRAIN_RUN_TAG] == trained
    assert second.data.tags[store.EXECUTION_TAG] == "host:1:2.000"
    assert second.data.params["robustness.corruption_samples"] == "500"
    assert len(second.data.params) == len(flat(params))
    assert second.data.metrics == {"robust_fog": 0.6}
    assert mlflow.get_run(trained).data.metrics == {"robust_fog": 0.5}  # the first run is left as it was


def flat_to_raw(params: Params, **changes: object) -> dict:
    raw = params.model_dump(mode="json")
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        raw[section][key] = value
    return raw


def test_every_run_is_a_child_of_the_sweeps_parent_run(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch, params: Params
) -> None:
    experiment_id = store.setup()
    client = mlflow.MlflowClient()
    parent = client.create_run(experiment_id, run_name="sweep").info.run_id
    monkeypatch.setenv(store.PARENT_RUN_ENV, parent)
    with store.start_run(params) as trained:
        pass
    monkeypatch.setattr(store, "execution_key", lambda: "host:7:8.000")
    with store.execution_run(params) as later:
        pass
    for run_id in (trained.info.run_id, later.info.run_id):
        assert client.get_run(run_id).data.tags["mlflow.parentRunId"] == parent
    children = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert {r.info.run_id for r in children} == {trained.info.run_id, later.info.run_id}

    monkeypatch.setenv(store.PARENT_RUN_ENV, "0123456789abcdef0123456789abcdef")
    with pytest.raises(UserError, match=store.PARENT_RUN_ENV), store.start_run(params):
        pass


def test_execution_run_without_train_is_a_user_error(in_tmp: Path, params: Params) -> None:
    with pytest.raises(UserError, match="train stage"), store.execution_run(params):
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
