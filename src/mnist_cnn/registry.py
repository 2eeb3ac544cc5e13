"""Registry aliases: which version of `mnist-cnn` is the challenger and which the champion.

`promote` is called once per pipeline run, after the version is registered and its gate
metrics are known. It tags the version (its metrics, git commit, DVC experiment, data digest,
augment, subset), points `challenger` at it, and then sets `champion` to the version the gate
selects from ALL versions (docs/registry.md has the rule, the margins and the argument why
concurrent promotions converge without a lock):

- Eligible: a version with a readable `test_accuracy` tag and no `subset` tag (a model
  trained on part of the data is never champion).
- The gate: a challenger replaces the champion only if it is not worse than the champion
  beyond a noise margin on any gate metric both have, and better beyond the margin on at
  least one. A metric one of the two lacks is unknown: it is not compared, neither blocking
  nor counting as better (test_accuracy is always known, so there is always a basis).
- The champion is a fold of the gate over the eligible versions in version-number order, a
  pure function of the versions and their tags: the order promotions happen in never matters.
  Each version's `gate` tag says what the fold decided for it, and why.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from mnist_cnn import tracking
from mnist_cnn.config import Params

CHAMPION = "champion"
CHALLENGER = "challenger"
ACCURACY_TAG = "test_accuracy"
SUBSET_TAG = "subset"
GATE_TAG = "gate"
GATE_METRICS = ("test_accuracy", "ood_accuracy", "robust_mean_accuracy")

# Seed-to-seed sample std of each gate metric for one training setting (fractions, not points).
SEED_STD = {
    # Measured: `make ablation ABLATION_ARGS="-S train.precision=bf16"`, augment on, seeds 0-4, 5 epochs,
    # the report's network (docs/registry.md gives the runs). Sample std over the 5 seeds.
    "test_accuracy": 0.0013,  # 99.02 +- 0.13%
    "ood_accuracy": 0.026,  # 91.1 +- 2.6%: other writers' digits vary far more from seed to seed
    "robust_mean_accuracy": 0.011,  # 75.7 +- 1.1% (MNIST-C mean)
}
# Two versions are two single runs: their difference has std sqrt(2) x the seed std, and a
# margin of 2 of those lets a same-setting rerun look worse (or better) by chance in ~2% of
# cases per metric. So a champion is not replaced by a rerun that merely drew a lucky seed.
MARGIN_Z = 2.0
MARGINS = {metric: round(MARGIN_Z * math.sqrt(2) * std, 4) for metric, std in SEED_STD.items()}


@dataclass(frozen=True)
class Candidate:
    """A version as the gate sees it: its known gate metrics, and the subset it was trained on."""

    version: str
    metrics: Mapping[str, float]
    subset: int = 0


@dataclass(frozen=True)
class Choice:
    champion: str | None  # None: no eligible version
    decisions: dict[str, str] = field(default_factory=dict)  # version -> its `gate` tag


def gate(new: Mapping[str, float], champion: Mapping[str, float], champion_version: str) -> tuple[bool, str]:
    """(promoted?, reason): the rule, comparing a challenger's metrics with the champion's."""
    shared = [m for m in GATE_METRICS if m in new and m in champion]
    unknown = [m for m in GATE_METRICS if m not in shared]
    against = f"of version {champion_version}"
    worse = [
        f"{m} {new[m]:.4f} < {champion[m]:.4f} - {MARGINS[m]:.4f}" for m in shared if new[m] < champion[m] - MARGINS[m]
    ]
    if worse:
        return False, f"kept: {'; '.join(worse)} {against}"
    better = [
        f"{m} {new[m]:.4f} > {champion[m]:.4f} + {MARGINS[m]:.4f}" for m in shared if new[m] > champion[m] + MARGINS[m]
    ]
    note = f" ({', '.join(unknown)} unknown, not compared)" if unknown else ""
    if not better:
        within = ", ".join(f"{m} {new[m]:.4f} vs {champion[m]:.4f}" for m in shared)
        return False, f"kept: none better than version {champion_version} beyond its margin ({within}){note}"
    return True, f"promoted: {'; '.join(better)} {against}, none worse beyond its margin{note}"


def fold(candidates: Iterable[Candidate]) -> Choice:
    """The champion the rule selects: the first eligible version, then each later one that the gate
    promotes over the champion so far. Order by version number, so the result depends only on the set."""
    champion: Candidate | None = None
    decisions = {}
    for candidate in sorted(candidates, key=lambda c: int(c.version)):
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


def candidates(versions: Iterable[ModelVersion]) -> list[Candidate]:
    """The versions that have a readable test accuracy, read from their tags (unreadable gate
    metrics are unknown). Versions without one (not yet tagged, or registered by hand) are left out."""
    found = []
    for v in versions:
        metrics = {m: value for m in GATE_METRICS if (value := _number(v.tags.get(m))) is not None}
        if ACCURACY_TAG in metrics:
            subset = _number(v.tags.get(SUBSET_TAG)) or 0
            found.append(Candidate(str(v.version), metrics, int(subset)))
    return found


def choose(versions: Iterable[ModelVersion]) -> Choice:
    return fold(candidates(versions))


@dataclass(frozen=True)
class Promotion:
    version: str
    champion: str | None  # the champion after promotion (None: there is none)
    previous: str | None  # the champion before it
    decision: str  # the gate's decision for `version`, as in its `gate` tag

    @property
    def champion_moved(self) -> bool:
        return self.champion != self.previous

    def message(self) -> str:
        if self.champion is None:
            champion = "not set"
        elif self.champion_moved:
            champion = f"-> version {self.champion}" + (f" (was {self.previous})" if self.previous else "")
        else:
            champion = f"stays version {self.champion}"
        return f"registry: version {self.version} {self.decision}; champion {champion}; challenger -> {self.version}"


def version_tags(
    metrics: Mapping[str, float], params: Params, exp_name: str, commit: str, data_digest: str
) -> dict[str, str]:
    """The tags promote writes on a version; test_accuracy last, as it makes the version a candidate."""
    tags = {"git.commit": commit, "augment": str(params.augment)}
    if exp_name:
        tags["dvc.exp_name"] = exp_name
    if data_digest:
        tags["data.digest"] = data_digest
    if params.data.subset > 0:
        tags[SUBSET_TAG] = str(params.data.subset)
    tags.update({m: repr(float(metrics[m])) for m in GATE_METRICS[1:] if m in metrics})
    tags[ACCURACY_TAG] = repr(float(metrics[ACCURACY_TAG]))
    return tags


def _versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    versions, token = [], None
    while True:
        page = client.search_model_versions(f"name='{name}'", page_token=token)
        versions.extend(page)
        if not (token := page.token):
            return versions


def _alias(client: MlflowClient, name: str, alias: str) -> str | None:
    version = client.get_registered_model(name).aliases.get(alias)
    return None if version is None else str(version)


def _inputs(versions: list[ModelVersion]) -> list[Candidate]:
    return sorted(candidates(versions), key=lambda c: int(c.version))


# A write can fail when another promoter writes the same row at the same moment (MLflow's sqlite
# store reads, then inserts, a first-time alias or tag). The loop then lists again and redoes it.
MAX_FAILED_WRITES = 10


def _converge(client: MlflowClient, name: str) -> Choice:
    """Set `champion` and the `gate` tags to the fold of the versions, until the listing the fold was
    computed from is unchanged after the writes (docs/registry.md: why this needs no lock)."""
    failures = 0
    while True:
        listing = _versions(client, name)
        choice = choose(listing)
        try:
            for v in listing:
                decision = choice.decisions.get(str(v.version))
                if decision is not None and v.tags.get(GATE_TAG) != decision:
                    client.set_model_version_tag(name, str(v.version), GATE_TAG, decision)
            if choice.champion is not None and _alias(client, name, CHAMPION) != choice.champion:
                client.set_registered_model_alias(name, CHAMPION, choice.champion)
        except MlflowException:
            failures += 1
            if failures > MAX_FAILED_WRITES:
                raise
            time.sleep(0.05 * failures)
            continue
        if _inputs(_versions(client, name)) == _inputs(listing):
            return choice


def _retry(write: Callable[..., object], *args: str) -> None:
    for attempt in range(MAX_FAILED_WRITES + 1):
        try:
            write(*args)
            return
        except MlflowException:
            if attempt == MAX_FAILED_WRITES:
                raise
            time.sleep(0.05 * (attempt + 1))  # let the other writer's transaction finish


def promote(
    client: MlflowClient,
    version: str,
    metrics: Mapping[str, float],
    params: Params,
    *,
    name: str = tracking.REGISTERED_MODEL,
    exp_name: str | None = None,
    commit: str | None = None,
    data_digest: str = "",
) -> Promotion:
    """Tag `version` with its gate metrics, point `challenger` at it, and set `champion` to the
    version the gate selects from all versions. `metrics` needs test_accuracy; ood_accuracy and
    robust_mean_accuracy are optional. exp_name defaults to $DVC_EXP_NAME, commit to tracking.git_commit()."""
    version = str(version)
    if ACCURACY_TAG not in metrics:
        raise ValueError(f"promote: metrics need '{ACCURACY_TAG}', got {sorted(metrics)}")
    if unknown := set(metrics) - set(GATE_METRICS):
        raise ValueError(f"promote: unknown gate metrics {sorted(unknown)}; expected some of {GATE_METRICS}")
    if not all(math.isfinite(float(value)) for value in metrics.values()):
        raise ValueError(f"promote: gate metrics must be finite numbers, got {dict(metrics)}")
    exp_name = os.environ.get("DVC_EXP_NAME", "") if exp_name is None else exp_name
    commit = tracking.git_commit() if commit is None else commit

    previous = _alias(client, name, CHAMPION)
    tags = version_tags(metrics, params, exp_name, commit, data_digest)
    # Re-evaluating a version: drop the optional tags this evaluation does not give.
    stale = {SUBSET_TAG, "dvc.exp_name", "data.digest", *GATE_METRICS} - set(tags)
    for key in stale & set(client.get_model_version(name, version).tags):
        _retry(client.delete_model_version_tag, name, version, key)
    for key, value in tags.items():
        _retry(client.set_model_version_tag, name, version, key, value)
    _retry(client.set_registered_model_alias, name, CHALLENGER, version)

    choice = _converge(client, name)
    return Promotion(version, choice.champion, previous, choice.decisions[version])
