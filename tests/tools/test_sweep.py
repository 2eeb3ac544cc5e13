"""tools/sweep.py: reading `dvc queue status`, and a real queue of 3 experiments drained by 1 worker
although that worker is stopped after the first (the state DVC's workers have been seen to leave)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import run, tool_env
from mnist_cnn.cli import UserError
from mnist_cnn.tools.sweep import parse_status

STATUS = """Task     Name                 Created       Status
9294987  robust-0             Sep 19, 2024  Queued
22c83f3                       Sep 19, 2024  Running
3775500  robust-2             06:35 PM      Success
10f8332  robust-3             06:35 PM      Failed

Worker status: 0 active, 0 idle
"""


def test_parse_status_reads_names_states_and_workers() -> None:
    status = parse_status(STATUS)
    assert status.tasks == {"robust-0": "Queued", "22c83f3": "Running", "robust-2": "Success", "robust-3": "Failed"}
    assert status.active_workers == 0
    assert not status.stalled  # one is still running: its worker is alive, whatever the count says
    stalled = parse_status(STATUS.replace("Running", "Success"))
    assert stalled.stalled and stalled.named("Queued") == ["robust-0"]
    assert not parse_status(STATUS.replace("Running", "Success").replace("0 active", "1 active")).stalled
    with pytest.raises(UserError, match="unexpected `dvc queue status` output"):
        parse_status("ERROR: something else")


TOY_STAGE = """stages:
  work:
    cmd: python -c "import time; time.sleep(min(${n}, 2) * 2); open('out.txt', 'w').write('${n}')"
    params: [n]
    outs: [out.txt]
"""


@pytest.mark.slow
@pytest.mark.e2e
def test_a_queue_of_3_finishes_with_1_worker_stopped_midway(tmp_path: Path) -> None:
    repo = tmp_path / "toy"
    repo.mkdir()
    (repo / "params.yaml").write_text("n: 0\n")
    (repo / "dvc.yaml").write_text(TOY_STAGE)
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "repro", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "toy"]):  # fmt: skip
        run(cmd, repo)
    for n in (1, 2, 3):
        run(["dvc", "exp", "run", "--queue", "-n", f"toy-{n}", "-S", f"n={n}"], repo)
    sweep = subprocess.Popen(
        [sys.executable, "-m", "mnist_cnn.tools.sweep", "-j", "1", "--poll", "0.5"],
        cwd=repo, env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while "Success" not in run(["dvc", "queue", "status"], repo).stdout:
            assert time.monotonic() < deadline and sweep.poll() is None, "no experiment finished"
        # The worker now ends after its current experiment, with at least one still queued.
        run(["dvc", "queue", "stop"], repo)
        output, _ = sweep.communicate(timeout=180)
    finally:
        sweep.kill()
    assert sweep.returncode == 0, output
    assert "queued and no worker active; starting 1 again" in output, output
    assert "sweep: 3 of 3 experiments succeeded" in output, output
    shown = run(["dvc", "exp", "show", "--no-pager", "--csv"], repo).stdout
    assert all(f"toy-{n}" in shown for n in (1, 2, 3)), shown
