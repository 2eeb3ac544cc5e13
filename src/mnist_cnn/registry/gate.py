"""The champion gate: which registered version of `mnist-cnn` is the champion, a pure function of
the versions and their tags (registry.publish writes them). docs/registry.md has the rule, the
margins and why concurrent promotions converge without a lock. In short: a version trained on a
subset, or without a readable `test_accuracy` tag, is never champion; a challenger replaces the
champion only if it is worse beyond a noise margin on no group of conditions both have (clean,
geometric, photometric, ood: a group's score is the mean of its metrics; a group with a metric
either lacks is unknown, not compared) and better beyond it on one; the champion is the fold of
that rule over the versions in version-number order, each run's latest version in the place of its first.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from mlflow.entities.model_registry import ModelVersion

from mnist_cnn.config import AFFINE_CORRUPTIONS, CORRUPTIONS, ROBUST_ROTATION, ROBUST_SHIFT

CHAMPION = "champion"
CHALLENGER = "challenger"
ACCURACY_TAG = "test_accuracy"
SUBSET_TAG = "subset"
GATE_TAG = "gate"
# The groups of conditions the gate compares (docs/registry.md: why not one mean over all of robustness).
GROUPS = {
    "clean": (ACCURACY_TAG,),
    "geometric": (ROBUST_ROTATION, ROBUST_SHIFT, *(f"robust_{c}" for c in AFFINE_CORRUPTIONS)),
    "photometric": tuple(f"robust_{c}" for c in CORRUPTIONS if c not in AFFINE_CORRUPTIONS),  # and noise
    "ood": ("ood_accuracy",),  # other writers' digits
}
GATE_METRICS = tuple(m for members in GROUPS.values() for m in members)  # the tags the gate reads
# Seed-to-seed sample std of each group's score for one training setting (fractions, not points),
# from the 5-seed augment on/off ablation (docs/registry.md: the runs, and the bounds for the means).
SEED_STD = {"clean": 0.0015, "geometric": 0.008, "photometric": 0.032, "ood": 0.026}
# Two versions are two single runs: their difference has std sqrt(2) x the seed std, and a
# margin of 2 of those lets a same-setting rerun look worse (or better) by chance in ~2% of
# cases per group. So a champion is not replaced by a rerun that merely drew a lucky seed.
MARGIN_Z = 2.0
MARGINS = {group: round(MARGIN_Z * math.sqrt(2) * std, 4) for group, std in SEED_STD.items()}


def scores(metrics: Mapping[str, float]) -> dict[str, float]:
    """Each group's score, the mean of its metrics; only the groups whose metrics are all known."""
    return {g: sum(metrics[m] for m in ms) / len(ms) for g, ms in GROUPS.items() if all(m in metrics for m in ms)}


@dataclass(frozen=True)
class Candidate:
    """A version as the gate sees it: its known gate metrics, the subset it was trained on, and its
    place in the fold (its run's first version number; its own by default)."""

    version: str
    metrics: Mapping[str, float]
    subset: int = 0
    place: int | None = None

    @property
    def order(self) -> int:
        return int(self.version) if self.place is None else self.place


@dataclass(frozen=True)
class Choice:
    champion: str | None  # None: no eligible version
    decisions: dict[str, str] = field(default_factory=dict)  # version -> its `gate` tag


def gate(new: Mapping[str, float], champion: Mapping[str, float], champion_version: str) -> tuple[bool, str]:
    """(promoted?, reason): the rule, comparing the group scores of a challenger's metrics with the champion's."""
    new, champion = scores(new), scores(champion)
    shared = [g for g in GROUPS if g in new and g in champion]
    unknown = [g for g in GROUPS if g not in shared]
    against = f"of version {champion_version}"
    worse = [
        f"{g} {new[g]:.4f} < {champion[g]:.4f} - {MARGINS[g]:.4f}" for g in shared if new[g] < champion[g] - MARGINS[g]
    ]
    if worse:
        return False, f"kept: {'; '.join(worse)} {against}"
    better = [
        f"{g} {new[g]:.4f} > {champion[g]:.4f} + {MARGINS[g]:.4f}" for g in shared if new[g] > champion[g] + MARGINS[g]
    ]
    note = f" ({', '.join(unknown)} unknown, not compared)" if unknown else ""
    if not better:
        within = ", ".join(f"{g} {new[g]:.4f} vs {champion[g]:.4f}" for g in shared)
        return False, f"kept: none better than version {champion_version} beyond its margin ({within}){note}"
    return True, f"promoted: {'; '.join(better)} {against}, none worse beyond its margin{note}"


def fold(candidates: Iterable[Candidate]) -> Choice:
    """The champion the rule selects: the first eligible version, then each later one that the gate
    promotes over the champion so far. In version-number order, so the result depends only on the set."""
    champion: Candidate | None = None
    decisions = {}
    for candidate in sorted(candidates, key=lambda c: c.order):
        if candidate.subset > 0:
            decisions[candidate.version] = f"kept: trained on a subset of {candidate.subset} images"
        elif champion is None:
            champion, decisions[candidate.version] = candidate, "promoted: first eligible version"
        else:
            promoted, decisions[candidate.version] = gate(candidate.metrics, champion.metrics, champion.version)
            champion = candidate if promoted else champion
    return Choice(champion.version if champion else None, decisions)


def _number(text: str | None) -> float | None:
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def latest_of_each_run(versions: Iterable[ModelVersion]) -> dict[str, tuple[ModelVersion, int]]:
    """run id (or the version's own number, without one) -> (its latest version, its first version number)."""
    runs: dict[str, list[ModelVersion]] = {}
    for v in versions:
        runs.setdefault(v.run_id or f"version {v.version}", []).append(v)
    return {run: (max(vs, key=lambda v: int(v.version)), min(int(v.version) for v in vs)) for run, vs in runs.items()}


def candidates(versions: Iterable[ModelVersion]) -> list[Candidate]:
    """Each run's latest version, if it has a readable test accuracy, read from its tags (unreadable
    gate metrics are unknown). Versions without one (not yet tagged, or registered by hand) are left out."""
    found = []
    for v, first in latest_of_each_run(versions).values():
        metrics = {m: value for m in GATE_METRICS if (value := _number(v.tags.get(m))) is not None}
        if ACCURACY_TAG in metrics:
            subset = _number(v.tags.get(SUBSET_TAG)) or 0
            found.append(Candidate(str(v.version), metrics, int(subset), place=first))
    return found


def choose(versions: Iterable[ModelVersion]) -> Choice:
    """The fold over the candidates, with a decision also for each superseded version."""
    versions = list(versions)
    choice = fold(candidates(versions))
    latest = {str(v.version) for v, _ in latest_of_each_run(versions).values()}
    superseded = {
        str(v.version): f"superseded by a later version of run {v.run_id}"
        for v in versions
        if str(v.version) not in latest
    }
    return Choice(choice.champion, {**superseded, **choice.decisions})
