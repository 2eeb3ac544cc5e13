"""The champion gate: which registered version of `mnist-cnn` is the champion, a pure function of
the versions and their tags (registry.publish writes them). docs/registry.md has the rule, the
margins and why concurrent promotions converge without a lock. In short: a version trained on a
subset, or without a readable `test_accuracy` tag, is never champion; a challenger replaces the
champion only if it is worse beyond a noise margin on no group of conditions both have (clean,
geometric, photometric, ood, and the refusal's two sides: non-digits refused, digits answered; a group's
score is the mean of its metrics, a refused share of digits counted as 1 - share; a group with a metric
either lacks is unknown, not compared) and better beyond it on one; the champion is the fold of
that rule over the versions in version-number order, each trained model's latest version in the place of its
first. The gate reads a version's metrics from its MLflow run (`RunRecord`) and its margins from params
(`register:` in params.yaml); it reads and writes nothing itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from mlflow.entities.model_registry import ModelVersion

from mnist_cnn.config import (
    AFFINE_CORRUPTIONS,
    CORRUPTIONS,
    NONDIGIT_KINDS,
    ROBUST_ROTATION,
    ROBUST_SHIFT,
    RegisterParams,
)

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
    "refusal": tuple(f"refused_{k}" for k in NONDIGIT_KINDS),  # generated pictures that are not digits, refused
    "answered": ("test_refused", "ood_refused"),  # digits answered, not refused: these score as 1 - the share
}
LOWER_IS_BETTER = frozenset(GROUPS["answered"])
GATE_METRICS = tuple(m for members in GROUPS.values() for m in members)  # the run metrics the gate reads


def margins(register: RegisterParams) -> dict[str, float]:
    """Each group's noise margin: two single runs differ with std sqrt(2) x the seed std, and the margin is
    margin_z of those (docs/registry.md: why, and where the seed stds come from)."""
    std = register.seed_std.model_dump()
    return {group: round(register.margin_z * math.sqrt(2) * std[group], 4) for group in GROUPS}


def scores(metrics: Mapping[str, float]) -> dict[str, float]:
    """Each group's score, the mean of its metrics (higher is better: a refused share of digits counts as
    1 - share); only the groups whose metrics are all known."""

    def value(m: str) -> float:
        return 1 - metrics[m] if m in LOWER_IS_BETTER else metrics[m]

    return {g: sum(value(m) for m in ms) / len(ms) for g, ms in GROUPS.items() if all(m in metrics for m in ms)}


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


def gate(
    new: Mapping[str, float], champion: Mapping[str, float], champion_version: str, margin: Mapping[str, float]
) -> tuple[bool, str]:
    """(promoted?, reason): the rule, comparing the group scores of a challenger's metrics with the champion's,
    each group within its `margin`."""
    new, champion = scores(new), scores(champion)
    shared = [g for g in GROUPS if g in new and g in champion]
    unknown = [g for g in GROUPS if g not in shared]
    against = f"of version {champion_version}"
    worse = [
        f"{g} {new[g]:.4f} < {champion[g]:.4f} - {margin[g]:.4f}" for g in shared if new[g] < champion[g] - margin[g]
    ]
    if worse:
        return False, f"kept: {'; '.join(worse)} {against}"
    better = [
        f"{g} {new[g]:.4f} > {champion[g]:.4f} + {margin[g]:.4f}" for g in shared if new[g] > champion[g] + margin[g]
    ]
    note = f" ({', '.join(unknown)} unknown, not compared)" if unknown else ""
    if not better:
        within = ", ".join(f"{g} {new[g]:.4f} vs {champion[g]:.4f}" for g in shared)
        return False, f"kept: none better than version {champion_version} beyond its margin ({within}){note}"
    return True, f"promoted: {'; '.join(better)} {against}, none worse beyond its margin{note}"


def fold(candidates: Iterable[Candidate], margin: Mapping[str, float]) -> Choice:
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
            promoted, decisions[candidate.version] = gate(candidate.metrics, champion.metrics, champion.version, margin)
            champion = candidate if promoted else champion
    return Choice(champion.version if champion else None, decisions)


def _number(text: str | float | None) -> float | None:
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class RunRecord:
    """What the gate reads from a version's MLflow run: its metrics (latest values) and the run that trained
    its model (itself, for the train stage's run; the `train_run_id` tag for a later execution's run)."""

    metrics: Mapping[str, float]
    trained_by: str


def model_of(version: ModelVersion, runs: Mapping[str, RunRecord]) -> str:
    """What identifies the trained model a version serves: its training run, else its own run, else itself."""
    record = runs.get(version.run_id or "")
    if record is not None and record.trained_by:
        return record.trained_by
    return version.run_id or f"version {version.version}"


def latest_of_each_model(
    versions: Iterable[ModelVersion], runs: Mapping[str, RunRecord]
) -> dict[str, tuple[ModelVersion, int]]:
    """trained model -> (its latest version, its first version number)."""
    models: dict[str, list[ModelVersion]] = {}
    for v in versions:
        models.setdefault(model_of(v, runs), []).append(v)
    return {m: (max(vs, key=lambda v: int(v.version)), min(int(v.version) for v in vs)) for m, vs in models.items()}


def candidates(versions: Iterable[ModelVersion], runs: Mapping[str, RunRecord]) -> list[Candidate]:
    """Each trained model's latest version, if it has a readable `test_accuracy` tag (promote writes it last),
    with the gate metrics of its run (a metric the run lacks is unknown; the tag stands in for a run without
    test_accuracy). Versions without the tag (not yet tagged, or registered by hand) are left out."""
    found = []
    for v, first in latest_of_each_model(versions, runs).values():
        accuracy = _number(v.tags.get(ACCURACY_TAG))
        if accuracy is None:
            continue
        record = runs.get(v.run_id or "")
        logged = record.metrics if record is not None else {}
        metrics = {ACCURACY_TAG: accuracy}
        metrics |= {m: value for m in GATE_METRICS if (value := _number(logged.get(m))) is not None}
        subset = _number(v.tags.get(SUBSET_TAG)) or 0
        found.append(Candidate(str(v.version), metrics, int(subset), place=first))
    return found


def choose(versions: Iterable[ModelVersion], runs: Mapping[str, RunRecord], margin: Mapping[str, float]) -> Choice:
    """The fold over the candidates, with a decision also for each superseded version."""
    versions = list(versions)
    choice = fold(candidates(versions, runs), margin)
    latest = {m: str(v.version) for m, (v, _) in latest_of_each_model(versions, runs).items()}
    superseded = {}
    for v in versions:
        model = model_of(v, runs)
        if str(v.version) != latest[model]:
            newer = latest[model]
            superseded[str(v.version)] = f"superseded by version {newer} of the same trained model (run {model})"
    return Choice(choice.champion, {**superseded, **choice.decisions})
