"""Ablation summary: many seeds per setting, mean and spread, and a paired test of one knob.

Groups the finished runs of the experiment `mnist-cnn` (or of the named DVC experiments, or with a
tag) by the params that differ, the seed excepted, and writes DIR/ablation.md (per group and epoch the
mean ± std of the losses and test accuracy; --knob KEY=A,B (default augment=true,false): A - B paired by
seed, scipy's paired t-test, for the accuracy and every robust_* metric; 4/9 confusions), DIR/ablation.png
and DIR/ablation_robustness.png, logged as an MLflow run tagged `mnist_cnn.kind=ablation-summary`."""

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
import yaml
from matplotlib.ticker import MaxNLocator
from mlflow.entities import Run
from scipy import stats

from mnist_cnn.cli import UserError, run_stage
from mnist_cnn.config import HEADLINE_ROTATION, HEADLINE_SHIFT, ROBUST_ROTATION, ROBUST_SHIFT
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


@dataclass(frozen=True)
class Knob:
    """The param an ablation measures: KEY=A,B compares runs with A (side 0) and B (side 1), paired on the rest."""

    key: str
    values: list[str]

    def side(self, run: RunSummary) -> int | None:
        """Values compared as YAML reads them (true = True, 0 = 0.0)."""
        return next((i for i, v in enumerate(self.values) if _yaml(run.params.get(self.key, "~")) == _yaml(v)), None)

    def label(self, side: int) -> str:
        return f"{self.key}={self.values[side]}"


def _yaml(text: str) -> object:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


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


def paired(runs: list[RunSummary], knob: Knob, value) -> tuple[list[float], list[float]]:
    """value(run) for the knob's two settings, paired by seed (and every other param); None = skip."""
    by_setting: dict[tuple, dict[int, float]] = defaultdict(dict)
    for r in runs:
        if (side := knob.side(r)) is not None and (v := value(r)) is not None:
            by_setting[tuple(sorted((k, p) for k, p in r.params.items() if k != knob.key))][side] = v
    pairs = [(v[0], v[1]) for v in by_setting.values() if len(v) == 2]
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


def robustness_section(runs: list[RunSummary], knob: Knob) -> list[str]:
    names = sorted({k for r in runs for k in r.robust}, key=_robust_order)
    if not names:
        return []
    a, b = knob.label(0), knob.label(1)
    lines = [f"## Robustness: {a} - {b}, paired by seed", ""]
    lines += [f"| metric | {a} (%) mean ± std | {b} (%) mean ± std | difference (points) | 95% CI | p |"]
    lines += ["|---|---|---|---|---|---|"]
    for name in names:
        on, off = paired(runs, knob, lambda r, name=name: r.robust.get(name))
        if (d := paired_difference(on, off)) is not None:
            lines.append(
                f"| {name} | {100 * np.mean(on):.2f} ± {100 * np.std(on, ddof=1):.2f} | "
                f"{100 * np.mean(off):.2f} ± {100 * np.std(off, ddof=1):.2f} | {100 * d['mean']:+.2f} | "
                f"[{100 * d['low']:+.2f}, {100 * d['high']:+.2f}] | {d['p']:.2g} |"
            )
    lines += ["", f"### Worst {a} run vs best {b} run", ""]
    lines += [f"| point | worst {a} (%) | best {b} (%) | worst > best |", "|---|---|---|---|"]
    headlines = (
        (ROBUST_ROTATION, f"rotation ±{HEADLINE_ROTATION} degrees"),
        (ROBUST_SHIFT, f"shift {HEADLINE_SHIFT} pixels"),
    )
    for name, label in headlines:
        on = [r.robust[name] for r in runs if name in r.robust and knob.side(r) == 0]
        off = [r.robust[name] for r in runs if name in r.robust and knob.side(r) == 1]
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


def plot_robustness(runs: list[RunSummary], knob: Knob, path: Path) -> None:
    """Each curve for the knob's two settings, mean ± 1 std over the runs."""
    if not any(r.robust for r in runs):
        return
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.6), sharey=True)
    for ax, curve in zip(axes, CURVES, strict=True):
        for side, colour in ((0, "tab:blue"), (1, "tab:orange")):
            group = [r for r in runs if knob.side(r) == side]
            # (the rotation curve's points are cwN/ccwN; the headline ROBUST_ROTATION is their mean)
            points = {k for r in group for k in r.robust if k.startswith(f"robust_{curve}_")}
            names = sorted(
                (k for k in points if curve != "rotation" or "cw" in k), key=lambda k, c=curve: _curve_size(k, c)
            )
            if not names:
                continue
            x = [_curve_size(k, curve) for k in names]
            values = np.array([[r.robust.get(k, np.nan) for k in names] for r in group]) * 100
            mean, std = np.nanmean(values, 0), np.nanstd(values, 0, ddof=1) if len(group) > 1 else np.zeros(len(x))
            ax.plot(x, mean, marker="o", ms=3, color=colour, label=f"{knob.label(side)} (n={len(group)})")
            ax.fill_between(x, mean - std, mean + std, color=colour, alpha=0.25)
        ax.set(title=curve, xlabel="degrees" if curve == "rotation" else "factor" if curve == "scale" else "pixels")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%), mean ± std")
    axes[0].legend(fontsize=8)
    save_figure(fig, path)


def markdown(groups: list[Group], knob: Knob, difference: dict[str, float] | None, robust: list[str]) -> str:
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
    a, b, d = knob.label(0), knob.label(1), difference
    if d:
        lines.append(
            f"**{a} - {b}**, final test accuracy, paired over {d['pairs']} seeds: {100 * d['mean']:+.3f} points,"
            f" 95% CI [{100 * d['low']:+.3f}, {100 * d['high']:+.3f}] (paired t-test, p = {d['p']:.2g})."
        )
    else:
        lines.append(f"No paired comparison of {a} and {b}: needs at least 2 seeds run both ways.")
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
    parser.add_argument("--knob", default="augment=true,false", help="KEY=A,B: A - B, paired by seed")
    args = parser.parse_args(argv)
    key, _, values = args.knob.partition("=")
    knob = Knob(key, values.split(","))
    if not key or len(knob.values) != 2 or not all(knob.values):
        raise UserError(f"--knob: expected KEY=A,B (e.g. augment=true,false), got {args.knob!r}")

    runs = fetch_runs(args.exp_name, args.tag)
    if not runs:
        raise UserError("no finished runs match (run the sweep first: make ablation)")
    client = mlflow.MlflowClient()
    summaries = [summarise(r, client) for r in runs if r.data.metrics.get("test_accuracy") is not None]
    groups = group_runs(summaries)
    difference = paired_difference(*paired(summaries, knob, lambda r: r.history["test_accuracy"][-1]))
    text = markdown(groups, knob, difference, robustness_section(summaries, knob))
    write_text(args.out / "ablation.md", text)
    plot(groups, args.out / "ablation.png")
    plot_robustness(summaries, knob, args.out / "ablation_robustness.png")
    with mlflow.start_run(
        experiment_id=store.setup(), run_name="ablation-summary", tags={KIND_TAG: "ablation-summary"}
    ):
        mlflow.log_params({"runs": len(summaries), "knob": args.knob})
        prefix = f"{knob.key.replace('.', '_')}_diff"
        if difference:
            mlflow.log_metrics({f"{prefix}_{k}": v for k, v in difference.items() if k != "pairs"})
        for name in ("robust_mean_accuracy", ROBUST_ROTATION, ROBUST_SHIFT):
            d = paired_difference(*paired(summaries, knob, lambda r, name=name: r.robust.get(name)))
            if d:
                mlflow.log_metrics({f"{prefix}_{name}_{k}": v for k, v in d.items() if k != "pairs"})
        mlflow.log_artifacts(str(args.out), artifact_path="ablation")
    print(text)


if __name__ == "__main__":
    run_stage(main)
