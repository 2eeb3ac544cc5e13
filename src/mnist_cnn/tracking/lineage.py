"""Dataset lineage: the data a run trained and was tested on, as MLflow datasets. Their digest is
DVC's hash of data/processed as dvc.lock records it, so an MLflow run and a commit's dvc.lock name
the same data (the files are hashed when there is no dvc.lock, for a stage run by hand)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import yaml
from mlflow.data.dataset_source import DatasetSource

from mnist_cnn.config import Params
from mnist_cnn.data.sources import sources
from mnist_cnn.paths import DVC_LOCK, PROCESSED_DIR


class DvcDataSource(DatasetSource):
    """Where the data came from: the DVC-tracked directory and the sources the download stage
    tries in order (every one gives the same SHA-256-verified files, so the digest decides)."""

    def __init__(self, path: str, origins: list[str]) -> None:
        self.path, self.origins = path, origins

    @staticmethod
    def _get_source_type() -> str:
        return "dvc"

    def load(self, **kwargs: Any) -> str:
        return self.path

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False  # built explicitly, never guessed from a string

    @classmethod
    def _resolve(cls, raw_source: Any) -> DvcDataSource:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "origins": self.origins}

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> DvcDataSource:
        return cls(source_dict["path"], list(source_dict.get("origins", [])))


def data_digest(lock: Path = DVC_LOCK, directory: Path = PROCESSED_DIR) -> str:
    """DVC's md5 of data/processed from dvc.lock ("<md5>.dir"), else an md5 of its files."""
    try:
        stages = yaml.safe_load(lock.read_text())["stages"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        stages = {}
    for stage in stages.values():
        for out in stage.get("outs", []):
            if Path(out.get("path", "")) == directory and out.get("md5"):
                return str(out["md5"])
    digest = hashlib.md5()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(path.relative_to(directory).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def dataset(params: Params, split: str, images: np.ndarray, labels: np.ndarray) -> mlflow.data.Dataset:
    """One split as an MLflow dataset (schema and size from the arrays, digest from DVC)."""
    source = DvcDataSource(str(PROCESSED_DIR / f"{split}.pt"), [label for label, _ in sources(params.data)])
    name = f"mnist-{split}" + (f"[:{params.data.subset}]" if split == "train" and params.data.subset else "")
    return mlflow.data.from_numpy(images, targets=labels, source=source, name=name, digest=data_digest())


def log_input(dataset: mlflow.data.Dataset, context: str) -> None:
    """mlflow.log_input, again if it lost a race: two runs logging the same new dataset at once (two
    experiments started together) can both insert it, and the second fails on the unique key
    (experiment, name, digest). The retry finds the row the first one wrote."""
    # Here, not at the top: MLflow imports this module for its entry point while mnist_cnn.tracking.store,
    # which imports mlflow, may be half imported.
    from mnist_cnn.tracking.store import retried

    retried(
        lambda: mlflow.log_input(dataset, context=context),
        attempts=2,
        when=lambda error: any(word in error.message.lower() for word in ("unique", "duplicate")),
    )
