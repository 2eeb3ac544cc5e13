"""A clean checkout: no tracked file is an MLflow store (a sqlite database) or names a path of the machine it
was made on. A store committed by mistake opens in place of the checkout's own (MLflow's default tracking URI
is sqlite:///mlflow.db in the working directory), and a machine's path works nowhere else."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SQLITE = b"SQLite format 3\x00"  # the first 16 bytes of every sqlite database file
# Where a machine keeps its checkouts and throw-away files: a home or work directory, pytest's and Python's
# temporary directories, and URIs of local files. /tmp/<a name chosen in the docs> is not among them.
MACHINE_PATH = re.compile(
    r"(?<![\w.~-])(/(?:work|home|root|Users)/[\w.-]|/tmp/(?:pytest-of-|tmp)|file:///|sqlite:////)"
)
ALLOWED = {"tests/test_checkout.py"}  # the patterns themselves


def tracked() -> list[Path]:
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return [REPO / name for name in listing.decode().split("\0") if name]


@pytest.fixture(scope="module")
def files() -> list[Path]:
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    return [path for path in tracked() if path.is_file()]


def test_no_tracked_file_is_an_mlflow_store(files: list[Path]) -> None:
    stores = []
    for path in files:
        with path.open("rb") as stream:
            if stream.read(len(SQLITE)) == SQLITE:
                stores.append(str(path.relative_to(REPO)))
    assert not stores, f"sqlite databases tracked by git (git rm --cached them): {stores}"
    assert "mlflow.db" in (REPO / ".gitignore").read_text()


def test_no_tracked_text_names_a_path_of_the_machine_it_was_made_on(files: list[Path]) -> None:
    found = []
    for path in files:
        name = str(path.relative_to(REPO))
        if name in ALLOWED:
            continue
        data = path.read_bytes()
        if b"\x00" in data[:8000]:  # binary
            continue
        for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), start=1):
            if match := MACHINE_PATH.search(line):
                found.append(f"{name}:{number}: {match.group(0)!r} in {line.strip()[:120]!r}")
    assert not found, "absolute paths of a machine in tracked files:\n" + "\n".join(found)


@pytest.mark.parametrize(
    ("line", "machine"),
    [
        ("artifact_location: /work/main/mlruns/artifacts", True),
        ("see /home/alice/mnist-cnn/models", True),
        ("cached in /root/.cache/dvc", True),
        ("tmp_path is /tmp/pytest-of-bob/pytest-3/x", True),
        ("artifact_uri: file:///srv/mlruns/1", True),
        ("uri: sqlite:////var/lib/mlflow.db", True),
        ("screenshots in /tmp/mnist-cnn-ui/", False),
        ("sqlite:///mlruns/mlflow.db", False),
        ("src/mnist_cnn/work/thing.py and ~/work/x", False),
    ],
)
def test_what_counts_as_a_machines_path(line: str, machine: bool) -> None:
    assert bool(MACHINE_PATH.search(line)) == machine
