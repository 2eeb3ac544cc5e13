"""Lineage and tracking in MLflow 3 terms, against the session pipeline's real sqlite store: each run
names its training and test data with DVC's hash, carries system metrics and dvc.lock, and its logged
model keeps the test metrics; DVC's metrics stay flat. Plus the digest's fallback and the console script."""

from __future__ import annotations

import json
from importlib.metadata import entry_points
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from helpers import run
from mnist_cnn import lineage, predict


@pytest.fixture(scope="module")
def client(pipeline: Path) -> MlflowClient:
    mlflow.set_tracking_uri(f"sqlite:///{pipeline / 'mlruns' / 'mlflow.db'}")
    return MlflowClient()


def processed_md5(repo: Path) -> str:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    (out,) = [o for o in lock["stages"]["preprocess"]["outs"] if o["path"] == "data/processed"]
    return out["md5"]


@pytest.mark.slow
def test_runs_name_their_datasets_with_dvc_hash(pipeline: Path, client: MlflowClient) -> None:
    digest = processed_md5(pipeline)
    assert digest.endswith(".dir")  # DVC's hash of a directory
    experiment = client.get_experiment_by_name("mnist-cnn")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) >= 2
    for r in runs:
        inputs = {i.tags[0].value: i.dataset for i in r.inputs.dataset_inputs if i.tags}
        assert set(inputs) == {"training", "evaluation"}, r.inputs.dataset_inputs
        assert {d.digest for d in inputs.values()} == {digest}
        assert (inputs["training"].name, inputs["evaluation"].name) == ("mnist-train", "mnist-test")
        source = json.loads(inputs["evaluation"].source)
        assert source["path"] == "data/processed/test.pt"
        assert source["origins"][0].startswith("directory ")  # the tests' synthetic files
        assert json.loads(inputs["evaluation"].profile)["features_shape"] == [300, 1, 28, 28]
        artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert "dvc.lock" in artifacts


@pytest.mark.slow
def test_logged_model_keeps_the_test_metrics(pipeline: Path, client: MlflowClient) -> None:
    evaluation = json.loads((pipeline / "metrics/eval.json").read_text())
    digest = processed_md5(pipeline)
    experiment = client.get_experiment_by_name("mnist-cnn")
    accuracies = []
    for r in client.search_runs([experiment.experiment_id]):
        (output,) = r.outputs.model_outputs
        metrics = {m.key: m for m in client.get_logged_model(output.model_id).metrics}
        assert metrics["eval_accuracy"].value == r.data.metrics["eval_accuracy"]
        assert metrics["eval_macro_f1"].value == r.data.metrics["eval_macro_f1"]
        # Linked to the test set (MLflow 3's metric lineage); only the test metrics, no system metrics.
        assert (metrics["eval_accuracy"].dataset_name, metrics["eval_accuracy"].dataset_digest) == (
            "mnist-test",
            digest,
        )
        assert all(key.startswith("eval_") for key in metrics), sorted(metrics)
        accuracies.append(r.data.metrics["eval_accuracy"])
    assert evaluation["test_accuracy"] in accuracies  # the workspace's eval.json is one of the runs


@pytest.mark.slow
def test_system_metrics_are_logged(pipeline: Path, client: MlflowClient) -> None:
    experiment = client.get_experiment_by_name("mnist-cnn")
    for r in client.search_runs([experiment.experiment_id]):
        system = {k for k in r.data.metrics if k.startswith("system/")}
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, system


@pytest.mark.slow
def test_dvc_metrics_are_flat_and_defined_once(pipeline: Path) -> None:
    shown = json.loads(run(["dvc", "exp", "show", "--json"], pipeline).stdout)
    experiments = [exp["revs"][0] for rev in shown for exp in rev.get("experiments") or []]
    assert experiments
    revisions = [rev for rev in shown if rev.get("data")] + experiments
    for revision in revisions:
        # The commit before the first `dvc repro` has no metrics files: DVC reports an error for each.
        metrics = {path: m["data"] for path, m in revision["data"]["metrics"].items() if "data" in m}
        if not metrics:
            continue
        assert set(metrics["metrics/train.json"]) == {"train_loss", "train_seconds"}
        assert {"test_accuracy", "test_loss", "macro_f1"} <= set(metrics["metrics/eval.json"])
        for values in metrics.values():
            assert all(isinstance(v, int | float) for v in values.values()), values  # flat: no nested report
        keys = [key for values in metrics.values() for key in values]
        assert len(keys) == len(set(keys)), keys  # no metric in two files
    report = json.loads((pipeline / "reports/classification_report.json").read_text())
    assert {str(d) for d in range(10)} <= set(report) and "f1-score" in report["7"]


def test_digest_without_a_lock_hashes_the_files(tmp_path: Path) -> None:
    processed = tmp_path / "data/processed"
    processed.mkdir(parents=True)
    (processed / "train.pt").write_bytes(b"train")
    (processed / "test.pt").write_bytes(b"test")
    lock = tmp_path / "dvc.lock"
    first = lineage.data_digest(lock, processed)
    assert len(first) == 32
    (processed / "test.pt").write_bytes(b"test, changed")
    assert lineage.data_digest(lock, processed) != first
    lock.write_text(yaml.safe_dump({"stages": {"preprocess": {"outs": [{"path": str(processed), "md5": "abc.dir"}]}}}))
    assert lineage.data_digest(lock, processed) == "abc.dir"


def test_a_dataset_insert_lost_to_a_parallel_run_is_retried(
    in_process: None, mlflow_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs logging the same new dataset at once: the second insert fails on the unique key, as
    PostgreSQL words it (seen with two queued experiments on a fresh team server); log_input retries
    once and the run names the dataset. Any other error is not retried."""
    dataset = mlflow.data.from_numpy(np.zeros((2, 1, 28, 28), np.uint8), targets=np.zeros(2), name="mnist-test")
    real, calls = mlflow.log_input, []

    def lost_race_once(*args: object, **kwargs: object) -> None:
        calls.append(kwargs["context"])
        if len(calls) == 1:
            real(*args, **kwargs)  # the other run's row, written between the lookup and the insert
            raise MlflowException('duplicate key value violates unique constraint "dataset_pk"')
        real(*args, **kwargs)

    monkeypatch.setattr(mlflow, "log_input", lost_race_once)
    with mlflow.start_run(experiment_id=mlflow_store) as run:
        lineage.log_input(dataset, context="evaluation")
    assert calls == ["evaluation", "evaluation"]
    (logged,) = MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    assert logged.dataset.name == "mnist-test" and logged.tags[0].value == "evaluation"

    def server_down(*args: object, **kwargs: object) -> None:
        calls.append("down")
        raise MlflowException("API request failed: connection refused")

    monkeypatch.setattr(mlflow, "log_input", server_down)
    with pytest.raises(MlflowException, match="connection refused"):
        lineage.log_input(dataset, context="training")
    assert calls.count("down") == 1


def test_predict_console_script_runs_the_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """pyproject.toml declares it; an installed package's metadata must name the same function."""
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert 'mnist-cnn-predict = "mnist_cnn.predict:cli"' in text
    for script in entry_points(group="console_scripts", name="mnist-cnn-predict"):
        assert script.value == "mnist_cnn.predict:cli"
    monkeypatch.setattr("sys.argv", ["mnist-cnn-predict", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        predict.cli()
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out
