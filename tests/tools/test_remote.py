"""`python -m mnist_cnn.tools.remote`: one line saying whether the DVC remote answers, and why not.

In-process (remote.main under run_stage, in a real DVC repository made and configured with DVC's
own Repo API, as `dvc init` and `dvc remote add` do); `make pull` runs the same code as a process.
The S3 checks ask conftest's `object_store` (skipped where the team extra is not installed).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dvc.repo import Repo

from helpers import free_port, run
from mnist_cnn.cli import run_stage
from mnist_cnn.tools import remote
from object_store import BUCKET, ObjectStore


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_process: None) -> Path:
    path = tmp_path / "repo"
    path.mkdir()
    run(["git", "init", "-q"], path)
    Repo.init(str(path)).close()
    monkeypatch.chdir(path)
    return path


def remote_add(repo: Path, name: str, url: str, default: bool = False, **options: str) -> None:
    """`dvc remote add [-d] name url`, and `dvc remote modify name option value` for each option."""
    with Repo(str(repo)) as dvc, dvc.config.edit() as config:
        config["remote"][name] = {"url": url, **options}
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
    remote_add(repo, "cloud", "gs://bucket/mnist", default=True)  # dvc-gs is in no extra
    assert "dvc-gs" in one_error_line(check(capsys))


@pytest.fixture
def s3_remote(repo: Path, object_store: ObjectStore, monkeypatch: pytest.MonkeyPatch) -> Iterator[ObjectStore]:
    """The default remote `shared` in the object store's bucket (`dvc remote add` + `dvc remote modify
    shared endpointurl`), its key pair in the environment as docs/operations.md has it; only that
    key pair is accepted."""
    remote_add(repo, "shared", f"s3://{BUCKET}/checks", default=True, endpointurl=object_store.endpoint)
    for name, value in object_store.env().items():
        monkeypatch.setenv(name, value)
    with object_store.authenticating():
        yield object_store


def test_an_s3_bucket_that_answers(s3_remote: ObjectStore, capsys: pytest.CaptureFixture[str]) -> None:
    result = check(capsys)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"DVC remote reachable: s3://{BUCKET}/checks\n"


def test_a_wrong_bucket_is_named(repo: Path, s3_remote: ObjectStore, capsys: pytest.CaptureFixture[str]) -> None:
    remote_add(repo, "typo", "s3://mnist-cmn/checks", endpointurl=s3_remote.endpoint)
    line = one_error_line(check(capsys, "-r", "typo"))
    assert line == "error: DVC remote 'typo' (s3://mnist-cmn/checks): no such bucket 'mnist-cmn'"


WRONG_KEYS = [("AWS_SECRET_ACCESS_KEY", "SignatureDoesNotMatch"), ("AWS_ACCESS_KEY_ID", "InvalidAccessKeyId")]


@pytest.mark.parametrize(("variable", "code"), WRONG_KEYS)
def test_a_wrong_key_pair_is_named(
    s3_remote: ObjectStore, variable: str, code: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv(variable, "AKIAWRONGWRONGWRONG0")
    line = one_error_line(check(capsys))
    assert line.startswith(f"error: DVC remote 'shared' (s3://{BUCKET}/checks): refused the key pair ({code}: ")


def test_a_stopped_store_is_unreachable(s3_remote: ObjectStore, capsys: pytest.CaptureFixture[str]) -> None:
    s3_remote.stop()
    try:
        line = one_error_line(check(capsys))
    finally:
        s3_remote.start()
    where = f"DVC remote 'shared' (s3://{BUCKET}/checks)"
    assert line == f"error: {where} is unreachable: could not connect to {s3_remote.endpoint}/{BUCKET}"
