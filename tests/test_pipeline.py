"""End to end: the real `dvc repro` and `dvc exp run` in a temporary git repo, offline.

Synthetic IDX files come in through the local-directory source; DVC, git and the
MLflow sqlite store are the real ones.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient

from helpers import run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(pipeline: Path) -> MlflowClient:
    mlflow.set_tracking_uri(f"sqlite:///{pipeline / 'mlruns' / 'mlflow.db'}")
    return MlflowClient()


def test_stage_outputs(pipeline: Path) -> None:
    assert sorted(p.name for p in (pipeline / "data/raw").iterdir()) == [
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
    ]
    stats = json.loads((pipeline / "data/processed/stats.json").read_text())
    assert (stats["train_count"], stats["test_count"]) == (1000, 300)
    history = (pipeline / "plots/train_history.csv").read_text().splitlines()
    assert history[0] == "epoch,train_loss,test_loss,test_accuracy,seconds"
    assert len(history) == 3  # header + 2 epochs
    evaluation = json.loads((pipeline / "metrics/eval.json").read_text())
    assert evaluation["test_accuracy"] > 0.5  # synthetic digits are easy; chance is 0.1
    assert set(evaluation) == {"test_accuracy", "test_loss", "macro_f1", "ood_accuracy", "ece", "test_refused"}
    assert len((pipeline / "plots/confusion.csv").read_text().splitlines()) == 301
    reports = {p.name for p in (pipeline / "reports").iterdir()}
    assert reports == {
        "classification_report.json",
        "confusion_matrix.png",
        "confusion_counts.csv",
        "confused_pairs.json",
        "misclassified.png",
        "training_curves.png",
    }
    # No temp files left behind by atomic writes.
    assert not list(pipeline.rglob("*.tmp"))


def test_dvc_sees_experiments_and_metrics(pipeline: Path) -> None:
    status = run(["dvc", "status", "--json"], pipeline).stdout
    assert json.loads(status) == {}, status
    shown = json.loads(run(["dvc", "exp", "show", "--json"], pipeline).stdout)
    baseline = next(rev for rev in shown if rev["rev"] == "workspace")  # dvc repro's results, not committed
    experiments = [exp for rev in shown for exp in (rev.get("experiments") or [])]
    revs = [baseline, *(exp["revs"][0] for exp in experiments)]
    params = [rev["data"]["params"]["params.yaml"]["data"] for rev in revs]
    assert [(p["augment"], p["seed"]) for p in params] == [(True, 42), (False, 7)]
    for exp in revs:
        metrics = exp["data"]["metrics"]
        assert "test_accuracy" in metrics["metrics/eval.json"]["data"]
    assert "Confusion matrix" in run(["dvc", "plots", "show", "--json"], pipeline).stdout


def test_one_mlflow_run_per_execution(pipeline: Path, client: MlflowClient) -> None:
    experiment = client.get_experiment_by_name("mnist-cnn")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2  # dvc repro and the --temp ablation run: none lost, none duplicated
    assert {r.data.params["augment"] for r in runs} == {"True", "False"}
    for r in runs:
        assert r.info.status == "FINISHED"
        assert r.data.tags["git.commit"]
        for key in ("train_loss", "test_loss", "test_accuracy"):
            assert [m.step for m in client.get_metric_history(r.info.run_id, key)] == [1, 2]
        assert "eval_accuracy" in r.data.metrics
        reports = {Path(a.path).name for a in client.list_artifacts(r.info.run_id, "reports")}
        assert "confusion_matrix.png" in reports
    exp_names = {r.data.tags.get("dvc.exp_name") for r in runs}
    assert len(exp_names - {None}) == 1  # the `dvc exp run` carries its experiment name


def test_registry_has_a_version_per_model_that_predicts(pipeline: Path, client: MlflowClient) -> None:
    versions = client.search_model_versions("name='mnist-cnn'")
    assert len(versions) == 2
    run_ids = {r.info.run_id for r in client.search_runs([client.get_experiment_by_name("mnist-cnn").experiment_id])}
    assert {v.run_id for v in versions} == run_ids
    aliases = client.get_registered_model("mnist-cnn").aliases
    assert str(aliases["challenger"]) == "2"  # always the newest
    assert str(aliases["champion"]) in {"1", "2"}
    frozen = gc.get_freeze_count()
    model = mlflow.pyfunc.load_model("models:/mnist-cnn@champion")
    # Loading took what was loaded out of the collector's reach (docs/serving.md: the p99 latency).
    assert gc.get_freeze_count() > frozen
    batch = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    out = pd.DataFrame(model.predict(batch))  # the served python model: one record per image, refusals included
    assert list(out.columns) == ["digit", "probability", "reason"] and len(out) == 3
    answered = out["digit"] >= 0
    assert out["digit"].between(-1, 9).all() and out["probability"][answered].between(0, 1).all()
    assert out["reason"][~answered].notna().all() and out["reason"][answered].isna().all()


def test_repro_again_does_nothing(pipeline: Path) -> None:
    out = run(["dvc", "repro"], pipeline).stdout
    assert "didn't change, skipping" in out or "up to date" in out


def test_experiments_run_the_code_of_their_snapshot(queued_pipeline: dict) -> None:
    """A queued experiment runs the code it was queued with, even if the workspace is edited
    before the queue starts (the stages put the copy's src/ first on PYTHONPATH; conftest's
    queued_pipeline queues two, edits train.py, then runs the queue)."""
    for logs in queued_pipeline["queue_logs"].values():
        assert "code: as committed" in logs
        assert "edited after queueing" not in logs


def test_an_identical_experiment_is_restored_from_the_run_cache(pipeline: Path, client: MlflowClient) -> None:
    """Same code, data and params as the earlier --temp run: DVC restores its outputs, nothing trains,
    and MLflow gets no new run (the restored models/mlflow_run.json names the original one)."""
    experiment_id = client.get_experiment_by_name("mnist-cnn").experiment_id
    before = {r.info.run_id for r in client.search_runs([experiment_id])}
    out = run(["dvc", "exp", "run", "--temp", "-S", "augment=false", "-S", "seed=7"], pipeline).stdout
    assert "Stage 'train' is cached - skipping run, checking out outputs" in out
    assert "epoch 1:" not in out
    assert {r.info.run_id for r in client.search_runs([experiment_id])} == before


def test_the_readme_preset_runs_the_whole_pipeline(queued_pipeline: dict) -> None:
    """The preset, with the README's options (queued by conftest's queued_pipeline, then applied to
    the workspace): every later stage loads the improved network from the architecture saved with
    its weights, and evaluates exactly what training measured."""
    repo = queued_pipeline["repo"]
    assert "-S" in queued_pipeline["preset_command"]
    assert "Running stage 'train'" in queued_pipeline["queue_logs"]["improved"]
    assert yaml.safe_load((repo / "params.yaml").read_text())["model"]["depth"] == 3  # exp apply
    checkpoint = torch.load(repo / "models/model.pt", weights_only=True)
    assert checkpoint["arch"] == {"batchnorm": True, "dropout": 0.1, "depth": 3}
    assert "block3.1.running_mean" in checkpoint["state_dict"]  # the third block, with its BatchNorm
    trained = (repo / "plots/train_history.csv").read_text().splitlines()[-1].split(",")  # the last epoch
    evaluated = json.loads((repo / "metrics/eval.json").read_text())
    assert evaluated["test_accuracy"] == pytest.approx(float(trained[3]), abs=1e-6)
    assert evaluated["test_loss"] == pytest.approx(float(trained[2]), rel=1e-5)
    assert (repo / "reports/confusion_matrix.png").stat().st_size > 0
    assert "improved" in run(["dvc", "exp", "list", "--all-commits", "--name-only"], repo).stdout.split()
