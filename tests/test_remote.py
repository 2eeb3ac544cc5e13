"""`python -m mnist_cnn.remote`: one line saying whether the DVC remote answers, and why not."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from helpers import free_port, run, tool_env


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    path.mkdir()
    run(["git", "init", "-q"], path)
    run(["dvc", "init", "-q"], path)
    return path


def check(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = ["python", "-m", "mnist_cnn.remote", *args]
    return subprocess.run(cmd, cwd=repo, env=tool_env(), capture_output=True, text=True, timeout=120)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_a_reachable_local_remote(repo: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    run(["dvc", "remote", "add", "-d", "shared", str(store)], repo)
    result = check(repo)
    assert result.returncode == 0, result.stderr
    assert str(store) in result.stdout


def test_an_unmounted_share_is_named(repo: Path, tmp_path: Path) -> None:
    run(["dvc", "remote", "add", "-d", "shared", str(tmp_path / "not-mounted")], repo)
    line = one_error_line(check(repo))
    assert "'shared'" in line and "not-mounted" in line and "no such directory" in line


def test_a_server_that_refuses_connections_is_named(repo: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/dvc-store"  # nothing listens there
    run(["dvc", "remote", "add", "-d", "team", url], repo)
    line = one_error_line(check(repo))
    assert url in line and "unreachable" in line and "refused" in line.lower()


def test_a_named_remote_other_than_the_default(repo: Path, tmp_path: Path) -> None:
    run(["dvc", "remote", "add", "-d", "shared", str(tmp_path)], repo)
    run(["dvc", "remote", "add", "backup", str(tmp_path / "gone")], repo)
    assert check(repo).returncode == 0
    assert "'backup'" in one_error_line(check(repo, "-r", "backup"))


def test_no_remote_configured_says_how_to_add_one(repo: Path) -> None:
    line = one_error_line(check(repo))
    assert "no remote specified" in line and "dvc remote add -d" in line


def test_a_storage_type_without_its_plugin(repo: Path) -> None:
    run(["dvc", "remote", "add", "-d", "cloud", "s3://bucket/mnist"], repo)
    assert "dvc-s3" in one_error_line(check(repo))
