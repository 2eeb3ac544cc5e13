"""Sharing through object storage (docs/operations.md, "A team on object storage"): a DVC remote in an
S3 bucket (conftest's `object_store`: moto's S3 server on loopback, with its own key pair), set up with
the commands the document gives and pushed and pulled with the ones `make push` / `make pull` run.
One scenario: the store stops in the middle of the first push and comes back; a teammate's clone
first has the wrong key pair, then the right one. Skipped where the team extra is not installed."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from helpers import REPO, VENV_BIN, render_digits, run, tool_env
from object_store import BUCKET, ObjectStore

DOC = REPO / "docs" / "operations.md"
DOC_ENDPOINT = "http://s3-host:9000"  # the document's endpoint, replaced by the test store's
CACHED_OUTPUTS = ("data/raw", "data/processed", "models/model.pt", "models/mlflow_run.json", "reports")


def doc_commands(marker: str) -> list[str]:
    """The command lines of the ```sh block of docs/operations.md that contains `marker`."""
    blocks = re.findall(r"^```sh\n(.*?)^```", DOC.read_text(), re.MULTILINE | re.DOTALL)
    block = next((b for b in blocks if marker in b), None)
    assert block is not None, f"docs/operations.md has no sh block with {marker!r}"
    lines = [line.split("  #")[0].strip() for line in block.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def make_recipe(target: str) -> list[str]:
    """The commands of a Makefile target (what `make pull` / `make push` run after `setup`)."""
    match = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert match, f"the Makefile has no {target} target"
    return [line.strip() for line in match.group(1).splitlines()]


def shell(line: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """One line as a member's shell runs it (the venv's bin first on PATH, as `make` puts it)."""
    return subprocess.run(
        ["bash", "-c", line], cwd=cwd, env=tool_env(**env), capture_output=True, text=True, timeout=300
    )


def ok(line: str, cwd: Path, **env: str) -> str:
    result = shell(line, cwd, **env)
    assert result.returncode == 0, f"{line} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def content_addressed(objects: dict[str, bytes]) -> bool:
    """Every object of DVC's remote is whole: its name is the MD5 of its content (files/md5/ab/cdef...)."""
    names = {key: key.split("/files/md5/")[1].replace("/", "").removesuffix(".dir") for key in objects}
    return all(hashlib.md5(body).hexdigest() == names[key] for key, body in objects.items())


def workspace_files(repo: Path) -> dict[str, bytes]:
    found = {}
    for folder in ("data", "models", "reports"):
        found |= {str(p.relative_to(repo)): p.read_bytes() for p in (repo / folder).rglob("*") if p.is_file()}
    return {name: body for name, body in found.items() if not name.endswith(".gitignore")}


@pytest.fixture(scope="module")
def shared(object_store: ObjectStore, tmp_path_factory: pytest.TempPathFactory, rerun: dict) -> dict:
    """Alice's repository (a copy of conftest's `rerun`, its cache included) pushed to the bucket while
    the store stops after a few uploads, then again once it is back; Bob's clone pulled, first with a
    wrong key pair. Returns what each step said. (The store first: without the extra, the test is
    skipped before `rerun` is built.)"""
    with object_store.authenticating():  # a wrong key is refused
        return share(tmp_path_factory.mktemp("s3-sharing"), rerun["repo"], object_store)


def share(root: Path, results: Path, store: ObjectStore) -> dict:
    seen: dict = {}
    keys = store.env()  # exported by every member (docs: step 1)
    origin, alice = root / "origin.git", root / "alice"
    run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], root)
    shutil.copytree(results, alice, symlinks=True, ignore=shutil.ignore_patterns("tmp"))  # not .dvc/tmp
    seen["alice"] = alice
    run(["git", "add", "-A"], alice)
    run(["git", "commit", "-q", "--allow-empty", "-m", "results"], alice)

    # 3. The DVC remote, with the document's commands; the endpoint is the test store's.
    seen["remote_commands"] = doc_commands("dvc remote add -d shared s3://")
    for line in seen["remote_commands"]:
        ok(line.replace(DOC_ENDPOINT, store.endpoint), alice, **keys)
    run(["git", "remote", "add", "origin", str(origin)], alice)
    run(["git", "push", "-q", "origin", "main"], alice)
    seen["push_recipe"], seen["pull_recipe"] = make_recipe("push"), make_recipe("pull")
    check, push = seen["push_recipe"]

    # The store stops after 3 uploads. One attempt per request (botocore's AWS_MAX_ATTEMPTS) so that the
    # failing push gives up in seconds rather than after botocore's and s3fs's retries.
    store.stop_after_uploads(3)
    seen["interrupted_push"] = shell(push, alice, AWS_MAX_ATTEMPTS="1", **keys)
    seen["store_stopped"] = not store.running
    seen["check_while_stopped"] = shell(check, alice, **keys)
    store.start()
    seen["after_interruption"] = store.objects("dvc/")
    seen["retried_push"] = ok(f"{check} && {push}", alice, **keys)
    seen["cloud_status"] = ok("dvc status --cloud", alice, **keys)
    seen["remote_objects"] = store.objects("dvc/")

    # A teammate's clone: a wrong secret key first, then the right one.
    bob = root / "bob"
    run(["git", "clone", "-q", str(origin), str(bob)], root)
    seen["bob"] = bob
    wrong = {**keys, "AWS_SECRET_ACCESS_KEY": "not-the-key"}
    seen["check_wrong_key"] = shell(check, bob, **wrong)
    seen["pull_wrong_key"] = shell(seen["pull_recipe"][1], bob, **wrong)
    seen["files_after_wrong_key"] = workspace_files(bob)
    seen["pull"] = ok(" && ".join(seen["pull_recipe"]), bob, **keys)
    seen["status"] = ok("dvc status", bob, **keys)
    digit = root / "digit.png"
    Image.fromarray(render_digits(1, seed=5)[0][0]).resize((140, 140)).save(digit)
    predict = [str(VENV_BIN / "mnist-cnn-predict"), "--model", "models/model.pt", "--json", str(digit)]
    seen["predictions"] = {name: run(predict, repo).stdout for name, repo in (("alice", alice), ("bob", bob))}
    return seen


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_the_documented_remote_is_the_bucket(shared: dict, object_store: ObjectStore) -> None:
    assert shared["remote_commands"][:2] == [
        f"dvc remote add -d shared s3://{BUCKET}/dvc",
        f"dvc remote modify shared endpointurl {DOC_ENDPOINT}",
    ]
    config = (shared["alice"] / ".dvc" / "config").read_text()
    assert f"url = s3://{BUCKET}/dvc" in config and f"endpointurl = {object_store.endpoint}" in config
    assert "secret" not in config  # the key pair stays in each member's environment
    assert shared["push_recipe"] == ["python -m mnist_cnn.tools.remote", "dvc push"]
    assert shared["pull_recipe"] == ["python -m mnist_cnn.tools.remote", "dvc pull"]


def test_a_push_cut_by_the_store_stopping_completes_when_it_returns(shared: dict, object_store: ObjectStore) -> None:
    interrupted = shared["interrupted_push"]
    assert shared["store_stopped"]
    # DVC names what it could not upload, each with the cause.
    assert interrupted.returncode != 0, interrupted.stderr
    assert re.search(r"failed to transfer '[0-9a-f]{32}(\.dir)?' - Could not connect", interrupted.stderr)
    assert "Traceback" not in interrupted.stderr
    line = one_error_line(shared["check_while_stopped"])
    where = f"DVC remote 'shared' (s3://{BUCKET}/dvc)"
    assert line == f"error: {where} is unreachable: could not connect to {object_store.endpoint}/{BUCKET}"

    # What was uploaded before the stop is there, whole; the retry uploads the rest, and nothing is lost.
    before, after = shared["after_interruption"], shared["remote_objects"]
    assert 3 <= len(before) < len(after), (len(before), len(after))
    assert content_addressed(before) and content_addressed(after)
    assert all(after[key] == body for key, body in before.items())
    pushed = re.search(r"(\d+) files? pushed", shared["retried_push"])
    assert pushed and int(pushed.group(1)) == len(after) - len(before), shared["retried_push"]
    assert "DVC remote reachable: s3://mnist-cnn/dvc" in shared["retried_push"]
    assert "Cache and remote 'shared' are in sync" in shared["cloud_status"]


def test_a_wrong_key_pair_is_named_and_writes_nothing(shared: dict) -> None:
    line = one_error_line(shared["check_wrong_key"])
    assert line.startswith(f"error: DVC remote 'shared' (s3://{BUCKET}/dvc): refused the key pair (")
    assert "SignatureDoesNotMatch" in line
    failed = shared["pull_wrong_key"]
    assert failed.returncode != 0 and "Traceback" not in failed.stderr
    assert shared["files_after_wrong_key"] == {}


def test_a_fresh_clone_pulls_everything_from_the_bucket(shared: dict) -> None:
    alice, bob = shared["alice"], shared["bob"]
    assert "Data and pipelines are up to date" in shared["status"]
    for output in CACHED_OUTPUTS:
        assert (bob / output).exists(), output
    assert workspace_files(bob) == workspace_files(alice)
    assert not (bob / "mlruns").exists()
    answers = shared["predictions"]
    assert answers["bob"] == answers["alice"] and '"digit": ' in answers["bob"]
