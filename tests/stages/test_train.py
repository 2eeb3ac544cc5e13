"""The train stage as a process: Ctrl-C and SIGTERM end it as interrupted with its MLflow run KILLED;
a failed write or an unusable store is one error line, with no run left RUNNING. (What training
does is tested in tests/core/test_training.py and tests/core/test_train_step.py.)"""

from __future__ import annotations

import functools
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import (
    all_runs,
    copy_prepared,
    error_with_a_file_in_the_way,
    stage_error,
    store_client,
    temp_files,
    tool_env,
)
from mnist_cnn.stages import train


def wait_for(condition: Callable[[], bool], process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"{process.args} exited ({process.returncode}) too early:\n{log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{process.args}: condition not met within {timeout} s:\n{log.read_text()}")
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_training_exits_130_and_ends_the_run_killed(
    signum: signal.Signals, prepared: Path, small_mnist: Path, tmp_path: Path
) -> None:
    work = copy_prepared(prepared, tmp_path / "work", small_mnist, train__epochs=1000)
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("w") as stdout, err.open("w") as stderr:
        # A shell without job control starts background jobs with SIGINT ignored, and Python keeps an
        # inherited SIG_IGN; a terminal's Ctrl-C reaches a process with the default disposition.
        default_sigint = functools.partial(signal.signal, signal.SIGINT, signal.SIG_DFL)
        command = [sys.executable, "-m", "mnist_cnn.stages.train"]
        process = subprocess.Popen(
            command, cwd=work, env=tool_env(), stdout=stdout, stderr=stderr, preexec_fn=default_sigint
        )
    try:
        # The history is written after each epoch: once it is there, training is under way.
        wait_for((work / "plots" / "train_history.csv").exists, process, err)
        process.send_signal(signum)
        returncode = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = err.read_text()
    assert returncode == 130, text
    assert text.rstrip().splitlines()[-1] == "interrupted", text
    assert "Traceback" not in text, text
    assert "epoch 1:" in out.read_text()

    run_id = json.loads((work / "models" / "mlflow_run.json").read_text())["run_id"]
    run = store_client(work).get_run(run_id)
    assert run.info.status == "KILLED"
    assert "epoch/train_loss" in run.data.metrics  # the epochs that finished stay logged
    assert not (work / "models" / "model.pt").exists()
    assert not (work / "metrics" / "train.json").exists()
    assert not temp_files(work)


@pytest.mark.parametrize(
    ("in_the_way", "message"),
    [("models", "error: cannot write models/mlflow_run.json: "), ("mlruns", "error: MLflow store ")],
)
def test_a_file_where_an_output_directory_should_be_is_one_error_line(
    in_the_way: str,
    message: str,
    prepared: Path,
    small_mnist: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys,
    in_process,
) -> None:
    work = copy_prepared(prepared, tmp_path / "work", small_mnist)
    line = error_with_a_file_in_the_way(train.main, work, in_the_way, capsys)
    assert line.startswith(message), line
    if in_the_way == "models":  # the run had started: it must not be left RUNNING
        (run,) = all_runs(store_client(work))
        assert run.info.status == "FAILED"


def test_a_directory_where_the_model_file_should_be_fails_after_training(
    prepared: Path, small_mnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, in_process
) -> None:
    work = copy_prepared(prepared, tmp_path / "work", small_mnist, train__epochs=1)
    (work / "models" / "model.pt").mkdir(parents=True)
    (work / "models" / "model.pt" / "keep").write_text("x")  # a non-empty directory: rename cannot replace it
    monkeypatch.chdir(work)
    line = stage_error(train.main, capsys)
    assert line.startswith("error: cannot write models/model.pt: "), line
    assert (work / "models" / "model.pt" / "keep").read_text() == "x"
    assert not temp_files(work)
    (run,) = all_runs(store_client(work))
    assert run.info.status == "FAILED"


def test_a_store_that_cannot_be_opened_fails_at_once(
    prepared: Path, small_mnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, in_process
) -> None:
    """MLflow would retry opening it for ~100 s (retries meant for network databases), then print a traceback."""
    work = copy_prepared(prepared, tmp_path / "work", small_mnist)
    (work / "mlruns" / "mlflow.db").mkdir(parents=True)
    monkeypatch.chdir(work)
    started_at = time.monotonic()
    line = stage_error(train.main, capsys)
    assert line.startswith("error: MLflow store sqlite:///"), line
    assert "cannot open" in line, line
    assert time.monotonic() - started_at < 30
    assert not (work / "models").exists()
