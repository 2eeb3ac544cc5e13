"""End to end: the real `dvc repro` and `dvc exp run` in a temporary git repo, offline.

Synthetic IDX files come in through the local-directory source; DVC, git and the
MLflow sqlite store are the real ones.
"""

from __future__ import annotations

import gc
import json
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient

from helpers import run, tool_env
from mnist_cnn.tracking import store

# Every model metric of a pipeline run in these repositories (4 MNIST-C corruptions: tests/helpers.write_params).
CORRUPTIONS = ("shot_noise", "rotate", "translate", "fog")
RUN_METRICS = {
    *(f"epoch/{k}" for k in ("train_loss", "test_loss", "test_accuracy", "lr")),
    "train_seconds",
    *("test_accuracy", "ood_accuracy", "ece", "test_refused", "ood_refused"),
    *(f"refused_{kind}" for kind in ("noise", "blank", "shapes", "letters", "symbols")),
    "robust_mean_accuracy",
    *(f"robust_{c}" for c in CORRUPTIONS),
    "robust_rotation_20",
    "robust_shift_4",
}


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
    refused = {f"refused_{kind}" for kind in ("noise", "blank", "shapes", "letters", "symbols")}
    assert set(evaluation) == {"test_accuracy", "test_loss", "macro_f1", "ood_accuracy", "ece", "test_refused",
                               "ood_refused", *refused}  # fmt: skip
    assert all(0 <= evaluation[k] <= 1 for k in ("test_refused", "ood_refused", *refused))
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
        for key in ("epoch/train_loss", "epoch/test_loss", "epoch/test_accuracy", "epoch/lr"):
            assert [m.step for m in client.get_metric_history(r.info.run_id, key)] == [1, 2]
        # The metrics a user compares, each once; the curves are artifacts, not a metric per point.
        assert set(r.data.metrics) - {k for k in r.data.metrics if k.startswith("system/")} == RUN_METRICS
        for key in RUN_METRICS - {k for k in RUN_METRICS if k.startswith("epoch/")}:
            assert len(client.get_metric_history(r.info.run_id, key)) == 1, key
        plots = {Path(a.path).name for a in client.list_artifacts(r.info.run_id, "plots")}
        assert {f"robustness_{c}.csv" for c in ("rotation", "shift", "scale")} <= plots
        reports = {Path(a.path).name for a in client.list_artifacts(r.info.run_id, "reports")}
        assert "confusion_matrix.png" in reports
    exp_names = {r.data.tags.get("dvc.exp_name") for r in runs}
    assert len(exp_names - {None}) == 1  # the `dvc exp run` carries its experiment name
    for r in runs:  # named for what it is: the experiment, or the commit `dvc repro` ran
        assert r.info.run_name == r.data.tags.get("dvc.exp_name", r.data.tags["git.commit"][:7])


def test_registry_has_a_version_per_model_that_predicts(pipeline: Path, client: MlflowClient) -> None:
    versions = client.search_model_versions("name='mnist-cnn'")
    assert len(versions) == 2
    run_ids = {r.info.run_id for r in client.search_runs([client.get_experiment_by_name("mnist-cnn").experiment_id])}
    assert {v.run_id for v in versions} == run_ids
    aliases = client.get_registered_model("mnist-cnn").aliases
    assert str(aliases["challenger"]) == "2"  # always the newest
    assert str(aliases["champion"]) in {"1", "2"}
    registered = json.loads((pipeline / "models/registered.json").read_text())  # the workspace's: dvc repro's
    assert registered["model"] == "models:/mnist-cnn/1" and registered["new_version"]
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


def test_an_edit_reruns_the_stages_that_import_it_and_no_others(rerun: dict) -> None:
    """dvc.yaml's code and params deps in a real DVC repository: `dvc status` after a one-line edit of a
    module, or one param set: the gate's margins are register's alone, the refusal's budget evaluate's."""
    changed = {module: set(status) for module, status in rerun["status_after_edit"].items()}
    assert changed["core/augment.py"] == {"detector", "train", "evaluate", "register"}  # robustness does not import it
    assert changed["core/refusal.py"] == {"evaluate", "register"}
    assert changed["registry/gate.py"] == {"register"}
    assert changed["tools/loadtest.py"] == set()  # a tool is no stage's dependency
    params = {param: set(status) for param, status in rerun["status_after_param"].items()}
    assert params == {
        "register.seed_std.ood": {"register"},
        "register.margin_z": {"register"},
        "evaluate.refused_training": {"evaluate"},  # register follows when models/refusal.pt changes
    }


def test_a_refusal_code_change_is_a_new_run_that_says_so_and_the_champion_serves_it(rerun: dict) -> None:
    """The refusal's code edited, not committed, and `dvc repro`: train is cached, so the stages after it
    record into a new run, linked to the training run, saying the code differs from its commit; the old
    run's metrics are untouched."""
    log = rerun["rerun_log"]
    for stage in ("evaluate", "register"):
        assert f"Running stage '{stage}'" in log, log
    for stage in ("corrupt", "train", "robustness"):
        assert f"Stage '{stage}' didn't change, skipping" in log, log
    first, again = rerun["registered_first"], rerun["registered"]
    assert first["model"] == "models:/mnist-cnn/1" and again["model"] == "models:/mnist-cnn/2"
    assert again["new_version"] and again["run_id"] != first["run_id"]
    trained, later = rerun["first_run"], rerun["code_run"]
    assert trained.info.run_name == trained.data.tags["git.commit"][:7] and trained.data.tags["git.dirty"] == "false"
    assert later.data.tags[store.TRAIN_RUN_TAG] == first["run_id"]
    assert later.data.tags["git.dirty"] == "true" and later.data.tags["git.commit"] == rerun["head"]
    assert later.data.tags["code.digest"] != trained.data.tags["code.digest"]
    assert later.info.run_name == f"{rerun['head'][:7]}-dirty"
    # Every param, the same values (world_size is the train stage's own param).
    assert later.data.params == {k: v for k, v in trained.data.params.items() if k != "world_size"}
    # The old run is as it was; the new one has this execution's evaluation, each metric once, no epochs.
    assert rerun["first_run_metrics_after"] == rerun["first_run_metrics"]
    assert set(rerun["code_run_metrics"]) == {k for k in RUN_METRICS if not k.startswith("epoch/")} - {"train_seconds"}
    assert all(len(values) == 1 for values in rerun["code_run_metrics"].values())
    assert again["artifacts_digest"] != first["artifacts_digest"]  # other refusal statistics
    # The champion is the model's new version, and serves exactly the workspace's refusal statistics.
    assert rerun["champion_after_rerun"] == "2"
    assert rerun["superseded_gate_tag"] == f"superseded by version 2 of the same trained model (run {first['run_id']})"
    served, workspace = rerun["champion_refusal"], rerun["workspace_refusal"]
    assert set(served) == set(workspace)
    assert all(torch.equal(served[key], workspace[key]) for key in workspace)


def test_two_experiments_of_one_model_each_have_their_own_run(rerun: dict) -> None:
    """`dvc exp run -n first ...`, then `-n second` with only robustness.corruption_samples changed (train
    cached): each experiment's run states the params of its metrics, and the registry agrees with DVC."""
    runs, metrics, versions = rerun["runs"], rerun["metrics"], rerun["versions"]
    first, second = runs["first"], runs["second"]
    assert "Stage 'train' didn't change, skipping" in rerun["second_log"], rerun["second_log"]
    assert "Running stage 'robustness'" in rerun["second_log"]
    assert first.data.params["robustness.corruption_samples"] == "300"
    assert second.data.params["robustness.corruption_samples"] == "150"
    assert second.data.tags[store.TRAIN_RUN_TAG] == first.info.run_id
    assert (first.data.tags["dvc.exp_name"], second.data.tags["dvc.exp_name"]) == ("first", "second")
    for name in ("first", "second"):  # the robustness metrics of each are the ones its own samples gave
        dvc = store.run_metrics(rerun[f"{name}_robustness"])
        assert {k: metrics[name][k] for k in dvc} == {k: [pytest.approx(v, abs=1e-6)] for k, v in dvc.items()}
    for name, values in metrics.items():  # every metric once (the per-epoch history aside), in every run
        assert all(len(v) == 1 for k, v in values.items() if not k.startswith("epoch/")), (name, values)
        assert len(values) <= len(RUN_METRICS), (name, sorted(values))
    # The version each experiment registered is its own run's, tagged with its name; so is every version.
    by_id = {r.info.run_id: r for r in runs.values()}
    for name in ("first", "second", "margins"):
        version = versions[rerun[f"{name}_registered"]["model"].rsplit("/", 1)[1]]
        assert version.run_id == runs[name].info.run_id and version.tags["dvc.exp_name"] == name
    for version in versions.values():
        run_ = by_id[version.run_id]
        assert version.tags.get("dvc.exp_name") == run_.data.tags.get("dvc.exp_name"), version
        assert len(version.tags) <= 9, version.tags
        assert version.tags["test_accuracy"] == repr(run_.data.metrics["test_accuracy"])
    # The smoke experiments (data.subset) are never challenger: it stays on the last full model.
    assert rerun["aliases"] == {"champion": "2", "challenger": "2"}


def test_gate_margins_and_the_refusal_budget_are_params_of_an_experiment(rerun: dict) -> None:
    log = rerun["margins_log"]
    for stage in ("evaluate", "register"):
        assert f"Running stage '{stage}'" in log, log
    for stage in ("train", "corrupt", "robustness"):
        assert f"Stage '{stage}' didn't change, skipping" in log, log
    margins = rerun["runs"]["margins"]
    assert margins.data.params["register.margin_z"] in ("3", "3.0")
    assert margins.data.params["evaluate.refused_training"] == "0.02"
    shown = [exp for rev in rerun["exp_show"] for exp in rev.get("experiments") or []]
    (row,) = [exp["revs"][0] for exp in shown if "margins" in (exp.get("name"), exp["revs"][0].get("name"))]
    params = row["data"]["params"]["params.yaml"]["data"]
    assert params["register"]["margin_z"] == 3 and params["evaluate"]["refused_training"] == 0.02
    bad = rerun["bad_margin"]
    assert bad.returncode != 0
    assert "error: params.yaml: 'register.margin_z': Input should be greater than or equal to 0" in (
        bad.stdout + bad.stderr
    )


def test_repro_again_does_nothing(pipeline: Path) -> None:
    out = run(["dvc", "repro"], pipeline).stdout
    assert "didn't change, skipping" in out or "up to date" in out


def test_an_identical_experiment_is_restored_from_the_run_cache(pipeline: Path, client: MlflowClient) -> None:
    """Same code, data and params as the earlier --temp run: DVC restores its outputs, nothing trains,
    and MLflow gets no new run (the restored models/mlflow_run.json names the original one)."""
    experiment_id = client.get_experiment_by_name("mnist-cnn").experiment_id
    before = {r.info.run_id for r in client.search_runs([experiment_id])}
    out = run(["dvc", "exp", "run", "--temp", "-S", "augment=false", "-S", "seed=7"], pipeline).stdout
    assert "Stage 'train' is cached - skipping run, checking out outputs" in out
    assert "epoch 1:" not in out
    assert {r.info.run_id for r in client.search_runs([experiment_id])} == before


def test_the_stage_runs_in_the_pipeline_and_reaches_mlflow_and_dvc(pipeline: Path) -> None:
    metrics = json.loads((pipeline / "metrics" / "robustness.json").read_text())
    names = yaml.safe_load((pipeline / "params.yaml").read_text())["robustness"]["corruptions"]
    assert {f"robust_{n}" for n in names} <= set(metrics)
    mean = sum(metrics[f"robust_{n}"] for n in names) / len(names)
    assert metrics["robust_mean_accuracy"] == pytest.approx(mean, abs=1e-5)
    assert metrics["robust_degradation"] == pytest.approx(metrics["robust_clean"] - mean, abs=1e-5)
    for curve in ("rotation", "shift", "scale"):
        assert (pipeline / "plots" / f"robustness_{curve}.csv").read_text().count("\n") > 2
    assert (pipeline / "robustness" / "examples.png").stat().st_size > 0

    # Every pipeline run (repro and the --temp augment=false one) logged its robust_ metrics, the curves'
    # headline points among them, and no other curve point.
    mlflow.set_tracking_uri(f"sqlite:///{pipeline / 'mlruns' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["mnist-cnn"], output_format="list")
    assert len(runs) >= 2 and all("robust_mean_accuracy" in r.data.metrics for r in runs)
    for r in runs:
        robust = {k for k in r.data.metrics if k.startswith("robust_")}
        assert robust == {"robust_mean_accuracy", "robust_rotation_20", "robust_shift_4"} | {
            f"robust_{n}" for n in names
        }

    shown = json.loads(run(["dvc", "exp", "show", "--json"], pipeline).stdout)
    found = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "data" in node.get("metrics/robustness.json", {}):  # not in the commit before the first repro
                found.append(node["metrics/robustness.json"]["data"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(shown)
    assert len(found) >= 2 and all("robust_mean_accuracy" in d for d in found)


def test_a_stage_stopped_by_a_bad_param_leaves_its_outputs_restorable(pipeline: Path) -> None:
    """DVC deletes train's outputs before its command stops on `train.epochs: -1`; every one of them is
    cached, so `dvc checkout` brings the committed ones back, byte for byte. The repository is left as
    it was found."""
    outputs = ["metrics/train.json", "plots/train_history.csv", "models/model.pt", "models/mlflow_run.json"]
    before = {name: (pipeline / name).read_bytes() for name in outputs}
    params_file = pipeline / "params.yaml"
    committed = params_file.read_text()
    params = yaml.safe_load(committed)
    params["train"]["epochs"] = -1
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        stopped = subprocess.run(["dvc", "repro", "train"], cwd=pipeline, env=tool_env(), capture_output=True,
                                 text=True, timeout=600)  # fmt: skip
        assert stopped.returncode != 0
        assert "error: params.yaml: 'train.epochs'" in stopped.stdout + stopped.stderr
        assert not (pipeline / "metrics/train.json").exists()  # DVC removed it before the command ran
    finally:
        params_file.write_text(committed)
    run(["dvc", "checkout"], pipeline)
    assert {name: (pipeline / name).read_bytes() for name in outputs} == before
    assert "up to date" in run(["dvc", "status"], pipeline).stdout
