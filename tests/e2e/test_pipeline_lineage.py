"""Lineage and tracking in MLflow 3 terms, against the session pipeline's real sqlite store: each run
names its training and test data with DVC's hash, carries system metrics and dvc.lock, and its logged
model keeps the test metrics; DVC's metrics stay flat."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from helpers import run
from mnist_cnn.registry import publish


@pytest.fixture(scope="module")
def client(pipeline: Path) -> MlflowClient:
    mlflow.set_tracking_uri(f"sqlite:///{pipeline / 'mlruns' / 'mlflow.db'}")
    return MlflowClient()


def processed_md5(repo: Path) -> str:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    (out,) = [o for o in lock["stages"]["preprocess"]["outs"] if o["path"] == "data/processed"]
    return out["md5"]


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
        # The source reads back through MLflow (the package's mlflow.dataset_source entry point).
        assert mlflow.data.get_source(inputs["training"]).path == "data/processed/train.pt"
        assert json.loads(inputs["evaluation"].profile)["features_shape"] == [300, 1, 28, 28]
        artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert "dvc.lock" in artifacts


def test_logged_model_keeps_the_test_metrics(pipeline: Path, client: MlflowClient) -> None:
    evaluation = json.loads((pipeline / "metrics/eval.json").read_text())
    digest = processed_md5(pipeline)
    experiment = client.get_experiment_by_name("mnist-cnn")
    accuracies = []
    for r in client.search_runs([experiment.experiment_id]):
        (version,) = client.search_model_versions(f"name='mnist-cnn' and run_id='{r.info.run_id}'")
        metrics = {m.key: m for m in client.get_logged_model(publish.logged_model_id(version)).metrics}
        assert metrics["test_accuracy"].value == r.data.metrics["test_accuracy"]
        # Linked to the test set (MLflow 3's metric lineage); only the test accuracy, no system metrics.
        assert (metrics["test_accuracy"].dataset_name, metrics["test_accuracy"].dataset_digest) == (
            "mnist-test",
            digest,
        )
        assert set(metrics) == {"test_accuracy"}, sorted(metrics)
        accuracies.append(r.data.metrics["test_accuracy"])
    assert evaluation["test_accuracy"] in accuracies  # the workspace's eval.json is one of the runs


def test_system_metrics_are_logged(pipeline: Path, client: MlflowClient) -> None:
    experiment = client.get_experiment_by_name("mnist-cnn")
    for r in client.search_runs([experiment.experiment_id]):
        system = {k for k in r.data.metrics if k.startswith("system/")}
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, system


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
