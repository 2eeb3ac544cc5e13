"""Reliability of the stages: overlapping promotions, Ctrl-C / SIGTERM, failed writes, where stages write.

The tests drive the real stage processes (or a stage's main() in this process) on small synthetic
data, and check both what the user sees and what is left on disk and in the MLflow store. Parallel
queued experiments and kill -9 are in e2e/test_queued_pipeline.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient
from PIL import Image, ImageDraw

from helpers import REPO, all_runs, stage_error, store_client, tool_env, write_params, write_synthetic_mnist
from mnist_cnn.cli import run_stage
from mnist_cnn.config import validate
from mnist_cnn.core.model import Net
from mnist_cnn.registry import gate, publish
from mnist_cnn.serving import predict
from mnist_cnn.stages import download, evaluate, preprocess, train

STAGE_TIMEOUT_S = 300


# --- helpers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_mnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fewer images than the session's synthetic set: these tests are about processes, not accuracy."""
    return write_synthetic_mnist(tmp_path_factory.mktemp("small-mnist"), n_train=400, n_test=100)


def stage(
    name: str, cwd: Path, preexec_fn: Callable[[], None] | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """One stage, as `dvc repro` runs it (python -m mnist_cnn.<name> in the working directory)."""
    return subprocess.run(
        [sys.executable, "-m", f"mnist_cnn.stages.{name}"],
        cwd=cwd,
        env=tool_env(**env),
        capture_output=True,
        text=True,
        timeout=STAGE_TIMEOUT_S,
        preexec_fn=preexec_fn,
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, small_mnist: Path) -> Path:
    """A directory after the download and preprocess stages (no git, no DVC)."""
    root = tmp_path_factory.mktemp("prepared")
    write_params(root, small_mnist)
    with contextlib.chdir(root):
        download.main()
        preprocess.main()
    return root


def copy_prepared(prepared: Path, work: Path, small_mnist: Path, **overrides: object) -> Path:
    shutil.copytree(prepared / "data", work / "data")
    write_params(work, small_mnist, **overrides)
    return work


def run_id_of(work: Path) -> str:
    return json.loads((work / "models" / "mlflow_run.json").read_text())["run_id"]


def wait_for(condition: Callable[[], bool], process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"{process.args} exited ({process.returncode}) too early:\n{log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{process.args}: condition not met within {timeout} s:\n{log.read_text()}")
        time.sleep(0.2)


def no_temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.tmp") if ".dvc" not in p.parts and "mlruns" not in p.parts]


# --- 1. overlapping promotions --------------------------------------------------


class SlowChampionReads:
    """An MlflowClient that pauses after reading the registered model (where promote looks up the
    champion): the widest possible window between a promotion's read and its write."""

    def __init__(self, client: MlflowClient, pause: float) -> None:
        self._client, self._pause = client, pause

    def get_registered_model(self, name: str):
        model = self._client.get_registered_model(name)
        time.sleep(self._pause)
        return model

    def __getattr__(self, attribute: str):
        return getattr(self._client, attribute)


def test_overlapping_promotions_leave_the_best_model_champion(tmp_path: Path) -> None:
    """Two evaluate stages promoting at once (parallel experiments): the better model must end
    champion, whichever reads first, and neither may fail."""
    params = validate(yaml.safe_load((REPO / "params.yaml").read_text()))
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model("race")
    better, worse = (client.create_model_version("race", (tmp_path / v).as_uri()).version for v in ("a", "b"))
    results: dict[str, object] = {}

    def promote(version: str, accuracy: float, pause: float) -> None:
        try:
            metrics = {"test_accuracy": accuracy}
            results[version] = publish.promote(
                SlowChampionReads(client, pause), version, metrics, params, name="race", exp_name="", commit="c"
            )  # type: ignore[arg-type]
        except Exception as error:  # reported below
            results[version] = error

    # The better model reads first and writes first; the worse one reads before that write and writes last.
    threads = [
        threading.Thread(target=promote, args=(better, 0.9, 0.4)),
        threading.Thread(target=promote, args=(worse, 0.8, 0.8)),
    ]
    threads[0].start()
    time.sleep(0.1)
    threads[1].start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(isinstance(r, publish.Promotion) for r in results.values()), results
    assert client.get_registered_model("race").aliases[gate.CHAMPION] == int(better), results


# --- 2. Ctrl-C and SIGTERM -----------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_training_exits_130_and_ends_the_run_killed(
    signum: signal.Signals, prepared: Path, small_mnist: Path, tmp_path: Path
) -> None:
    work = copy_prepared(prepared, tmp_path / "work", small_mnist, train__epochs=1000)
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("w") as stdout, err.open("w") as stderr:
        train = subprocess.Popen(
            [sys.executable, "-m", "mnist_cnn.stages.train"],
            cwd=work,
            env=tool_env(),
            stdout=stdout,
            stderr=stderr,
            # A shell without job control starts background jobs with SIGINT ignored, and Python keeps
            # an inherited SIG_IGN; a terminal's Ctrl-C reaches a process with the default disposition.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        # The history is written after each epoch: once it is there, training is under way.
        wait_for((work / "plots" / "train_history.csv").exists, train, err)
        train.send_signal(signum)
        returncode = train.wait(timeout=60)
    finally:
        if train.poll() is None:
            train.kill()
            train.wait()
    text = err.read_text()
    assert returncode == 130, text
    assert text.rstrip().splitlines()[-1] == "interrupted", text
    assert "Traceback" not in text, text
    assert "epoch 1:" in out.read_text()

    run = store_client(work).get_run(run_id_of(work))
    assert run.info.status == "KILLED"
    assert "epoch/train_loss" in run.data.metrics  # the epochs that finished stay logged
    assert not (work / "models" / "model.pt").exists()
    assert not (work / "metrics" / "train.json").exists()
    assert not no_temp_files(work)


# --- 3. writes that fail --------------------------------------------------------
# Tests run as root, for whom chmod 0o555 stops nothing. Two failures that do stop root:
# a file size limit (RLIMIT_FSIZE: write() fails with EFBIG, as it fails with ENOSPC on a full
# disk) and a regular file where a stage's output directory should be.


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Python ignores SIGXFSZ, so a write() past the limit fails with EFBIG; only the soft limit is
    lowered, so it can be raised back afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_full_disk_while_preprocessing_is_one_error_line(
    prepared: Path, small_mnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, in_process
) -> None:
    work = tmp_path / "work"
    shutil.copytree(prepared / "data" / "raw", work / "data" / "raw")
    write_params(work, small_mnist)
    monkeypatch.chdir(work)
    with file_size_limit(64 * 1024):  # train.pt is ~320 kB
        line = stage_error(preprocess.main, capsys)
    assert line == "error: cannot write data/processed/train.pt: File too large", line
    assert list((work / "data" / "processed").iterdir()) == []  # no partial file, no temp file


def test_full_disk_while_downloading_is_one_error_line(
    small_mnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, in_process
) -> None:
    write_params(tmp_path, small_mnist)
    monkeypatch.chdir(tmp_path)
    with file_size_limit(64 * 1024):
        line = stage_error(download.main, capsys)
    assert line.startswith("error: cannot write data/raw/"), line
    assert line.endswith("File too large"), line
    assert list((tmp_path / "data" / "raw").iterdir()) == []  # no partial file, no staging directory


STAGES = {"download": download.main, "preprocess": preprocess.main, "train": train.main, "evaluate": evaluate.main}


@pytest.mark.parametrize(
    ("name", "in_the_way", "message"),
    [
        ("download", "data/raw", "error: cannot write data/raw: "),
        ("preprocess", "data/processed", "error: cannot write data/processed/train.pt: "),
        ("train", "models", "error: cannot write models/mlflow_run.json: "),
        ("train", "mlruns", "error: MLflow store "),
    ],
    ids=["download", "preprocess", "train-models", "train-mlruns"],
)
def test_a_file_where_an_output_directory_should_be_is_one_error_line(
    name: str,
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
    blocker = work / in_the_way
    if blocker.is_dir():
        shutil.rmtree(blocker)
    blocker.write_text("not a directory\n")
    monkeypatch.chdir(work)
    line = stage_error(STAGES[name], capsys)
    assert line.startswith(message), line
    assert in_the_way in line, line
    assert blocker.read_text() == "not a directory\n"
    assert not no_temp_files(work)
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
    assert not no_temp_files(work)
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


class RunsACommand:
    """A pickle payload that would run a shell command when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_predict_refuses_a_checkpoint_with_pickled_code_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, in_process
) -> None:
    """--model PATH is any file the user was given: weights_only loading must refuse code, and say so
    plainly (torch's own message advises retrying with weights_only=False)."""
    marker = tmp_path / "payload-ran"
    torch.save({"state_dict": Net().state_dict(), "extra": RunsACommand(marker)}, tmp_path / "model.pt")
    picture = Image.new("L", (56, 56), 255)
    ImageDraw.Draw(picture).line((28, 8, 28, 48), fill=0, width=5)
    picture.save(tmp_path / "one.png")
    monkeypatch.chdir(tmp_path)
    line = stage_error(lambda: predict.main(["--model", "model.pt", "one.png"]), capsys)
    assert line == "error: model.pt: refused to load: it holds pickled objects besides weights"
    assert not marker.exists()


def test_evaluate_refuses_a_tampered_model_in_one_line(
    prepared: Path, small_mnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, in_process
) -> None:
    """models/model.pt replaced by a file with pickled code (or by anything else): evaluate must say so
    in one line, run nothing, and leave no metrics behind."""
    work = copy_prepared(prepared, tmp_path / "work", small_mnist)
    marker = tmp_path / "payload-ran"
    (work / "models").mkdir()
    torch.save({"state_dict": Net().state_dict(), "extra": RunsACommand(marker)}, work / "models" / "model.pt")
    monkeypatch.chdir(work)
    line = stage_error(evaluate.main, capsys)
    assert line == "error: models/model.pt: refused to load: it holds pickled objects besides weights"
    assert not marker.exists()
    (work / "models" / "model.pt").write_text("not a checkpoint")
    line = stage_error(evaluate.main, capsys)
    assert line == "error: models/model.pt: not a model.pt checkpoint of this project (not a torch.save archive)"
    assert not (work / "metrics").exists()


# --- 4. the stages write only inside the working directory ----------------------


def snapshot(root: Path, skip: Path) -> dict[Path, tuple[int, int]]:
    return {
        p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file() and skip not in p.parents
    }


@pytest.mark.slow
def test_stages_write_only_inside_the_working_directory(small_mnist: Path, tmp_path: Path) -> None:
    """data.source_dir outside the working directory is read, never written; no file is left in
    TMPDIR; anything else outside the working directory could only be a tool's cache under HOME."""
    work, source, home, tmp = (tmp_path / name for name in ("work", "source", "home", "tmp"))
    shutil.copytree(small_mnist, source)
    home.mkdir()
    tmp.mkdir()
    write_params(work, source, train__epochs=1)
    before = snapshot(tmp_path, skip=work)
    env = {"HOME": str(home), "TMPDIR": str(tmp), "XDG_CACHE_HOME": str(home / ".cache")}
    for name in ("download", "preprocess", "train"):
        result = stage(name, work, **env)
        assert result.returncode == 0, f"{name}:\n{result.stderr}"
    after = snapshot(tmp_path, skip=work)
    assert {p: s for p, s in after.items() if source in p.parents} == {
        p: s for p, s in before.items() if source in p.parents
    }
    assert [p for p in tmp.rglob("*") if p.is_file()] == []  # (torch leaves an empty torchinductor_<user>/)
    outside = sorted(str(p.relative_to(tmp_path)) for p, s in after.items() if before.get(p) != s)
    assert all(p.startswith(("home/.cache/", "home/.config/")) for p in outside), outside
    assert {p.name for p in work.iterdir()} == {"params.yaml", "data", "models", "metrics", "plots", "mlruns"}


@pytest.mark.skipif(shutil.which("npm") is None, reason="needs npm")
def test_npm_package_param_runs_no_scripts(
    small_mnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, in_process
) -> None:
    """data.npm_package may name a local directory or git URL; `npm pack` would run that package's
    prepare/prepack scripts, i.e. any command, writing anywhere. The stage must not run them."""
    package = tmp_path / "package"
    package.mkdir()
    marker = tmp_path / "script-ran"
    script = f"touch {marker}"
    (package / "package.json").write_text(
        json.dumps({"name": "not-mnist", "version": "1.0.0", "scripts": {"prepare": script, "prepack": script}})
    )
    work = tmp_path / "work"
    write_params(work, small_mnist)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["data"]["npm_package"] = str(package)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.setenv("npm_config_cache", str(tmp_path / "npm-cache"))
    monkeypatch.setenv("npm_config_update_notifier", "false")
    monkeypatch.chdir(work)
    run_stage(download.main)  # npm has no data files: the directory source is used
    assert "npm" in capsys.readouterr().err  # the npm source was tried ...
    assert not marker.exists()  # ... without running the package's scripts
