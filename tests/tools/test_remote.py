"""`python -m mnist_cnn.tools.remote`: one line saying whether the DVC remote answers, and why not.

In-process (remote.main under run_stage, in a real DVC repository made and configured with DVC's
own Repo API, as `dvc init` and `dvc remote add` do); `make pull` runs the same code as a process.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from dvc.repo import Repo

from helpers import free_port, run
from mnist_cnn.cli import run_stage
from mnist_cnn.tools import remote


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_process: None) -> Path:
    path = tmp_path / "repo"
    path.mkdir()
    run(["git", "init", "-q"], path)
    Repo.init(str(path)).close()
    monkeypatch.chdir(path)
    return path


def remote_add(repo: Path, name: str, url: str, default: bool = False) -> None:
    """`dvc remote add [-d] name url`."""
    with Repo(str(repo)) as dvc, dvc.config.edit() as config:
        config["remote"][name] = {"url": url}
        if default:
            config["core"]["remote"] = name


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def check(capsys: pytest.CaptureFixture[str], *args: str) -> Result:
    try:
        run_stage(lambda: remote.main(list(args)))
        code = 0
    except SystemExit as exit_info:
        code = int(exit_info.code or 0)
    out, err = capsys.readouterr()
    return Result(code, out, err)


def one_error_line(result: Result) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_a_reachable_local_remote(repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    store.mkdir()
    remote_add(repo, "shared", str(store), default=True)
    result = check(capsys)
    assert result.returncode == 0, result.stderr
    assert str(store) in result.stdout


def test_an_unmounted_share_is_named(repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    remote_add(repo, "shared", str(tmp_path / "not-mounted"), default=True)
    line = one_error_line(check(capsys))
    assert "'shared'" in line and "not-mounted" in line and "no such directory" in line


def test_a_server_that_refuses_connections_is_named(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}/dvc-store"  # nothing listens there
    remote_add(repo, "team", url, default=True)
    line = one_error_line(check(capsys))
    assert url in line and "unreachable" in line and "refused" in line.lower()


def test_a_named_remote_other_than_the_default(repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    remote_add(repo, "shared", str(tmp_path), default=True)
    remote_add(repo, "backup", str(tmp_path / "gone"))
    assert check(capsys).returncode == 0
    assert "'backup'" in one_error_line(check(capsys, "-r", "backup"))


def test_no_remote_configured_says_how_to_add_one(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = one_error_line(check(capsys))
    assert "no remote specified" in line and "dvc remote add -d" in line


def test_a_storage_type_without_its_plugin(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    remote_add(repo, "cloud", "s3://bucket/mnist", default=True)
    assert "dvc-s3" in one_error_line(check(capsys))
