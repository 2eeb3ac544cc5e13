"""MLflow: where the store is, and the one run that spans a pipeline execution: the train stage
creates it and writes its id to models/mlflow_run.json, the later stages reopen it."""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import TypeVar

import mlflow
import psutil
from filelock import FileLock, Timeout
from mlflow.exceptions import MlflowException

from mnist_cnn.cli import UserError
from mnist_cnn.config import Params, flat
from mnist_cnn.files import read_json, write_json
from mnist_cnn.paths import RUN_FILE

# A stage prints its own lines: MLflow's INFO notes (system-metrics monitor, input-example
# validation) and the progress bars of its internal downloads are not among them.
logging.getLogger("mlflow").setLevel(logging.WARNING)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

EXPERIMENT = "mnist-cnn"
REGISTERED_MODEL = "mnist-cnn"
# System metrics (CPU, memory, disk, network; GPU with nvidia-ml-py) every few seconds, not
# MLflow's default 10 s: a training run here takes seconds to minutes. The env variable wins.
SYSTEM_METRICS_INTERVAL_S = 2.0
T = TypeVar("T")


def store_root() -> Path:
    """The repository that holds mlruns/: DVC_ROOT names it even when `dvc exp run --temp/--queue` runs the
    stage in a copy under .dvc/tmp/exps/, so every experiment lands in the one store of the checkout."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def local_store() -> tuple[str, str]:
    """(tracking URI, artifact location) of the checkout's own sqlite store."""
    mlruns = store_root() / "mlruns"
    return f"sqlite:///{mlruns / 'mlflow.db'}", (mlruns / "artifacts").as_uri()


def setup() -> str:
    """Point MLflow at the store (MLFLOW_TRACKING_URI wins) and return the experiment id."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    # A tracking server that is down fails the stage in seconds, not after 7 retries (minutes).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    uri, artifact_location = (uri, None) if uri else local_store()
    mlflow.set_tracking_uri(uri)
    try:
        with _sqlite_opened(uri):  # MLflow creates a new store's tables when it first opens it
            experiment = mlflow.get_experiment_by_name(EXPERIMENT)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return mlflow.create_experiment(EXPERIMENT, artifact_location=artifact_location)
        except MlflowException:  # created meanwhile by a parallel run
            experiment = mlflow.get_experiment_by_name(EXPERIMENT)
            if experiment is None:
                raise
            return experiment.experiment_id
    except MlflowException as error:
        raise UserError(f"MLflow store {uri}: {error.message.splitlines()[0]}") from None


def ui_url(base: str) -> str:
    """The experiment's page in the MLflow UI at `base`, in the training view (runs, metrics, models)
    rather than the GenAI view MLflow 3 opens by default."""
    return f"{base}/#/experiments/{setup()}?workflowType=machine_learning"


@contextmanager
def _sqlite_opened(uri: str, timeout: float = 300) -> Iterator[None]:
    """For a sqlite store: create and open the file once (MLflow retries a database it cannot open for
    ~100 s, meant for network databases), then hold a lock file beside it: two stages opening a new store
    at once (queued experiments in a fresh checkout) would both create its tables, and one would fail."""
    path = uri.removeprefix("sqlite:///")  # as MLflow reads it: absolute after a 4th '/'
    if path == uri or path in ("", ":memory:"):  # no database file
        yield
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with closing(sqlite3.connect(path, timeout=30)) as connection:
            connection.execute("PRAGMA schema_version").fetchone()
    except OSError as error:
        raise UserError(f"MLflow store {uri}: cannot create {error.filename} ({error.strerror})") from None
    except sqlite3.Error as error:
        raise UserError(f"MLflow store {uri}: cannot open {path} ({error})") from None
    try:
        with FileLock(f"{path}.lock", timeout=timeout):
            yield
    except Timeout:
        raise UserError(f"MLflow store {uri}: {path}.lock held by another process for {timeout:.0f} s") from None


def retried(
    call: Callable[[], T],
    *,
    attempts: int,
    when: Callable[[MlflowException], bool] = lambda error: True,
    pause_s: float = 0.05,
) -> T:
    """call(), again after an MlflowException that `when` accepts, up to `attempts` tries in all, each
    pause a little longer (to let the other writer's transaction finish); any other error at once."""
    for attempt in range(1, attempts):
        try:
            return call()
        except MlflowException as error:
            if not when(error):
                raise
            time.sleep(pause_s * attempt)
    return call()


def git_commit() -> str:
    """The commit the run was made from (the experiment's baseline under dvc exp run)."""
    if rev := os.environ.get("DVC_EXP_BASELINE_REV"):
        return rev
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        return result.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextmanager
def ended_as(run: mlflow.ActiveRun) -> Iterator[mlflow.ActiveRun]:
    """End the run FINISHED, or KILLED on Ctrl-C / SIGTERM, or FAILED on an error."""
    try:
        yield run
    except BaseException as error:
        mlflow.end_run("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise
    mlflow.end_run("FINISHED")


def mark_dead_runs_failed(experiment_id: str) -> list[str]:
    """Runs left RUNNING by a train stage on this host whose process is gone (kill -9, power loss)
    are marked FAILED, so the UI never shows a dead run as running. Returns their ids."""
    client = mlflow.MlflowClient()
    running_here = f"attributes.status = 'RUNNING' and tags.host = '{socket.gethostname()}'"
    stale = client.search_runs([experiment_id], filter_string=running_here, max_results=1000)
    dead = [r.info.run_id for r in stale if not psutil.pid_exists(int(r.data.tags.get("pid", "0") or 0))]
    for run_id in dead:
        client.set_tag(run_id, "ended_by", "process gone; marked FAILED by a later train stage")
        client.set_terminated(run_id, "FAILED")
    return dead


@contextmanager
def start_run(params: Params) -> Iterator[mlflow.ActiveRun]:
    """Create the pipeline's run, log every param, and record its id for the later stages."""
    experiment_id = setup()
    mark_dead_runs_failed(experiment_id)
    exp_name, commit = os.environ.get("DVC_EXP_NAME", ""), git_commit()
    tags = {"git.commit": commit, "mlflow.source.git.commit": commit, "host": socket.gethostname()}
    tags |= {"pid": str(os.getpid())} | ({"dvc.exp_name": exp_name} if exp_name else {})
    if not os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"):
        mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
    # System metrics cover the train stage, the pipeline's long one (the monitor stops with the run).
    run = mlflow.start_run(experiment_id=experiment_id, run_name=exp_name or None, tags=tags, log_system_metrics=True)
    with ended_as(run):
        mlflow.log_params(flat(params))
        write_json(RUN_FILE, {"run_id": run.info.run_id, "experiment_id": experiment_id})
        yield run


@contextmanager
def reopen_run() -> Iterator[mlflow.ActiveRun]:
    """Reopen the run the train stage created (ended as in `ended_as`)."""
    run_id = str(read_json(RUN_FILE, "the train stage").get("run_id"))
    setup()
    try:
        run = mlflow.start_run(run_id=run_id)
    except MlflowException as error:
        raise UserError(f"MLflow run {run_id}: {error.message.splitlines()[0]}") from None
    with ended_as(run):
        yield run
