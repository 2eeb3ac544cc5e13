"""Ablation summary: many seeds per setting, mean and spread, and a paired test of one knob.

Reads the child runs of one sweep's parent run (`--parent RUN_ID`, default the latest run tagged
`mnist_cnn.kind=sweep`, which `tools.sweep` opens), or the runs of the named DVC experiments, and
nothing else in the store. Groups them by the params that differ, the seed excepted, and writes
DIR/ablation.md (per group and epoch the mean ± std of the losses and test accuracy; --knob KEY=A,B
(default: the sweep's): A - B paired by seed, scipy's paired t-test, for the accuracy, every robust_*
metric and every point of the robustness curves, read from each run's plots/robustness_*.csv; 4/9
confusions), DIR/ablation.png and DIR/ablation_robustness.png, logged as an MLflow run tagged
`mnist_cnn.kind=ablation-summary` (a child of the sweep's parent run). DIR is ablation/ for the
report's knob augment=true,false and ablation/<key>/ for any other."""

from __future__ import annotations

import argparse
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
from scipy import stats

from mnist_cnn.cli import UserError, run_stage
from mnist_cnn.config import HEADLINE_ROTATION, HEADLINE_SHIFT, ROBUST_ROTATION, ROBUST_SHIFT
from mnist_cnn.files import save_figure, write_text
from mnist_cnn.tools.sweep import KIND_TAG, split_knob
from mnist_cnn.tools.sweep_runs import (
    CURVES,
    METRICS,
    RunSummary,
    by_experiment,
    fetch_runs,
    find_parent,
    point_name,
    summarise,
)
from mnist_cnn.tracking import store

DEFAULT_KNOB = "augment=true,false"


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
    """The paired table: every robust_* metric by name, then each curve's points by size."""
    rows = [(name, lambda r, name=name: r.robust.get(name)) for name in sorted({k for r in runs for k in r.robust})]
    for curve in CURVES:
        for size in sorted({s for r in runs for s in r.curves.get(curve, {})}):
            rows.append((point_name(curve, size), lambda r, c=curve, s=size: r.curves.get(c, {}).get(s)))
    if not rows:
        return []
    a, b = knob.label(0), knob.label(1)
    lines = [f"## Robustness: {a} - {b}, paired by seed", ""]
    lines += [f"| metric | {a} (%) mean ± std | {b} (%) mean ± std | difference (points) | 95% CI | p |"]
    lines += ["|---|---|---|---|---|---|"]
    for name, value in rows:
        on, off = paired(runs, knob, value)
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


def plot_robustness(runs: list[RunSummary], knob: Knob, path: Path) -> None:
    """Each curve for the knob's two settings, mean ± 1 std over the runs."""
    if not any(r.curves for r in runs):
        return
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.6), sharey=True)
    for ax, curve in zip(axes, CURVES, strict=True):
        for side, colour in ((0, "tab:blue"), (1, "tab:orange")):
            group = [r for r in runs if knob.side(r) == side]
            x = sorted({s for r in group for s in r.curves.get(curve, {})})
            if not x:
                continue
            values = np.array([[r.curves.get(curve, {}).get(s, np.nan) for s in x] for r in group]) * 100
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


def default_out(knob: str) -> Path:
    """ablation/ for the report's knob; ablation/<key>/ (the key's last part) for any other."""
    return Path("ablation") if knob == DEFAULT_KNOB else Path("ablation") / knob.partition("=")[0].rsplit(".")[-1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mnist_cnn.tools.ablation", description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--parent", help="the sweep's parent run id (default: the latest sweep)")
    source.add_argument("--exp-name", action="append", default=[], help="DVC experiment name (repeatable)")
    parser.add_argument("--out", type=Path, help="output directory (default: ablation/, or ablation/KEY/)")
    parser.add_argument("--knob", help="KEY=A,B: A - B, paired by seed (default: the sweep's knob)")
    args = parser.parse_args(argv)
    if args.knob:
        split_knob(args.knob)

    experiment_id = store.setup()
    parent = None if args.exp_name else find_parent(experiment_id, args.parent)
    knob_text = args.knob or (parent.data.params.get("knob") if parent else None) or DEFAULT_KNOB
    key, values = split_knob(knob_text)
    knob, out = Knob(key, values), args.out or default_out(knob_text)
    runs = fetch_runs(experiment_id, parent, args.exp_name)
    if parent is not None:
        print(f"ablation: {len(runs)} finished runs of {parent.info.run_name!r} ({parent.info.run_id})", flush=True)
    if not runs:
        raise UserError("no finished runs match (run the sweep first: make ablation)")
    client = mlflow.MlflowClient()
    summaries = [s for group in by_experiment(runs) if (s := summarise(group, client)).history["test_accuracy"]]
    groups = group_runs(summaries)
    difference = paired_difference(*paired(summaries, knob, lambda r: r.history["test_accuracy"][-1]))
    text = markdown(groups, knob, difference, robustness_section(summaries, knob))
    write_text(out / "ablation.md", text)
    plot(groups, out / "ablation.png")
    plot_robustness(summaries, knob, out / "ablation_robustness.png")
    with mlflow.start_run(
        experiment_id=experiment_id, run_name="ablation-summary", tags={KIND_TAG: "ablation-summary"},
        parent_run_id=parent.info.run_id if parent else None,
    ):  # fmt: skip
        mlflow.log_params({"runs": len(summaries), "knob": knob_text})
        prefix = f"{knob.key.replace('.', '_')}_diff"
        if difference:
            mlflow.log_metrics({f"{prefix}_{k}": v for k, v in difference.items() if k != "pairs"})
        for name in ("robust_mean_accuracy", ROBUST_ROTATION, ROBUST_SHIFT):
            d = paired_difference(*paired(summaries, knob, lambda r, name=name: r.robust.get(name)))
            if d:
                mlflow.log_metrics({f"{prefix}_{name}_{k}": v for k, v in d.items() if k != "pairs"})
        mlflow.log_artifacts(str(out), artifact_path="ablation")
    print(text)


if __name__ == "__main__":
    run_stage(main)
