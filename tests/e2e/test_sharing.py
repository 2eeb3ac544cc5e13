"""Sharing results (README "Sharing"): a DVC remote in a local directory, a second git repository
as origin, `dvc push`/`dvc pull` and `dvc exp push`/`dvc exp pull` between two clones."""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from PIL import Image

from helpers import render_digits, run, tool_env

CACHED_OUTPUTS = ("data/raw", "data/processed", "models/model.pt", "models/mlflow_run.json", "reports")


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory, rerun: dict) -> dict[str, Path]:
    """Alice's repository after `dvc repro` (a copy of conftest's `rerun` repository, cache and run
    cache included, so nothing is retrained), pushed: git to a bare origin, outputs to a DVC remote."""
    root = tmp_path_factory.mktemp("sharing")
    origin, remote, alice = root / "origin.git", root / "dvc-remote", root / "alice"
    run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], root)
    shutil.copytree(rerun["repo"], alice, symlinks=True, ignore=shutil.ignore_patterns("tmp"))  # not .dvc/tmp
    run(["dvc", "remote", "add", "-d", "shared", str(remote)], alice)
    assert "Data and pipelines are up to date" in run(["dvc", "status"], alice).stdout
    run(["git", "add", "-A"], alice)
    run(["git", "commit", "-q", "--allow-empty", "-m", "results"], alice)
    run(["git", "remote", "add", "origin", str(origin)], alice)
    run(["git", "push", "-q", "origin", "main"], alice)
    run(["dvc", "push"], alice)
    return {"root": root, "origin": origin, "remote": remote, "alice": alice}


def clone(published: dict[str, Path], name: str) -> Path:
    target = published["root"] / name
    run(["git", "clone", "-q", str(published["origin"]), str(target)], published["root"])
    return target


def predict(repo: Path, image: Path) -> list[str]:
    result = run(
        ["python", "-m", "mnist_cnn.serving.predict", "--model", "models/model.pt", "--json", str(image)], repo
    )
    return result.stdout.splitlines()


def workspace_files(repo: Path) -> set[str]:
    """Files under the cached outputs' folders (what a pull could leave half-written)."""
    found = set()
    for folder in ("data", "models", "reports"):
        found |= {str(p.relative_to(repo)) for p in (repo / folder).rglob("*") if p.is_file()}
    return found - {"data/.gitignore", "models/.gitignore"}


def test_a_fresh_clone_restores_with_dvc_pull_instead_of_retraining(published: dict[str, Path]) -> None:
    alice, bob = published["alice"], clone(published, "bob")
    assert not (bob / "models" / "model.pt").exists()

    run(["dvc", "pull"], bob)
    assert "Data and pipelines are up to date" in run(["dvc", "status"], bob).stdout
    repro = run(["dvc", "repro"], bob).stdout
    assert "Running stage" not in repro
    stages = yaml.safe_load((bob / "dvc.yaml").read_text())["stages"]
    assert repro.count("didn't change, skipping") == len(stages)
    for output in CACHED_OUTPUTS:
        assert (bob / output).exists(), output
    assert (bob / "models/model.pt").read_bytes() == (alice / "models/model.pt").read_bytes()
    assert not (bob / "mlruns").exists()  # nothing ran: the MLflow store stays per checkout

    digit = published["root"] / "digit.png"
    Image.fromarray(render_digits(1, seed=5)[0][0]).resize((140, 140)).save(digit)
    assert predict(bob, digit) == predict(alice, digit)


def exp_show(repo: Path) -> dict[str, dict[str, str]]:
    """`dvc exp show --csv`, as {experiment name: row}."""
    text = run(["dvc", "exp", "show", "--csv", "--all-commits"], repo).stdout
    return {row["Experiment"]: row for row in csv.DictReader(io.StringIO(text)) if row["Experiment"]}


def test_experiments_travel_with_exp_push_and_pull(published: dict[str, Path]) -> None:
    alice = published["alice"]
    # --temp: Alice's workspace keeps the committed results the other tests compare against. One more
    # rotation angle: only corrupt and robustness run, the others are restored from the run cache.
    run(["dvc", "exp", "run", "--temp", "-n", "more-angles", "-S", "robustness.angles=[0,10,20]"], alice)
    run(["dvc", "exp", "push", "origin", "more-angles"], alice)  # git refs to origin, outputs to the remote
    carol = clone(published, "carol")
    assert "more-angles" not in exp_show(carol)

    run(["dvc", "exp", "pull", "origin", "more-angles"], carol)
    row = exp_show(carol)["more-angles"]
    columns = [k for k in row if k.endswith(("test_accuracy", "robust_mean_accuracy")) and row[k]]
    assert len(columns) == 2, row
    alice_row = exp_show(alice)["more-angles"]
    assert {k: row[k] for k in columns} == {k: alice_row[k] for k in columns}
    assert row["robustness.angles"] == alice_row["robustness.angles"] == "[0, 10, 20]"

    # The experiment's outputs came along too: applying it runs nothing.
    run(["dvc", "exp", "apply", "more-angles"], carol)
    run(["dvc", "checkout"], carol)
    assert "Data and pipelines are up to date" in run(["dvc", "status"], carol).stdout
    assert yaml.safe_load((carol / "params.yaml").read_text())["robustness"]["angles"] == [0, 10, 20]
    degrees = {float(r["degrees"]) for r in csv.DictReader((carol / "plots/robustness_rotation.csv").open())}
    assert degrees == {-20, -10, 0, 10, 20}


def failed_pull(repo: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["dvc", "pull"], cwd=repo, env=tool_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0, result.stdout
    return result


def test_an_unreachable_remote_fails_clearly_and_writes_nothing(published: dict[str, Path]) -> None:
    dave = clone(published, "dave")
    missing = published["root"] / "unmounted-share"
    run(["dvc", "remote", "modify", "--local", "shared", "url", str(missing)], dave)
    result = failed_pull(dave)
    message = result.stderr + result.stdout
    # DVC names what it could not check out, but not why (that needs `dvc pull -v`) ...
    assert "ERROR" in message and "models/model.pt" in message
    assert "Traceback" not in message
    assert workspace_files(dave) == set()
    # ... which `make pull` says first, in one line.
    check = subprocess.run(
        ["python", "-m", "mnist_cnn.tools.remote"],
        cwd=dave,
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 2
    assert check.stderr.strip() == f"error: DVC remote 'shared' ({missing}): no such directory (is the share mounted?)"


def test_an_object_missing_on_the_remote_is_named_and_the_rest_restored(published: dict[str, Path]) -> None:
    erin = clone(published, "erin")
    damaged = published["root"] / "damaged-remote"
    shutil.copytree(published["remote"], damaged)
    lock = yaml.safe_load((erin / "dvc.lock").read_text())
    model_md5 = next(o["md5"] for o in lock["stages"]["train"]["outs"] if o["path"] == "models/model.pt")
    (damaged / "files" / "md5" / model_md5[:2] / model_md5[2:]).unlink()
    run(["dvc", "remote", "modify", "--local", "shared", "url", str(damaged)], erin)

    result = failed_pull(erin)
    message = result.stderr + result.stdout
    assert "models/model.pt" in message
    assert "Traceback" not in message
    files = workspace_files(erin)
    assert "models/model.pt" not in files
    assert not [f for f in files if ".tmp" in f or f.endswith(".part")]  # no half-written files
    # Everything else came down whole.
    original = workspace_files(published["alice"]) - {"models/model.pt"}
    assert files == original
    for name in files:
        assert (erin / name).read_bytes() == (published["alice"] / name).read_bytes(), name
