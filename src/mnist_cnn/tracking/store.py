"""MLflow: where the store is, and the one run of each pipeline execution (docs/tracking.md). An execution is
one `dvc repro` or one `dvc exp run` experiment, told apart by the DVC process that runs its stages
(`provenance.execution_key`). The train stage creates the execution's run and writes its id to models/mlflow_run.json;
a later stage logs into its execution's run, and when train was cached (a run of an earlier execution made
the model) the first later stage creates the execution's own run, linked to the training run by a tag."""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
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
from mnist_cnn.tracking.provenance import CODE, changed_from_commit, code_digest, execution_key, git_commit, run_name

# A stage prints its own lines: MLflow's INFO notes (system-metrics monitor, input-example
# validation) and the progress bars of its internal downloads are not among them.
logging.getLogger("mlflow").setLevel(logging.WARNING)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

EXPERIMENT = "mnist-cnn"
REGISTERED_MODEL = "mnist-cnn"
# System metrics (CPU, memory, disk, network; GPU with nvidia-ml-py) every few seconds, not
# MLflow's default 10 s: a training run here takes seconds to minutes. The env variable wins.
SYSTEM_METRICS_INTERVAL_S = 2.0
EXECUTION_TAG = "pipeline.execution"  # the execution a run records (provenance.execution_key)
TRAIN_RUN_TAG = "train_run_id"  # on a run whose model an earlier execution's run trained
PARENT_RUN_ENV = "MNIST_CNN_PARENT_RUN_ID"  # set by a sweep: every run created is its child
# The run page's first section (MLflow's UI groups charts by the name's prefix before "/", prefixed sections
# before the unprefixed "Model metrics"): the per-epoch history, a run's only metrics with several steps.
EPOCH_PREFIX = "epoch/"
# Keys of metrics/*.json that DVC shows but a run does not carry: redundant with a run metric (the robustness
# stage's own clean accuracy, clean minus the MNIST-C mean) or in an artifact of the run (metrics/eval.json,
# reports/classification_report.json). test_accuracy is logged by register, linked to the logged model.
DVC_ONLY = ("test_loss", "macro_f1", "robust_clean", "robust_degradation")
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


def _parent_run_id() -> str | None:
    parent = os.environ.get(PARENT_RUN_ENV) or None
    if parent is not None:
        try:
            mlflow.MlflowClient().get_run(parent)
        except MlflowException as error:
            raise UserError(f"{PARENT_RUN_ENV}={parent}: {error.message.splitlines()[0]}") from None
    return parent


def _new_run(
    params: Params, experiment_id: str, extra_tags: Mapping[str, str], system_metrics: bool
) -> mlflow.ActiveRun:
    """A run of this execution with every param, named and tagged for what it records (docs/tracking.md)."""
    commit, dirty = git_commit(), changed_from_commit(*CODE)
    tags = {"git.commit": commit, "mlflow.source.git.commit": commit, "git.dirty": str(dirty).lower()}
    tags |= {"code.digest": code_digest(), EXECUTION_TAG: execution_key(), "host": socket.gethostname()}
    tags |= {"pid": str(os.getpid())} | dict(extra_tags)
    if exp_name := os.environ.get("DVC_EXP_NAME", ""):
        tags["dvc.exp_name"] = exp_name
    if system_metrics and not os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"):
        mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
    run = mlflow.start_run(
        experiment_id=experiment_id,
        run_name=run_name(commit, dirty),
        tags=tags,
        parent_run_id=_parent_run_id(),
        log_system_metrics=system_metrics,
    )
    mlflow.log_params(flat(params))
    return run


@contextmanager
def start_run(params: Params) -> Iterator[mlflow.ActiveRun]:
    """The train stage's run: create it, log every param, and record its id (models/mlflow_run.json) as the
    run that trained the model."""
    experiment_id = setup()
    mark_dead_runs_failed(experiment_id)
    # System metrics cover the train stage, the pipeline's long one (the monitor stops with the run).
    run = _new_run(params, experiment_id, {}, system_metrics=True)
    with ended_as(run):
        write_json(RUN_FILE, {"run_id": run.info.run_id, "experiment_id": experiment_id})
        yield run


def execution_run_id(experiment_id: str, key: str) -> str | None:
    """The run this execution has made so far, if any."""
    found = mlflow.MlflowClient().search_runs(
        [experiment_id], filter_string=f"tags.`{EXECUTION_TAG}` = '{key}'", max_results=1
    )
    return found[0].info.run_id if found else None


@contextmanager
def execution_run(params: Params) -> Iterator[mlflow.ActiveRun]:
    """The run of this execution, for a stage after train: the one train (or an earlier stage) created in it,
    reopened; else a new one with every param and a `train_run_id` tag naming the run that trained the model
    (models/mlflow_run.json). So a run's metrics are only ever those of its own params (ended as in
    `ended_as`)."""
    trained_by = str(read_json(RUN_FILE, "the train stage").get("run_id"))
    experiment_id = setup()
    run_id = execution_run_id(experiment_id, execution_key())
    if run_id is None:
        run = _new_run(params, experiment_id, {TRAIN_RUN_TAG: trained_by}, system_metrics=False)
    else:
        try:
            run = mlflow.start_run(run_id=run_id)
        except MlflowException as error:
            raise UserError(f"MLflow run {run_id}: {error.message.splitlines()[0]}") from None
        mlflow.set_tag("pid", str(os.getpid()))  # alive while this stage runs (mark_dead_runs_failed)
    with ended_as(run):
        yield run


def run_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The metrics of a DVC metrics file that its stage's run carries."""
    return {k: float(v) for k, v in metrics.items() if k not in DVC_ONLY}


def log_new(metrics: Mapping[str, float], **kwargs: object) -> dict[str, float]:
    """Log to the active run those of `metrics` it does not have yet (a metric gets one value per run);
    kwargs as mlflow.log_metrics takes them (dataset=, model_id=). Returns what was logged."""
    run = mlflow.active_run()
    assert run is not None, "log_new needs an active run"
    have = mlflow.MlflowClient().get_run(run.info.run_id).data.metrics
    new = {k: float(v) for k, v in metrics.items() if k not in have}
    if new:
        mlflow.log_metrics(new, **kwargs)  # type: ignore[arg-type]
    return new
