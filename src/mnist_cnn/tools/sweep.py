"""Queue a sweep through DVC's experiment queue and run it to its end, unattended, as one MLflow
parent run (`make ablation`).

`--knob KEY=A,B` and `--seeds` (and any fixed `-S KEY=VALUE`) are queued as one `dvc exp run --queue`
grid. The parent run (tag `mnist_cnn.kind=sweep`, params `knob`, `seeds` and each `-S`) is created in
the checkout's store, and the queue workers start with its id in MNIST_CNN_PARENT_RUN_ID: every run
the pipeline creates under them is its child. It ends FINISHED when every experiment succeeded.

A `dvc queue start` worker can end while experiments are still queued: `dvc queue status` then
shows them Queued beside "Worker status: 0 active, 0 idle", and a loop waiting for the queue to
drain waits forever. This polls the status until nothing is queued or running, and starts workers
again (saying so) whenever experiments wait and no worker is alive; an experiment a stopping worker
took and never ran is queued again (`requeue_lost`, docs/operations.md).
Exit 0 when every experiment succeeded, 1 (naming the failed ones) otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import time
from dataclasses import dataclass

import mlflow
import yaml

from mnist_cnn.cli import UserError, run_stage
from mnist_cnn.tracking import provenance, store

WAITING = ("Queued", "Running")
# The pipeline's runs become children of the run named here (tracking/store.py reads it).
PARENT_RUN_ENV = "MNIST_CNN_PARENT_RUN_ID"
KIND_TAG = "mnist_cnn.kind"
SWEEP = "sweep"
EXPERIMENTS_TAG = "mnist_cnn.sweep.experiments"


@dataclass(frozen=True)
class Task:
    name: str  # the experiment's name, or the task id when it has none
    state: str  # Queued | Running | Success | Failed | ...


@dataclass(frozen=True)
class QueueStatus:
    tasks: dict[str, Task]  # task id (the stash commit's short hash) -> its task
    active_workers: int
    idle_workers: int = 0

    def ids(self, *states: str) -> list[str]:
        return [task_id for task_id, task in self.tasks.items() if task.state in states]

    @property
    def stalled(self) -> bool:
        """Experiments wait and no worker will take them."""
        return bool(self.ids("Queued")) and not self.ids("Running") and self.active_workers == 0

    @property
    def orphaned(self) -> list[str]:
        """Tasks shown Running while no worker is alive: either a worker that did not answer DVC's
        1-second status query in time (a loaded machine), or a lost task (see `requeue_lost`)."""
        return self.ids("Running") if self.active_workers + self.idle_workers == 0 else []


def parse_status(text: str) -> QueueStatus:
    """`dvc queue status` output -> its tasks and workers. The table's columns are read at the
    header's offsets: the Name column may be empty, and Created holds one or more words."""
    lines = text.splitlines()
    workers = re.search(r"Worker status: (\d+) active, (\d+) idle", text)
    if workers is None or not lines or not lines[0].startswith(("Task", "No experiment tasks")):
        raise UserError(f"sweep: unexpected `dvc queue status` output: {text.strip()[:200]}")
    tasks = {}
    if lines[0].startswith("Task"):
        name_at, created_at = lines[0].index("Name"), lines[0].index("Created")
        for line in lines[1:]:
            if line.startswith("Worker status"):
                break
            if line.strip():
                task_id = line.split()[0]
                tasks[task_id] = Task(line[name_at:created_at].strip() or task_id, line.split()[-1])
    return QueueStatus(tasks, int(workers.group(1)), int(workers.group(2)))


def dvc(*args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(["dvc", *args], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise UserError(f"sweep: `dvc {' '.join(args)}` failed: {(result.stderr or result.stdout).strip()[-300:]}")
    return result.stdout


def queue(sets: list[str], name: str | None = None) -> list[str]:
    """`dvc exp run --queue` with these -S options: the ids of the tasks it queued."""
    before = parse_status(dvc("queue", "status")).tasks
    dvc("exp", "run", "--queue", *(["-n", name] if name else []), *(arg for item in sets for arg in ("-S", item)))
    return [task_id for task_id in parse_status(dvc("queue", "status")).ids("Queued") if task_id not in before]


def requeue_lost(task_id: str, status: QueueStatus, keys: list[str]) -> str | None:
    """A task a worker took from the queue just as it was told to stop (`dvc queue stop`, or the
    worker's own idle check) is never run, and DVC shows it Running for ever with no worker alive:
    the broker moved it out of the queue, and DVC's workers do not put back what they took at
    shutdown. If it never started a process (`dvc queue logs` has nothing), `dvc queue kill` marks
    it Failed, and it is queued again under its name with the sweep's params from its stash commit:
    the new task's id. None when it did start, or a worker says it runs it (it is not lost)."""
    logs = subprocess.run(["dvc", "queue", "logs", task_id], capture_output=True, text=True)
    if logs.returncode == 0 or "No output logs found" not in logs.stderr:
        return None
    if subprocess.run(["dvc", "queue", "kill", task_id], capture_output=True, text=True).returncode != 0:
        return None  # (DVC refuses when a worker reports the task as its own)
    shown = subprocess.run(["git", "show", f"{task_id}:params.yaml"], capture_output=True, text=True)
    if shown.returncode != 0:
        raise UserError(f"sweep: cannot read the params of lost task {task_id}: {shown.stderr.strip()[-200:]}")
    params = yaml.safe_load(shown.stdout)
    sets = [f"{key}={json.dumps(value)}" for key in keys if (value := dotted(params, key)) is not None]
    name = status.tasks[task_id].name
    new = queue(sets, None if name == task_id else name)
    print(f"sweep: {name} was taken by a stopping worker and never ran; queued again ({' '.join(sets)})", flush=True)
    return new[0] if new else None


def dotted(params: dict, key: str) -> object:
    for part in key.split("."):
        params = params.get(part) if isinstance(params, dict) else None
    return params


def drain(
    pending: list[str], keys: list[str], jobs: int, poll: float, lost_after: float, env: dict[str, str] | None = None
) -> tuple[list[str], QueueStatus]:
    """Start `jobs` workers (with `env`) and keep the queue served until nothing is queued or
    running: the pending task ids (a lost task replaced by its new one) and the final status."""
    dvc("queue", "start", "-j", str(jobs), env=env)
    orphaned_since: dict[str, float] = {}
    while True:
        time.sleep(poll)
        status = parse_status(dvc("queue", "status"))
        if not status.ids(*WAITING):
            return pending, status
        now = time.monotonic()
        orphaned_since = {task_id: orphaned_since.get(task_id, now) for task_id in status.orphaned}
        for task_id in [t for t, since in orphaned_since.items() if t in pending and now - since >= lost_after]:
            if (new := requeue_lost(task_id, status, keys)) is not None:
                pending = [new if t == task_id else t for t in pending]
            del orphaned_since[task_id]  # (if it was not lost: checked again after another lost_after)
        if status.stalled:
            waiting = len(status.ids("Queued"))
            print(f"sweep: {waiting} experiments queued and no worker active; starting {jobs} again", flush=True)
            dvc("queue", "start", "-j", str(jobs), env=env)


def check_idle(status: QueueStatus) -> None:
    """A sweep owns the queue: experiments queued before it, or a worker started without its parent
    run's id, would run outside its parent run."""
    if waiting := [status.tasks[task_id].name for task_id in status.ids(*WAITING)]:
        raise UserError(
            f"sweep: {len(waiting)} experiments already queued or running ({', '.join(waiting[:5])}); "
            "let them finish or remove them first (dvc queue remove --queued; dvc queue kill NAME for one "
            "shown Running with no worker alive)"
        )
    if status.active_workers or status.idle_workers:
        raise UserError("sweep: a queue worker is still running (dvc queue stop, then retry)")


def split_knob(knob: str) -> tuple[str, list[str]]:
    """KEY=A,B -> (KEY, [A, B]), or a UserError naming the option."""
    key, _, values = knob.partition("=")
    if not key or len(values.split(",")) != 2 or not all(values.split(",")):
        raise UserError(f"--knob: expected KEY=A,B (e.g. augment=true,false), got {knob!r}")
    return key, values.split(",")


def sweep_params(knob: str, seeds: str, fixed: list[str]) -> dict[str, str]:
    """The parent run's params: the knob, the seeds and each fixed -S KEY=VALUE."""
    params = {"knob": knob, "seeds": seeds}
    for item in fixed:
        key, sep, value = item.partition("=")
        if not key or not sep:
            raise UserError(f"-S: expected KEY=VALUE, got {item!r}")
        params[key] = value
    return params


def start_parent(experiment_id: str, knob: str, params: dict[str, str], experiments: list[str]) -> mlflow.ActiveRun:
    """The sweep's parent run, active in this process, with its params and the queued experiments."""
    tags = {KIND_TAG: SWEEP, "git.commit": provenance.git_commit(), EXPERIMENTS_TAG: ",".join(experiments)[:5000]}
    run = mlflow.start_run(experiment_id=experiment_id, run_name=f"sweep {knob}", tags=tags)
    mlflow.log_params(params)
    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mnist_cnn.tools.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--knob", default="augment=true,false", help="KEY=A,B: the param the sweep compares")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="the seeds each value runs with")
    parser.add_argument("-S", dest="fixed", action="append", default=[], help="a fixed KEY=VALUE (repeatable)")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="parallel queue workers")
    parser.add_argument("--poll", type=float, default=15.0, help="seconds between status checks")
    parser.add_argument(
        "--lost-after", type=float, default=120.0, help="seconds a task may show Running with no worker alive"
    )
    args = parser.parse_args(argv)
    key, _ = split_knob(args.knob)
    params = sweep_params(args.knob, args.seeds, args.fixed)
    check_idle(parse_status(dvc("queue", "status")))

    experiment_id = store.setup()  # the store exists before any worker opens it
    pending = queue([args.knob, f"seed={args.seeds}", *args.fixed])
    names = {task_id: task.name for task_id, task in parse_status(dvc("queue", "status")).tasks.items()}
    print(f"sweep: {len(pending)} experiments queued: {', '.join(names[t] for t in pending)}", flush=True)

    parent = start_parent(experiment_id, args.knob, params, [names[t] for t in pending])
    with store.ended_as(parent):
        print(f"sweep: parent run {parent.info.run_id}", flush=True)
        env = os.environ | {PARENT_RUN_ENV: parent.info.run_id}
        keys = [key, "seed", *(item.partition("=")[0] for item in args.fixed)]
        pending, status = drain(pending, keys, args.jobs, args.poll, args.lost_after, env)
        tasks = [status.tasks.get(t, Task(t, "removed")) for t in pending]
        failed = [task.name for task in tasks if task.state != "Success"]
        print(f"sweep: {len(pending) - len(failed)} of {len(pending)} experiments succeeded", flush=True)
        if failed:
            mlflow.set_tag("mnist_cnn.sweep.failed", ",".join(failed)[:5000])
            print(f"sweep: not successful: {', '.join(failed)} (see dvc queue logs NAME)", flush=True)
            raise SystemExit(1)  # the parent run ends FAILED


if __name__ == "__main__":
    run_stage(main)
