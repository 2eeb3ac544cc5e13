"""Provenance of a run: the commit and code it was made from, its name, and the pipeline execution it
belongs to (the nearest DVC ancestor process: DVC sets no per-execution variable). docs/tracking.md."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
from pathlib import Path

import psutil

CODE = ("src", "dvc.yaml")  # what "the code" is, for git.dirty and code.digest


def git_commit() -> str:
    """The commit the run was made from (the experiment's baseline under dvc exp run)."""
    if rev := os.environ.get("DVC_EXP_BASELINE_REV"):
        return rev
    return _git("rev-parse", "HEAD") or "unknown"


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip()


def changed_from_commit(*paths: str) -> bool:
    """Whether the working tree's `paths` differ from HEAD (edited, added or deleted; untracked files count);
    under `dvc exp run --temp/--queue` HEAD is the baseline and the experiment's changes are uncommitted."""
    return bool(_git("status", "--porcelain", "--", *paths))


def code_digest(root: Path = Path("src")) -> str:
    """A sha256 (12 hex digits) of the package's Python files as they are run: the code a run was made with,
    committed or not."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def run_name(commit: str, dirty: bool) -> str:
    """The DVC experiment's name; for a plain `dvc repro`, the commit's short hash, `-dirty` when the code
    or params.yaml differ from it (as `git describe --dirty` marks it)."""
    if exp_name := os.environ.get("DVC_EXP_NAME"):
        return exp_name
    short = commit[:7] if commit != "unknown" else "no-commit"
    return f"{short}-dirty" if dirty or changed_from_commit("params.yaml") else short


def _is_dvc(process: psutil.Process) -> bool:
    """Whether a process is DVC itself: `dvc ...` (its console script, run by python or frozen) or `python -m dvc`."""
    cmdline = process.cmdline()
    return any(Path(arg).name == "dvc" for arg in cmdline[:2]) or cmdline[1:3] == ["-m", "dvc"]


def execution_key() -> str:
    """host:pid:start time of the process that runs this pipeline execution's stages: the nearest DVC ancestor
    (`dvc repro`, `dvc exp run` in the workspace or with --temp, and `dvc exp exec-run`, the process a queue
    worker starts for each queued experiment), else this process (a stage run by hand is its own execution).
    DVC sets no variable that tells executions apart (only DVC_ROOT, DVC_STAGE and, for experiments, their
    name and baseline, which repeat), so the process tree is what does; the start time makes a reused pid a
    new key."""
    here = psutil.Process()
    owner = here
    for ancestor in here.parents():
        try:
            if _is_dvc(ancestor):
                owner = ancestor
                break
        except (psutil.NoSuchProcess, psutil.AccessDenied, IndexError):
            continue
    return f"{socket.gethostname()}:{owner.pid}:{owner.create_time():.3f}"
