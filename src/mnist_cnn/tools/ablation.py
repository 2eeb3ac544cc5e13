"""Ablation summary: many seeds per setting, mean and spread, and a paired augment on/off test.

Groups the finished runs of the experiment `mnist-cnn` (or of the named DVC experiments, or with a
tag) by the params that differ, the seed excepted, and writes DIR/ablation.md (per group and epoch
the mean ± std of the losses and test accuracy; augment on - off paired by seed, scipy's paired
t-test, for the accuracy and every robust_* metric; 4/9 confusions), DIR/ablation.png and
DIR/ablation_robustness.png, logged as an MLflow run tagged `mnist_cnn.kind=ablation-summary`.
"""

from __future__ import annotations

import argparse
import io
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlflow
import numpy as np
from matplotlib.ticker import MaxNLocator
from mlflow.entities import Run
from scipy import stats

from mnist_cnn.config import UserError, run_stage
from mnist_cnn.files import save_figure, write_text
from mnist_cnn.tracking import store

KIND_TAG = "mnist_cnn.kind"
METRICS = ("test_accuracy", "test_loss", "train_loss")


@dataclass
class RunSummary:
    params: dict[str, str]
    history: dict[str, list[float]]  # metric -> value per epoch (index 0 = epoch 1)
    confusions_4_9: int | None
    robust: dict[str, float]  # the robustness stage's robust_* metrics


@dataclass
class Group:
    label: str  # the params that vary, e.g. "augment=True"
    runs: list[RunSummary]


def fetch_runs(exp_names: list[str], tag: str | None) -> list[Run]:
    experiment_id = store.setup()
    filters = ["attributes.status = 'FINISHED'"]
    if tag:
        key, sep, value = tag.partition("=")
        if not sep:
            raise UserError(f"--tag: expected KEY=VALUE, got {tag!r}")
        filters.append(f"tags.`{key}` = '{value}'")
    runs = mlflow.search_runs([experiment_id], " and ".join(filters), output_format="list", max_results=5000)
    runs = [r for r in runs if KIND_TAG not in r.data.tags]  # not earlier summaries
    return [r for r in runs if not exp_names or r.data.tags.get("dvc.exp_name") in exp_names]


def summarise(run: Run, client: mlflow.MlflowClient) -> RunSummary:
    history = {
        metric: [m.value for m in sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: m.step)]
        for metric in METRICS
    }
    robust = {k: v for k, v in run.data.metrics.items() if k.startswith("robust_")}
    return RunSummary(dict(run.data.params), history, confusions_4_9(run.info.run_id), robust)


def confusions_4_9(run_id: str) -> int | None:
    """4 taken for 9 plus 9 taken for 4, from the run's reports/confusion_counts.csv."""
    try:
        text = mlflow.artifacts.load_text(f"runs:/{run_id}/reports/confusion_counts.csv")
    except Exception:  # no such artifact (e.g. a run that stopped before confusion-analysis)
        return None
    matrix = np.loadtxt(io.StringIO(text), delimiter=",", skiprows=1, dtype=int)[:, 1:]
    return int(matrix[4, 9] + matrix[9, 4])


def group_runs(runs: list[RunSummary]) -> list[Group]:
    """Group by the params whose values differ between runs, the seed excepted."""
    keys = sorted({k for r in runs for k in r.params})
    varying = [k for k in keys if k != "seed" and len({r.params.get(k) for r in runs}) > 1]
    groups: dict[tuple[tuple[str, str], ...], list[RunSummary]] = defaultdict(list)
    for r in runs:
        groups[tuple((k, r.params.get(k, "")) for k in varying)].append(r)
    return [Group(", ".join(f"{k}={v}" for k, v in key) or "all runs", groups[key]) for key in sorted(groups)]


def per_epoch(group: Group, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample std per epoch over the group's runs (epochs all runs reached)."""
    epochs = min(len(r.history[metric]) for r in group.runs)
    values = np.array([r.history[metric][:epochs] for r in group.runs])
    std = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(epochs)
    return values.mean(axis=0), std


def by_augment(runs: list[RunSummary], value) -> tuple[list[float], list[float]]:
    """value(run) for augment on and off, paired by seed (and every other param); None = skip."""
    by_setting: dict[tuple, dict[str, float]] = defaultdict(dict)
    for r in runs:
        v = value(r)
        if v is not None:
            others = tuple(sorted((k, v) for k, v in r.params.items() if k != "augment"))
            by_setting[others][r.params.get("augment", "")] = v
    pairs = [(v["True"], v["False"]) for v in by_setting.values() if {"True", "False"} <= set(v)]
    return [on for on, _ in pairs], [off for _, off in pairs]


def paired_difference(on: list[float], off: list[float]) -> dict[str, float] | None:
    """Mean of on - off with the paired t-test's 95% CI and p-value; None under 2 pairs."""
    if len(on) < 2:
        return None
    diffs = np.subtract(on, off)
    if np.all(diffs == diffs[0]):  # no spread: the t-test is undefined; the difference is exact
        d = float(diffs[0])
        return {"pairs": len(on), "mean": d, "low": d, "high": d, "p": 1.0 if d == 0 else 0.0}
    test = stats.ttest_rel(on, off)
    ci = test.confidence_interval(0.95)
    return {"pairs": len(on), "mean": float(diffs.mean()), "low": float(ci.low), "high": float(ci.high),
            "p": float(test.pvalue)}  # fmt: skip


def robustness_section(runs: list[RunSummary]) -> list[str]:
    names = sorted({k for r in runs for k in r.robust}, key=_robust_order)
    if not names:
        return []
    lines = ["## Robustness: augment on - off, paired by seed", ""]
    lines += [
        "| metric | on (%) mean ± std | off (%) mean ± std | on - off (points) | 95% CI | p |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        on, off = by_augment(runs, lambda r, name=name: r.robust.get(name))
        if (d := paired_difference(on, off)) is not None:
            lines.append(
                f"| {name} | {100 * np.mean(on):.2f} ± {100 * np.std(on, ddof=1):.2f} | "
                f"{100 * np.mean(off):.2f} ± {100 * np.std(off, ddof=1):.2f} | {100 * d['mean']:+.2f} | "
                f"[{100 * d['low']:+.2f}, {100 * d['high']:+.2f}] | {d['p']:.2g} |"
            )
    lines += ["", "### Worst augmented run vs best non-augmented run", ""]
    lines += ["| point | worst augmented (%) | best non-augmented (%) | worst on > best off |", "|---|---|---|---|"]
    for name, label in (("robust_rotation_20", "rotation ±20 degrees"), ("robust_shift_4", "shift 4 pixels")):
        on = [r.robust[name] for r in runs if name in r.robust and r.params.get("augment") == "True"]
        off = [r.robust[name] for r in runs if name in r.robust and r.params.get("augment") == "False"]
        if on and off:
            lines.append(f"| {label} | {100 * min(on):.2f} (n={len(on)}) | {100 * max(off):.2f} (n={len(off)}) | "
                         f"{'yes' if min(on) > max(off) else 'no'} |")  # fmt: skip
    return [*lines, ""]


def _robust_order(name: str) -> tuple[int, float, str]:
    """Corruptions and summaries first, then each curve by size."""
    curve = next((c for c in CURVES if name.startswith(f"robust_{c}_")), None)
    return (0, 0.0, name) if curve is None else (1 + CURVES.index(curve), _curve_size(name, curve), name)


CURVES = ("rotation", "shift_x", "shift_y", "shift_diagonal", "scale")


def _curve_size(name: str, curve: str) -> float:
    tail = name.removeprefix(f"robust_{curve}_")  # rotation: ccw20 -> +20, cw20 -> -20, the headline 20 -> 20
    return (-1 if tail.startswith("cw") else 1) * float(tail.removeprefix("ccw").removeprefix("cw"))


def plot_robustness(runs: list[RunSummary], path: Path) -> None:
    """Each curve for augment on and off, mean ± 1 std over the runs."""
    if not any(r.robust for r in runs):
        return
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.6), sharey=True)
    for ax, curve in zip(axes, CURVES, strict=True):
        for setting, colour in (("True", "tab:blue"), ("False", "tab:orange")):
            group = [r for r in runs if r.params.get("augment") == setting]
            # (the rotation curve's points are cwN/ccwN; robust_rotation_20 is their mean)
            points = {k for r in group for k in r.robust if k.startswith(f"robust_{curve}_")}
            names = sorted(
                (k for k in points if curve != "rotation" or "cw" in k), key=lambda k, c=curve: _curve_size(k, c)
            )
            if not names:
                continue
            x = [_curve_size(k, curve) for k in names]
            values = np.array([[r.robust.get(k, np.nan) for k in names] for r in group]) * 100
            mean, std = np.nanmean(values, 0), np.nanstd(values, 0, ddof=1) if len(group) > 1 else np.zeros(len(x))
            ax.plot(x, mean, marker="o", ms=3, color=colour, label=f"augment={setting} (n={len(group)})")
            ax.fill_between(x, mean - std, mean + std, color=colour, alpha=0.25)
        ax.set(title=curve, xlabel="degrees" if curve == "rotation" else "factor" if curve == "scale" else "pixels")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%), mean ± std")
    axes[0].legend(fontsize=8)
    save_figure(fig, path)


def markdown(groups: list[Group], paired: dict[str, float] | None, robust: list[str]) -> str:
    lines = ["# Ablation summary", ""]
    for g in groups:
        (acc_mean, acc_std), (loss_mean, loss_std), (train_mean, train_std) = (per_epoch(g, m) for m in METRICS)
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
            f"{100 * paired['mean']:+.3f} points, 95% CI [{100 * paired['low']:+.3f}, {100 * paired['high']:+.3f}]"
            f" (paired t-test, p = {paired['p']:.2g})."
        )
    else:
        lines.append("No paired augment on/off comparison: needs at least 2 seeds run both ways.")
    lines += ["", *robust]
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
    save_figure(fig, path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mnist_cnn.tools.ablation", description=__doc__.split("\n")[0])
    parser.add_argument("--exp-name", action="append", default=[], help="DVC experiment name (repeatable)")
    parser.add_argument("--tag", help="only runs with this tag, KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("ablation"), help="output directory")
    args = parser.parse_args(argv)

    runs = fetch_runs(args.exp_name, args.tag)
    if not runs:
        raise UserError("no finished runs match (run the sweep first: make ablation)")
    client = mlflow.MlflowClient()
    summaries = [summarise(r, client) for r in runs if r.data.metrics.get("test_accuracy") is not None]
    groups = group_runs(summaries)
    paired = paired_difference(*by_augment(summaries, lambda r: r.history["test_accuracy"][-1]))
    text = markdown(groups, paired, robustness_section(summaries))
    write_text(args.out / "ablation.md", text)
    plot(groups, args.out / "ablation.png")
    plot_robustness(summaries, args.out / "ablation_robustness.png")
    with mlflow.start_run(
        experiment_id=store.setup(), run_name="ablation-summary", tags={KIND_TAG: "ablation-summary"}
    ):
        mlflow.log_param("runs", len(summaries))
        if paired:
            mlflow.log_metrics({f"augment_diff_{k}": v for k, v in paired.items() if k != "pairs"})
        for name in ("robust_mean_accuracy", "robust_rotation_20", "robust_shift_4"):
            d = paired_difference(*by_augment(summaries, lambda r, name=name: r.robust.get(name)))
            if d:
                mlflow.log_metrics({f"augment_diff_{name}_{k}": v for k, v in d.items() if k != "pairs"})
        mlflow.log_artifacts(str(args.out), artifact_path="ablation")
    print(text)


if __name__ == "__main__":
    run_stage(main)
