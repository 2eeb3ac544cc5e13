"""Run DVC's experiment queue to its end, unattended (`make ablation`).

A `dvc queue start` worker can end while experiments are still queued: `dvc queue status` then
shows them Queued beside "Worker status: 0 active, 0 idle", and a loop waiting for the queue to
drain waits forever. This starts the workers, then polls the status until nothing is queued or
running, and starts workers again (saying so) whenever experiments wait and no worker is active.
Exit 0 when every experiment succeeded, 1 (naming the failed ones) otherwise.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import time
from dataclasses import dataclass

from mnist_cnn.cli import UserError, run_stage

WAITING = ("Queued", "Running")


@dataclass(frozen=True)
class QueueStatus:
    tasks: dict[str, str]  # task name (or id) -> Queued | Running | Success | Failed | ...
    active_workers: int

    def named(self, state: str) -> list[str]:
        return [name for name, s in self.tasks.items() if s == state]

    @property
    def stalled(self) -> bool:
        """Experiments wait and no worker will take them."""
        return bool(self.named("Queued")) and not self.named("Running") and self.active_workers == 0


def parse_status(text: str) -> QueueStatus:
    """`dvc queue status` output -> its tasks and active workers. The table's columns are read at
    the header's offsets: the Name column may be empty, and Created holds one or more words."""
    lines = text.splitlines()
    workers = re.search(r"Worker status: (\d+) active", text)
    if not lines or not lines[0].startswith("Task") or workers is None:
        raise UserError(f"sweep: unexpected `dvc queue status` output: {text.strip()[:200]}")
    name_at, created_at = lines[0].index("Name"), lines[0].index("Created")
    tasks = {}
    for line in lines[1:]:
        if line.startswith("Worker status"):
            break
        if line.strip():
            tasks[line[name_at:created_at].strip() or line.split()[0]] = line.split()[-1]
    return QueueStatus(tasks, int(workers.group(1)))


def dvc(*args: str) -> str:
    result = subprocess.run(["dvc", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(f"sweep: `dvc {' '.join(args)}` failed: {(result.stderr or result.stdout).strip()[-300:]}")
    return result.stdout


def drain(jobs: int, poll: float) -> tuple[list[str], QueueStatus]:
    """Start `jobs` workers and keep the queue served until it is empty: the experiments that were
    waiting at the start, and the final status."""
    pending = [name for name, state in parse_status(dvc("queue", "status")).tasks.items() if state in WAITING]
    dvc("queue", "start", "-j", str(jobs))
    while True:
        time.sleep(poll)
        status = parse_status(dvc("queue", "status"))
        if not any(state in WAITING for state in status.tasks.values()):
            return pending, status
        if status.stalled:
            waiting = len(status.named("Queued"))
            print(f"sweep: {waiting} experiments queued and no worker active; starting {jobs} again", flush=True)
            dvc("queue", "start", "-j", str(jobs))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-j", "--jobs", type=int, default=1, help="parallel queue workers")
    parser.add_argument("--poll", type=float, default=15.0, help="seconds between status checks")
    args = parser.parse_args(argv)
    pending, status = drain(args.jobs, args.poll)
    failed = [name for name in pending if status.tasks.get(name) != "Success"]
    print(f"sweep: {len(pending) - len(failed)} of {len(pending)} experiments succeeded", flush=True)
    if failed:
        print(f"sweep: not successful: {', '.join(failed)} (see dvc queue logs NAME)", flush=True)
        raise SystemExit(1)


if __name__ == "__main__":
    run_stage(main)
