"""tools/sweep_runs.py: one experiment's runs read back from a real MLflow store as one summary, with
the robustness curves from the robustness stage's CSV artifacts."""

from __future__ import annotations

import mlflow
import pytest

from mnist_cnn.tools import sweep_runs

ROTATION = "degrees,accuracy,se\n-20,0.9,0.01\n0,0.99,0.001\n5,0.98,0.002\n"
SHIFT = "pixels,x,x_se,y,y_se,diagonal,diagonal_se\n0,0.99,0.001,0.99,0.001,0.99,0.001\n4,0.6,0.01,0.5,0.01,0.4,0.01\n"
SCALE = "factor,accuracy,se\n0.8,0.93,0.01\n1.0,0.99,0.001\n"


def test_an_experiments_training_and_evaluation_runs_make_one_summary(mlflow_store: str) -> None:
    tags = {"dvc.exp_name": "toy-1"}
    with mlflow.start_run(experiment_id=mlflow_store, tags=tags):  # training: params, per-epoch curves
        mlflow.log_params({"augment": True, "seed": 0})
        for epoch, acc in enumerate([0.97, 0.98, 0.99], 1):
            mlflow.log_metrics({"test_accuracy": acc, "test_loss": 1 - acc, "train_loss": 0.1 / epoch}, step=epoch)
    with mlflow.start_run(experiment_id=mlflow_store, tags=tags):  # evaluation, as runs once held it too
        mlflow.log_params({"augment": True, "seed": 0, "robustness.curve_samples": 200})
        mlflow.log_metrics({"test_accuracy": 0.99, "robust_fog": 0.7, "robust_rotation_20": 0.9})
        mlflow.log_metrics({"robust_rotation_cw20": 0.9, "robust_shift_y_4": 0.5})  # points, also in the CSVs
        for name, text in (("rotation", ROTATION), ("shift", SHIFT), ("scale", SCALE)):
            mlflow.log_text(text, f"plots/robustness_{name}.csv")
        mlflow.log_text("true\\predicted,a,b\n" + "".join(f"{d},0,0\n" for d in range(10)), "reports/x.csv")
    with mlflow.start_run(experiment_id=mlflow_store):  # another execution, without a DVC experiment
        mlflow.log_metric("test_accuracy", 0.5)

    runs = sweep_runs.fetch_runs(mlflow_store, None, ["toy-1"])
    assert len(runs) == 2
    (experiment,) = sweep_runs.by_experiment(runs)
    summary = sweep_runs.summarise(experiment, mlflow.MlflowClient())
    assert summary.params == {"augment": "True", "seed": "0", "robustness.curve_samples": "200"}
    assert summary.history["test_accuracy"] == [0.97, 0.98, 0.99]  # the per-epoch history, not the single value
    assert summary.history["train_loss"] == pytest.approx([0.1, 0.05, 0.1 / 3])
    assert summary.robust == {"robust_fog": 0.7, "robust_rotation_20": 0.9}  # the points come from the CSVs
    assert summary.curves == {
        "rotation": {-20.0: 0.9, 0.0: 0.99, 5.0: 0.98},
        "shift_x": {0.0: 0.99, 4.0: 0.6},
        "shift_y": {0.0: 0.99, 4.0: 0.5},
        "shift_diagonal": {0.0: 0.99, 4.0: 0.4},
        "scale": {0.8: 0.93, 1.0: 0.99},
    }
    assert summary.confusions_4_9 is None  # no reports/confusion_counts.csv
    assert [sweep_runs.point_name("rotation", s) for s in (-20.0, 0.0, 5.0)] == [
        "robust_rotation_cw20", "robust_rotation_ccw0", "robust_rotation_ccw5",
    ]  # fmt: skip
    assert sweep_runs.point_name("scale", 0.8) == "robust_scale_0.8"
    assert sweep_runs.point_name("shift_diagonal", 4.0) == "robust_shift_diagonal_4"
    assert len(sweep_runs.by_experiment(sweep_runs.fetch_runs(mlflow_store, None, ["toy-1", "nowhere"]))) == 1
