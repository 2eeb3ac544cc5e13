"""Ablation summary: many seeds per setting, mean and spread, and a paired augment on/off test.

    python -m mnist_cnn.ablation [--exp-name NAME ...] [--tag KEY=VALUE] [--out DIR]

Reads the finished runs of the MLflow experiment `mnist-cnn` (optionally only
those whose DVC experiment name or a tag matches), groups them by the params
that differ between them (the seed excepted), and writes DIR/ablation.md and
DIR/ablation.png: per group and epoch the mean +- std of test accuracy, test
loss and training loss (the last shows overfitting); the paired difference
augment on - off over the seeds both settings ran, with a 95% confidence
interval (Student's t); and how often 4 and 9 were confused. The summary is logged as its own MLflow run, tagged
`mnist_cnn.kind=ablation-summary`.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlflow
import numpy as np
from matplotlib.ticker import MaxNLocator
from mlflow.entities import Run
from scipy import stats

from mnist_cnn import tracking
from mnist_cnn.config import UserError, run_stage
from mnist_cnn.data import atomic_path

KIND_TAG = "mnist_cnn.kind"
METRICS = ("test_accuracy", "test_loss", "train_loss")


@dataclass
class RunSummary:
    run_id: str
    params: dict[str, str]
    history: dict[str, list[float]]  # metric -> value per epoch (index 0 = epoch 1)
    confusions_4_9: int | None = None


@dataclass
class Group:
    key: tuple[tuple[str, str], ...]
    runs: list[RunSummary] = field(default_factory=list)

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.key) or "all runs"


def fetch_runs(exp_names: list[str], tag: str | None) -> list[Run]:
    experiment_id = tracking.setup()
    filters = ["attributes.status = 'FINISHED'"]
    if tag:
        key, sep, value = tag.partition("=")
        if not sep:
            raise UserError(f"--tag: expected KEY=VALUE, got {tag!r}")
        filters.append(f"tags.`{key}` = '{value}'")
    runs = mlflow.search_runs([experiment_id], " and ".join(filters), output_format="list", max_results=5000)
    runs = [r for r in runs if KIND_TAG not in r.data.tags]  # not earlier summaries
    if exp_names:
        runs = [r for r in runs if r.data.tags.get("dvc.exp_name") in exp_names]
    return runs


def summarise(run: Run, client: mlflow.MlflowClient) -> RunSummary:
    history = {}
    for metric in METRICS:
        points = sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: m.step)
        history[metric] = [m.value for m in points]
    return RunSummary(run.info.run_id, dict(run.data.params), history, confusions_4_9(run.info.run_id))


def confusions_4_9(run_id: str) -> int | None:
    """4 taken for 9 plus 9 taken for 4, from the run's reports/confusion_counts.csv."""
    try:
        text = mlflow.artifacts.load_text(f"runs:/{run_id}/reports/confusion_counts.csv")
    except Exception:  # no such artifact (e.g. a run that stopped before confusion-analysis)
        return None
    rows = list(csv.reader(io.StringIO(text)))[1:]
    matrix = np.array([[int(v) for v in row[1:]] for row in rows])
    return int(matrix[4, 9] + matrix[9, 4])


def group_runs(runs: list[RunSummary]) -> list[Group]:
    """Group by the params whose values differ between runs, the seed excepted."""
    keys = sorted({k for r in runs for k in r.params})
    varying = [k for k in keys if k != "seed" and len({r.params.get(k) for r in runs}) > 1]
    groups: dict[tuple[tuple[str, str], ...], Group] = {}
    for r in runs:
        key = tuple((k, r.params.get(k, "")) for k in varying)
        groups.setdefault(key, Group(key)).runs.append(r)
    return [groups[k] for k in sorted(groups)]


def per_epoch(group: Group, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample std per epoch over the group's runs (epochs all runs reached)."""
    epochs = min(len(r.history[metric]) for r in group.runs)
    values = np.array([r.history[metric][:epochs] for r in group.runs])
    std = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(epochs)
    return values.mean(axis=0), std


def paired_augment_difference(runs: list[RunSummary]) -> dict[str, float] | None:
    """Final test accuracy, augment on minus off, paired by seed (and every other param)."""
    by_setting: dict[tuple, dict[str, float]] = defaultdict(dict)
    for r in runs:
        others = tuple(sorted((k, v) for k, v in r.params.items() if k != "augment"))
        by_setting[others][r.params.get("augment", "")] = r.history["test_accuracy"][-1]
    pairs = [v["True"] - v["False"] for v in by_setting.values() if {"True", "False"} <= set(v)]
    if len(pairs) < 2:
        return None
    diffs = np.array(pairs)
    mean, sem = diffs.mean(), diffs.std(ddof=1) / np.sqrt(len(diffs))
    half = stats.t.ppf(0.975, len(diffs) - 1) * sem
    return {"pairs": len(diffs), "mean": float(mean), "low": float(mean - half), "high": float(mean + half)}


def markdown(groups: list[Group], paired: dict[str, float] | None) -> str:
    lines = ["# Ablation summary", ""]
    for g in groups:
        acc_mean, acc_std = per_epoch(g, "test_accuracy")
        loss_mean, loss_std = per_epoch(g, "test_loss")
        train_mean, train_std = per_epoch(g, "train_loss")
        lines += [
            f"## {g.label} ({len(g.runs)} runs)",
            "",
            "| epoch | test accuracy (%) | test loss | train loss |",
            "|---|---|---|---|",
        ]
        rows = zip(acc_mean, acc_std, loss_mean, loss_std, train_mean, train_std, strict=True)
        for e, (am, asd, lm, lsd, tm, tsd) in enumerate(rows, 1):
            lines.append(f"| {e} | {100 * am:.2f} ± {100 * asd:.2f} | {lm:.4f} ± {lsd:.4f} | {tm:.4f} ± {tsd:.4f} |")
        counts = [r.confusions_4_9 for r in g.runs if r.confusions_4_9 is not None]
        if counts:
            lines.append(f"\n4 and 9 confused (both directions), per run: mean {np.mean(counts):.1f}, runs {counts}")
        lines.append("")
    if paired:
        lines.append(
            f"**Augment on - off**, final test accuracy, paired over {paired['pairs']} seeds: "
            f"{100 * paired['mean']:+.3f} points, 95% CI [{100 * paired['low']:+.3f}, {100 * paired['high']:+.3f}]."
        )
    else:
        lines.append("No paired augment on/off comparison: needs at least 2 seeds run both ways.")
    return "\n".join(lines) + "\n"


def plot(groups: list[Group], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    for g in groups:
        mean, std = per_epoch(g, "test_accuracy")
        epochs = np.arange(1, len(mean) + 1)
        ax.errorbar(epochs, 100 * mean, yerr=100 * std, marker="o", capsize=3, label=f"{g.label} (n={len(g.runs)})")
    ax.set(xlabel="epoch", ylabel="test accuracy (%), mean ± std", title="Ablation")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mnist_cnn.ablation", description=__doc__.split("\n")[0])
    parser.add_argument("--exp-name", action="append", default=[], help="DVC experiment name (repeatable)")
    parser.add_argument("--tag", help="only runs with this tag, KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("ablation"), help="output directory")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per run is noise here

    runs = fetch_runs(args.exp_name, args.tag)
    if not runs:
        raise UserError("no finished runs match (run the sweep first: make ablation)")
    client = mlflow.MlflowClient()
    summaries = [summarise(r, client) for r in runs if r.data.metrics.get("test_accuracy") is not None]
    groups = group_runs(summaries)
    paired = paired_augment_difference(summaries)
    text = markdown(groups, paired)
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out / "ablation.md") as tmp:
        tmp.write_text(text)
    plot(groups, args.out / "ablation.png")
    with mlflow.start_run(
        experiment_id=tracking.setup(), run_name="ablation-summary", tags={KIND_TAG: "ablation-summary"}
    ):
        mlflow.log_param("runs", len(summaries))
        if paired:
            mlflow.log_metrics({f"augment_diff_{k}": v for k, v in paired.items() if k != "pairs"})
        mlflow.log_artifacts(str(args.out), artifact_path="ablation")
    print(text)


if __name__ == "__main__":
    run_stage(main)
