"""Provenance of a run (src/mnist_cnn/tracking/provenance.py): the commit and code digest, the run's name, and
the execution key that tells pipeline executions apart (a real git repository; a fake `dvc` process tree)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, tool_env
from mnist_cnn.tracking import provenance


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for name in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def git_repo(path: Path) -> None:
    """A committed repository with a package file, as the stages see their working directory."""
    (path / "src" / "pkg").mkdir(parents=True)
    (path / "src" / "pkg" / "code.py").write_text("x = 1\n")
    (path / "params.yaml").write_text("seed: 1\n")
    commit = ["-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-qm", "c"]
    for cmd in (["init", "-q"], ["add", "-A"], commit):
        subprocess.run(["git", *cmd], cwd=path, check=True, capture_output=True)


def test_a_plain_repro_run_is_named_after_the_commit_and_says_when_the_code_differs(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    git_repo(in_tmp)
    commit = provenance.git_commit()
    assert len(commit) == 40
    assert not provenance.changed_from_commit(*provenance.CODE)
    assert provenance.run_name(commit, dirty=False) == commit[:7]
    digest = provenance.code_digest()
    (in_tmp / "src" / "pkg" / "code.py").write_text("x = 2\n")
    assert provenance.changed_from_commit(*provenance.CODE) and provenance.code_digest() != digest
    assert provenance.run_name(commit, dirty=True) == f"{commit[:7]}-dirty"
    subprocess.run(["git", "checkout", "-q", "--", "src"], cwd=in_tmp, check=True)
    (in_tmp / "params.yaml").write_text("seed: 2\n")  # params edited, code as committed: the name says so
    assert not provenance.changed_from_commit(*provenance.CODE)
    assert provenance.run_name(commit, dirty=False) == f"{commit[:7]}-dirty"
    monkeypatch.setenv("DVC_EXP_NAME", "quick-fig")
    assert provenance.run_name(commit, dirty=True) == "quick-fig"


# A fake `dvc` (its console script's name) that runs two "stages" through a shell, as DVC runs a stage's cmd.
FAKE_DVC = """#!{python}
import subprocess, sys
stage = [sys.executable, "-c", "from mnist_cnn.tracking import provenance; print(provenance.execution_key())"]
for _ in range(2):
    subprocess.run(["/bin/sh", "-c", " ".join(stage[:2]) + ' "' + stage[2] + '"'], check=True)
"""


@pytest.mark.slow
def test_the_stages_of_one_dvc_process_share_its_key_and_a_stage_by_hand_is_its_own(tmp_path: Path) -> None:
    dvc = tmp_path / "bin" / "dvc"
    dvc.parent.mkdir()
    dvc.write_text(FAKE_DVC.format(python=sys.executable))
    dvc.chmod(0o755)
    env = {**tool_env(), "PYTHONPATH": str(REPO / "src")}
    keys = [subprocess.run([dvc], env=env, capture_output=True, text=True, check=True).stdout.split() for _ in range(2)]
    assert [len(k) for k in keys] == [2, 2]
    assert keys[0][0] == keys[0][1] and keys[1][0] == keys[1][1]  # two stages, one execution
    assert keys[0][0] != keys[1][0]  # the next `dvc` is another execution
    host, pid, started = keys[0][0].split(":")
    assert host == socket.gethostname() and int(pid) > 0 and float(started) > 0
    by_hand = [
        subprocess.run(
            [sys.executable, "-c", "from mnist_cnn.tracking import provenance; print(provenance.execution_key())"],
            env=env, capture_output=True, text=True, check=True,
        ).stdout.strip()
        for _ in range(2)
    ]  # fmt: skip
    assert by_hand[0] != by_hand[1] and by_hand[0].split(":")[1] != pid
