"""tools/sweep.py: reading `dvc queue status`, the checks before a sweep, a real sweep of 4 toy
experiments as one MLflow parent run, drained by 1 worker although that worker is stopped after the
first (the state DVC's workers have been seen to leave), and a lost task queued again."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import run, store_client, tool_env
from mnist_cnn.cli import UserError
from mnist_cnn.tools import sweep
from mnist_cnn.tools.sweep import Task, parse_status

STATUS = """Task     Name                 Created       Status
9294987  robust-0             Sep 19, 2024  Queued
22c83f3                       Sep 19, 2024  Running
3775500  robust-2             06:35 PM      Success
10f8332  robust-3             06:35 PM      Failed
5f39bc6  robust-3             06:37 PM      Failed

Worker status: 0 active, 0 idle
"""


def test_parse_status_reads_tasks_states_and_workers() -> None:
    status = parse_status(STATUS)
    assert status.tasks == {
        "9294987": Task("robust-0", "Queued"), "22c83f3": Task("22c83f3", "Running"),
        "3775500": Task("robust-2", "Success"), "10f8332": Task("robust-3", "Failed"),
        "5f39bc6": Task("robust-3", "Failed"),  # a name twice (a task queued again): one entry per task
    }  # fmt: skip
    assert (status.active_workers, status.idle_workers) == (0, 0)
    assert not status.stalled  # one shows Running: its worker may only have been slow to answer
    assert status.orphaned == ["22c83f3"]  # ... or it is lost: Running with no worker alive
    stalled = parse_status(STATUS.replace("Running", "Success"))
    assert stalled.stalled and stalled.ids("Queued") == ["9294987"] and not stalled.orphaned
    busy = parse_status(STATUS.replace("0 active, 0 idle", "1 active, 2 idle"))
    assert not busy.stalled and not busy.orphaned and (busy.active_workers, busy.idle_workers) == (1, 2)
    empty = parse_status("No experiment tasks in the queue.\n\nWorker status: 0 active, 0 idle\n")
    assert empty.tasks == {} and not empty.stalled
    with pytest.raises(UserError, match="unexpected `dvc queue status` output"):
        parse_status("ERROR: something else")


def toy_repo(repo: Path, stage: str) -> Path:
    repo.mkdir()
    (repo / "params.yaml").write_text("n: 0\nseed: 0\n")
    (repo / "dvc.yaml").write_text(stage)
    (repo / ".gitignore").write_text("mlruns/\n")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "repro", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "toy"]):  # fmt: skip
        run(cmd, repo)
    return repo


def test_a_sweep_owns_the_queue_and_checks_its_options() -> None:
    with pytest.raises(UserError, match=r"2 experiments already queued or running \(robust-0, 22c83f3\)"):
        sweep.check_idle(parse_status(STATUS))
    done = STATUS.replace("Running", "Success").replace("Queued", "Success")
    with pytest.raises(UserError, match="a queue worker is still running"):
        sweep.check_idle(parse_status(done.replace("0 active, 0 idle", "0 active, 1 idle")))
    sweep.check_idle(parse_status(done))
    assert sweep.split_knob("model.input_norm=background,none") == ("model.input_norm", ["background", "none"])
    for knob in ("augment", "augment=true", "=a,b", "augment=a,"):
        with pytest.raises(UserError, match="--knob: expected KEY=A,B"):
            sweep.split_knob(knob)
    params = sweep.sweep_params("augment=true,false", "0,1", ["train.precision=bf16"])
    assert params == {"knob": "augment=true,false", "seeds": "0,1", "train.precision": "bf16"}
    with pytest.raises(UserError, match=r"-S: expected KEY=VALUE, got 'train\.precision'"):
        sweep.sweep_params("augment=true,false", "0", ["train.precision"])
    assert sweep.dotted({"train": {"lr": 0.1}, "seed": 0}, "train.lr") == 0.1
    assert sweep.dotted({"seed": 0}, "seed") == 0 and sweep.dotted({"seed": 0}, "train.lr") is None


# Each experiment records the parent run id its stage process was given.
TOY_STAGE = """stages:
  work:
    cmd: python -c "import os, time; time.sleep(${n}); open('out.txt', 'w').write('${n}');
      open('PARENTS', 'a').write(os.environ.get('MNIST_CNN_PARENT_RUN_ID', '-') + chr(10))"
    params: [n, seed]
    outs: [out.txt]
"""


@pytest.mark.slow
@pytest.mark.e2e
def test_a_sweep_of_4_is_one_parent_run_and_finishes_with_its_worker_stopped_midway(tmp_path: Path) -> None:
    parents = tmp_path / "parents.txt"
    repo = toy_repo(tmp_path / "toy", TOY_STAGE.replace("PARENTS", str(parents)))
    parents.unlink()  # the baseline's own line
    command = [sys.executable, "-m", "mnist_cnn.tools.sweep", "--knob", "n=1,2", "--seeds", "0,1", "-j", "1"]
    sweep_process = subprocess.Popen(
        [*command, "--poll", "0.5", "--lost-after", "10"],
        cwd=repo, env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while "Success" not in run(["dvc", "queue", "status"], repo).stdout:
            assert time.monotonic() < deadline and sweep_process.poll() is None, "no experiment finished"
        # The worker now ends after its current experiment, with at least one still queued.
        run(["dvc", "queue", "stop"], repo)
        output, _ = sweep_process.communicate(timeout=300)
    finally:
        sweep_process.kill()
    assert sweep_process.returncode == 0, output
    assert "queued and no worker active; starting 1 again" in output, output
    assert "sweep: 4 of 4 experiments succeeded" in output, output

    shown = list(csv.DictReader(io.StringIO(run(["dvc", "exp", "show", "--no-pager", "--csv"], repo).stdout)))
    done = [row for row in shown if row["State"] == "Success"]
    assert sorted((row["n"], row["seed"]) for row in done) == [("1", "0"), ("1", "1"), ("2", "0"), ("2", "1")]

    client = store_client(repo)
    (parent,) = client.search_runs([client.get_experiment_by_name("mnist-cnn").experiment_id])
    assert parent.info.status == "FINISHED" and parent.info.run_name == "sweep n=1,2"
    assert parent.data.tags["mnist_cnn.kind"] == "sweep"
    assert parent.data.params == {"knob": "n=1,2", "seeds": "0,1"}
    assert sorted(parent.data.tags["mnist_cnn.sweep.experiments"].split(",")) == sorted(r["Experiment"] for r in done)
    # Every stage process ran with the parent's id, whichever worker ran it (the first or the restarted one).
    assert parents.read_text().splitlines() == [parent.info.run_id] * 4


@pytest.mark.slow
@pytest.mark.e2e
def test_a_task_a_stopping_worker_took_and_never_ran_is_queued_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = toy_repo(tmp_path / "toy", TOY_STAGE.replace("PARENTS", str(tmp_path / "parents.txt")))
    run(["dvc", "exp", "run", "--queue", "-n", "lost-1", "-S", "n=2", "-S", "seed=3"], repo)
    # What a worker leaves when it takes the task just as it is told to stop: the broker has moved the
    # message out of the queue's folder (into processed/, as on delivery), and nothing runs it.
    broker = repo / ".dvc" / "tmp" / "exps" / "celery" / "broker"
    (message,) = (broker / "in").glob("*.celery.msg")
    (broker / "processed").mkdir(exist_ok=True)
    message.rename(broker / "processed" / message.name)
    lost = parse_status(run(["dvc", "queue", "status"], repo).stdout)
    (task_id,) = lost.orphaned
    assert lost.tasks[task_id] == Task("lost-1", "Running")

    monkeypatch.chdir(repo)
    for name, value in tool_env().items():
        monkeypatch.setenv(name, value)
    pending, status = sweep.drain([task_id], ["n", "seed"], jobs=1, poll=0.5, lost_after=1)
    output = capsys.readouterr().out
    assert "sweep: lost-1 was taken by a stopping worker and never ran; queued again (n=2 seed=3)" in output
    (new,) = pending
    assert status.tasks == {task_id: Task("lost-1", "Failed"), new: Task("lost-1", "Success")}
    shown = csv.DictReader(io.StringIO(run(["dvc", "exp", "show", "--no-pager", "--csv"], repo).stdout))
    assert [(r["n"], r["seed"]) for r in shown if r["Experiment"] == "lost-1" and r["State"] == "Success"] == [
        ("2", "3")
    ]
