"""Registry aliases: which version of `mnist-cnn` is the challenger and which the champion.

Called by evaluate right after it registers a version. The version gets tags
(its test accuracy, every param as `param.<dotted key>`, the git commit, the
DVC experiment name, and `subset=<n>` when trained on part of the data).
`challenger` always moves to the version just evaluated; `champion` moves to
it only when its test accuracy is strictly greater than the current
champion's (read from that version's `test_accuracy` tag). Ties keep the old
champion, and a model trained on a subset is never champion.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from mlflow import MlflowClient

from mnist_cnn import tracking
from mnist_cnn.config import Params, flat

CHAMPION = "champion"
CHALLENGER = "challenger"
ACCURACY_TAG = "test_accuracy"
SUBSET_TAG = "subset"


@dataclass(frozen=True)
class Promotion:
    version: str
    champion: str | None  # the champion version after promotion (None: there is none)
    champion_moved: bool
    reason: str

    def message(self) -> str:
        if self.champion_moved:
            return f"registry: champion -> version {self.version} ({self.reason}); challenger -> {self.version}"
        held = f"stays version {self.champion}" if self.champion else "not set"
        return f"registry: champion {held} ({self.reason}); challenger -> {self.version}"


def version_tags(test_accuracy: float, params: Params, exp_name: str, commit: str) -> dict[str, str]:
    tags = {ACCURACY_TAG: repr(float(test_accuracy)), "git.commit": commit}
    tags.update({f"param.{key}": str(value) for key, value in flat(params).items()})
    if exp_name:
        tags["dvc.exp_name"] = exp_name
    if params.data.subset > 0:
        tags[SUBSET_TAG] = str(params.data.subset)
    return tags


def _champion(client: MlflowClient, name: str) -> tuple[str | None, float | None]:
    """(version, test accuracy) of the current champion; (None, None) when there is none."""
    # A missing alias raises INVALID_PARAMETER_VALUE, like a malformed one: look before asking.
    if CHAMPION not in client.get_registered_model(name).aliases:
        return None, None
    current = client.get_model_version_by_alias(name, CHAMPION)
    try:
        accuracy = float(current.tags[ACCURACY_TAG])
    except (KeyError, ValueError):
        accuracy = None
    return str(current.version), accuracy if accuracy is not None and math.isfinite(accuracy) else None


def promote(
    client: MlflowClient,
    version: str,
    test_accuracy: float,
    params: Params,
    *,
    name: str = tracking.REGISTERED_MODEL,
    exp_name: str | None = None,
    commit: str | None = None,
) -> Promotion:
    """Tag `version`, point `challenger` at it, and make it champion if it beats the current one.

    exp_name defaults to $DVC_EXP_NAME and commit to tracking.git_commit().
    """
    version = str(version)
    exp_name = os.environ.get("DVC_EXP_NAME", "") if exp_name is None else exp_name
    commit = tracking.git_commit() if commit is None else commit
    # One promotion at a time: two parallel ones could both read the old champion and the worse
    # model be set last, and MLflow fails one of two first-time settings of an alias.
    with tracking.store_lock(client.tracking_uri):
        return _promote(client, name, version, test_accuracy, params, exp_name, commit)


def _promote(
    client: MlflowClient, name: str, version: str, test_accuracy: float, params: Params, exp_name: str, commit: str
) -> Promotion:
    for key, value in version_tags(test_accuracy, params, exp_name, commit).items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, CHALLENGER, version)

    champion, champion_accuracy = _champion(client, name)
    if champion == version:
        return Promotion(version, champion, False, "already champion")
    if params.data.subset > 0:
        return Promotion(version, champion, False, f"trained on a subset of {params.data.subset} images")
    if champion is not None and champion_accuracy is None:
        # Someone set the alias by hand on a version we cannot compare: leave their choice alone.
        return Promotion(version, champion, False, f"champion has no readable '{ACCURACY_TAG}' tag")
    if champion_accuracy is not None and not test_accuracy > champion_accuracy:
        relation = "=" if test_accuracy == champion_accuracy else "<"
        reason = f"test accuracy {test_accuracy:.2%} {relation} champion's {champion_accuracy:.2%}"
        return Promotion(version, champion, False, reason)
    client.set_registered_model_alias(name, CHAMPION, version)
    if champion is None:
        return Promotion(version, version, True, "first champion")
    reason = f"test accuracy {test_accuracy:.2%} > {champion_accuracy:.2%} of version {champion}"
    return Promotion(version, version, True, reason)
