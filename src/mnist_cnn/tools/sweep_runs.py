"""A sweep's runs read back from MLflow for its summary (tools/ablation.py): the children of its parent
run (tools/sweep.py opens it) or the runs of named DVC experiments, one summary per experiment with
its per-epoch history, robust_* metrics, robustness curves (from the CSV artifacts) and 4/9 confusions."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from dataclasses import dataclass

import mlflow
import numpy as np
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from mnist_cnn.cli import UserError
from mnist_cnn.paths import ROBUST_CURVES
from mnist_cnn.tools.sweep import KIND_TAG, SWEEP

METRICS = ("test_accuracy", "test_loss", "train_loss")
CURVES = ("rotation", "shift_x", "shift_y", "shift_diagonal", "scale")


@dataclass
class RunSummary:
    params: dict[str, str]
    history: dict[str, list[float]]  # metric -> value per epoch (index 0 = epoch 1)
    confusions_4_9: int | None
    robust: dict[str, float]  # the robustness stage's robust_* metrics
    curves: dict[str, dict[float, float]]  # curve (CURVES) -> size (signed degrees, pixels, factor) -> accuracy


def find_parent(experiment_id: str, run_id: str | None) -> Run:
    """The sweep's parent run: the one named, or the latest sweep's."""
    if run_id:
        try:
            return mlflow.get_run(run_id)
        except MlflowException:
            raise UserError(f"--parent: no run {run_id!r} in the store") from None
    sweeps = mlflow.search_runs(
        [experiment_id], f"tags.`{KIND_TAG}` = '{SWEEP}'", order_by=["attributes.start_time DESC"],
        max_results=1, output_format="list",
    )  # fmt: skip
    if not sweeps:
        raise UserError("no sweep in the store (run one first: make ablation)")
    return sweeps[0]


def fetch_runs(experiment_id: str, parent: Run | None, exp_names: list[str]) -> list[Run]:
    """The finished children of the parent run, or the finished runs of the named experiments; never
    an earlier summary."""
    where = "attributes.status = 'FINISHED'"
    if parent is not None:
        where += f" and tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    runs = mlflow.search_runs([experiment_id], where, output_format="list", max_results=5000)
    runs = [r for r in runs if KIND_TAG not in r.data.tags]
    return runs if parent is not None else [r for r in runs if r.data.tags.get("dvc.exp_name") in exp_names]


def by_experiment(runs: list[Run]) -> list[list[Run]]:
    """The runs of one pipeline execution together (its DVC experiment), oldest first: one execution
    may record its training and its evaluation in separate runs."""
    groups: dict[str, list[Run]] = defaultdict(list)
    for r in sorted(runs, key=lambda r: r.info.start_time):
        groups[r.data.tags.get("dvc.exp_name") or r.info.run_id].append(r)
    return list(groups.values())


def summarise(runs: list[Run], client: mlflow.MlflowClient) -> RunSummary:
    """One experiment's summary from its runs: params and metrics of all of them, each metric's
    longest history (the per-epoch one), the first confusion table and robustness curves found."""
    params = {k: v for r in runs for k, v in r.data.params.items()}
    history = {}
    for metric in METRICS:  # the per-epoch history is epoch/<metric> (plain <metric> in older runs)
        histories = [client.get_metric_history(r.info.run_id, m) for r in runs for m in (f"epoch/{metric}", metric)]
        history[metric] = [m.value for m in sorted(max(histories, key=len), key=lambda m: m.step)]
    confusions = next((c for r in runs if (c := confusions_4_9(r.info.run_id)) is not None), None)
    curves = next((c for r in runs if (c := robustness_curves(r.info.run_id))), {})
    # (runs made before the curves left the metrics hold each point as a metric too: read once, from the CSV)
    points = {point_name(curve, size) for curve, sizes in curves.items() for size in sizes}
    robust = {k: v for r in runs for k, v in r.data.metrics.items() if k.startswith("robust_") and k not in points}
    return RunSummary(params, history, confusions, robust, curves)


def artifact_text(run_id: str, path: str) -> str | None:
    try:
        return mlflow.artifacts.load_text(f"runs:/{run_id}/{path}")
    except Exception:  # no such artifact (e.g. a run that stopped before the stage that writes it)
        return None


def confusions_4_9(run_id: str) -> int | None:
    """4 taken for 9 plus 9 taken for 4, from the run's reports/confusion_counts.csv."""
    if (text := artifact_text(run_id, "reports/confusion_counts.csv")) is None:
        return None
    matrix = np.loadtxt(io.StringIO(text), delimiter=",", skiprows=1, dtype=int)[:, 1:]
    return int(matrix[4, 9] + matrix[9, 4])


def robustness_curves(run_id: str) -> dict[str, dict[float, float]]:
    """The robustness stage's curves from the run's plots/robustness_{rotation,shift,scale}.csv:
    rotation by signed degrees (+ = counter-clockwise), each shift direction and scale."""
    curves: dict[str, dict[float, float]] = {}
    for curve, path in ROBUST_CURVES.items():
        if (text := artifact_text(run_id, f"plots/{path.name}")) is None:
            continue
        for row in csv.DictReader(io.StringIO(text)):
            if curve == "shift":  # pixels, then accuracy and standard error per direction
                for direction in (c for c in row if c != "pixels" and not c.endswith("_se")):
                    curves.setdefault(f"shift_{direction}", {})[float(row["pixels"])] = float(row[direction])
            else:
                size = float(row["degrees" if curve == "rotation" else "factor"])
                curves.setdefault(curve, {})[size] = float(row["accuracy"])
    return curves


def point_name(curve: str, size: float) -> str:
    """A curve point's row label, as the stage once named its metrics: robust_rotation_cw20 /
    _ccw20, robust_shift_x_4, robust_scale_0.8."""
    if curve == "rotation":
        return f"robust_rotation_{'cw' if size < 0 else 'ccw'}{abs(size):g}"
    return f"robust_{curve}_{size:g}"
