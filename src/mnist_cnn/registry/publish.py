"""Publishing a model: log it, register it as a version of `mnist-cnn`, tag the version with the few
things a person scans in the registry (docs/registry.md) and move the aliases (`challenger`: the newest
eligible version; `champion`: the fold of the gate over all versions, registry.gate, which reads each
version's metrics from its run). The register stage is the only caller that writes to the registry.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec

import mnist_cnn
from mnist_cnn.config import Params
from mnist_cnn.core.model import Net
from mnist_cnn.files import save_tensors
from mnist_cnn.paths import MODEL_PATH, REFUSAL_STATS
from mnist_cnn.registry import gate
from mnist_cnn.serving import served
from mnist_cnn.tracking import provenance
from mnist_cnn.tracking.store import REGISTERED_MODEL, retried

DIGEST_TAG = "artifacts.digest"  # the sha256 of the weights and refusal statistics a version serves
# The headline accuracies a version carries as tags (test_accuracy last: it makes the version a candidate);
# every other metric the gate reads is on the version's run.
HEADLINE = ("ood_accuracy", "robust_mean_accuracy", gate.ACCURACY_TAG)
TRAIN_RUN_TAG = "train_run_id"  # on a run whose model another run trained (tracking.store)
# Declared, not inferred from an example: inference warns that integer columns cannot hold missing
# values, and a digit is never missing. The records of served.answers; reason is None when answered.
SIGNATURE = ModelSignature(
    inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, 28, 28))]),
    outputs=Schema([ColSpec("long", "digit"), ColSpec("double", "probability"), ColSpec("string", "reason", False)]),
)


def artifacts_digest(*paths: Path) -> str:
    """The sha256 of the files' bytes, in order: what makes two versions serve the same model."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def find_version(client: MlflowClient, run_id: str, digest: str, name: str = REGISTERED_MODEL) -> ModelVersion | None:
    """The version this run already registered with these exact artifacts, if any."""
    for v in client.search_model_versions(f"name='{name}' and run_id='{run_id}'"):
        if v.tags.get(DIGEST_TAG) == digest:
            return v
    return None


def logged_model_id(version: ModelVersion) -> str | None:
    """The MLflow 3 logged model a version was registered from (its source is `models:/<model id>`)."""
    return version.source.removeprefix("models:/") if version.source.startswith("models:/m-") else None


def log_and_register(net: Net, stats: dict[str, torch.Tensor], example: np.ndarray, digest: str) -> tuple[str, str]:
    """Log the served model (network + refusal statistics, mnist_cnn.serving.served) to the active run
    and register it as a new version; returns (version, MLflow 3 logged-model id)."""
    net = net.cpu()
    # The python model's artifacts: the weights and the statistics, as files MLflow copies into the model.
    with tempfile.TemporaryDirectory(prefix="mnist-cnn-model-") as folder:
        checkpoint, statistics = Path(folder) / MODEL_PATH.name, Path(folder) / REFUSAL_STATS.name
        save_tensors(checkpoint, {"state_dict": net.state_dict(), "arch": net.arch})
        save_tensors(statistics, stats)
        # Registering prints "Created version ..." to stderr; the register stage prints its own line.
        with contextlib.redirect_stderr(io.StringIO()):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=Path(served.__file__).with_name("model_code.py"),  # models from code, no pickle
                artifacts={"checkpoint": str(checkpoint), "refusal": str(statistics)},
                signature=SIGNATURE,
                input_example=example,
                # Ship the package with the model so `models:/mnist-cnn/<v>` loads anywhere (and each
                # version loads with the code it was registered with); explicit requirements skip
                # MLflow's slow dependency inference.
                code_paths=[str(Path(mnist_cnn.__file__).parent)],
                pip_requirements=[
                    f"{name}=={metadata.version(name)}"
                    for name in ("torch", "mlflow", "numpy", "pandas", "scipy", "scikit-learn")
                ],
                registered_model_name=REGISTERED_MODEL,
                # log_model copies the run's metrics of its step to the model; at step -1 there are none,
                # so the model carries only the test metrics the register stage links to it.
                step=-1,
            )
    version = str(info.registered_model_version)
    MlflowClient().set_model_version_tag(REGISTERED_MODEL, version, DIGEST_TAG, digest)
    return version, info.model_id


@dataclass(frozen=True)
class Promotion:
    version: str
    champion: str | None  # the champion after promotion (None: there is none)
    previous: str | None  # the champion before it
    decision: str  # the gate's decision for `version`, as in its `gate` tag
    challenger: str | None = None  # the challenger after promotion (an eligible version only)

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
        if self.challenger == self.version:
            challenger = f"challenger -> {self.version}"
        else:  # a subset model is nobody's challenger
            challenger = f"challenger stays {f'version {self.challenger}' if self.challenger else 'unset'}"
        return f"registry: version {self.version} {self.decision}; champion {champion}; {challenger}"


def version_tags(
    metrics: Mapping[str, float], params: Params, exp_name: str, commit: str, data_digest: str
) -> dict[str, str]:
    """The tags promote writes on a version (with `gate` and artifacts.digest, at most 9): where it came from
    and its headline accuracies, test_accuracy last, as it makes the version a candidate."""
    tags = {"git.commit": commit}
    if exp_name:
        tags["dvc.exp_name"] = exp_name
    if data_digest:
        tags["data.digest"] = data_digest
    if params.data.subset > 0:
        tags[gate.SUBSET_TAG] = str(params.data.subset)
    tags.update({m: repr(float(metrics[m])) for m in HEADLINE if m in metrics})
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


def _records(client: MlflowClient, versions: list[ModelVersion], known: dict[str, gate.RunRecord]) -> None:
    """Add to `known` what the gate reads from the runs of `versions` not yet read (a deleted run: nothing)."""
    for run_id in {v.run_id for v in versions if v.run_id} - set(known):
        try:
            run = client.get_run(run_id)
        except MlflowException:
            continue
        known[run_id] = gate.RunRecord(dict(run.data.metrics), run.data.tags.get(TRAIN_RUN_TAG, run_id))


def _inputs(versions: list[ModelVersion], runs: dict[str, gate.RunRecord]) -> list[gate.Candidate]:
    return sorted(gate.candidates(versions, runs), key=lambda c: int(c.version))


# A write can fail when another promoter writes the same row at the same moment (MLflow's sqlite
# store reads, then inserts, a first-time alias or tag). The write, or the round, is then redone.
WRITE_TRIES = 11


def current_choice(client: MlflowClient, name: str, margin: Mapping[str, float]) -> gate.Choice:
    """The fold of the gate over the versions as they are now (what the aliases and tags should say)."""
    listing, runs = _versions(client, name), {}
    _records(client, listing, runs)
    return gate.choose(listing, runs, margin)


def _write_round(
    client: MlflowClient, name: str, runs: dict[str, gate.RunRecord], margin: Mapping[str, float]
) -> tuple[list[ModelVersion], gate.Choice]:
    """List the versions, and write the `gate` tags and the `champion` alias their fold gives."""
    listing = _versions(client, name)
    _records(client, listing, runs)
    choice = gate.choose(listing, runs, margin)
    for v in listing:
        decision = choice.decisions.get(str(v.version))
        if decision is not None and v.tags.get(gate.GATE_TAG) != decision:
            client.set_model_version_tag(name, str(v.version), gate.GATE_TAG, decision)
    if choice.champion is not None and _alias(client, name, gate.CHAMPION) != choice.champion:
        client.set_registered_model_alias(name, gate.CHAMPION, choice.champion)
    return listing, choice


def _converge(client: MlflowClient, name: str, margin: Mapping[str, float]) -> gate.Choice:
    """Write rounds until the listing the fold was computed from is unchanged after the writes
    (docs/registry.md: why this needs no lock). A run's metrics are read once per promotion: they are
    written before its version is promoted."""
    runs: dict[str, gate.RunRecord] = {}
    while True:
        listing, choice = retried(lambda: _write_round(client, name, runs, margin), attempts=WRITE_TRIES)
        again = _versions(client, name)
        _records(client, again, runs)
        if _inputs(again, runs) == _inputs(listing, runs):
            return choice


def promote(
    client: MlflowClient,
    version: str,
    metrics: Mapping[str, float],
    params: Params,
    *,
    name: str = REGISTERED_MODEL,
    exp_name: str | None = None,
    commit: str | None = None,
    data_digest: str = "",
) -> Promotion:
    """Tag `version` with its headline metrics, point `challenger` at it if it is eligible (not trained on a
    subset), and set `champion` to the version the gate selects from all versions, with the margins of
    params.register. `metrics` needs test_accuracy; the gate reads its other metrics from each version's run
    (the register stage logs them there first; a group with a metric the run lacks is not compared).
    exp_name defaults to $DVC_EXP_NAME, commit to provenance.git_commit()."""
    version = str(version)
    if gate.ACCURACY_TAG not in metrics:
        raise ValueError(f"promote: metrics need '{gate.ACCURACY_TAG}', got {sorted(metrics)}")
    if not all(math.isfinite(float(metrics[m])) for m in HEADLINE if m in metrics):
        raise ValueError(f"promote: headline metrics must be finite numbers, got {dict(metrics)}")
    exp_name = os.environ.get("DVC_EXP_NAME", "") if exp_name is None else exp_name
    commit = provenance.git_commit() if commit is None else commit

    previous = _alias(client, name, gate.CHAMPION)
    tags = version_tags(metrics, params, exp_name, commit, data_digest)
    # Re-tagging a version: drop the optional tags this promotion does not give (and the metric copies and
    # `augment` tag that versions carried before the gate read their runs).
    optional = {gate.SUBSET_TAG, "dvc.exp_name", "data.digest", "augment", *gate.GATE_METRICS, *HEADLINE}
    stale = {k for k in client.get_model_version(name, version).tags if k in optional or k.startswith("robust_")}
    for key in stale - set(tags):
        retried(lambda key=key: client.delete_model_version_tag(name, version, key), attempts=WRITE_TRIES)
    for key, value in tags.items():
        retried(lambda k=key, v=value: client.set_model_version_tag(name, version, k, v), attempts=WRITE_TRIES)
    if params.data.subset == 0:  # a smoke run is never champion, so it is nobody's challenger either
        retried(lambda: client.set_registered_model_alias(name, gate.CHALLENGER, version), attempts=WRITE_TRIES)

    choice = _converge(client, name, gate.margins(params.register))
    challenger = _alias(client, name, gate.CHALLENGER)
    return Promotion(version, choice.champion, previous, choice.decisions[version], challenger)
