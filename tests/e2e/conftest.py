"""The end-to-end fixtures: real git, DVC, MLflow stores and servers, in throw-away repositories.

Each session fixture is one scenario, run once; what a later scenario changes in the same
repository, an earlier one has recorded before it returned, so its tests read its own record.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from helpers import REPO, VENV_BIN, all_runs, free_port, http_server, make_pipeline_repo, run, store_client, tool_env

# An edit of the refusal's code that changes models/refusal.pt: the thresholds refuse twice the budget.
REFUSAL_CODE = ("budget.refused_training, shares)", "2 * budget.refused_training, shares)")
# The two experiments of the same trained model: the second changes only how many images robustness scores.
EXPERIMENT = ["-S", "data.subset=600", "-S", "train.epochs=1", "-S", "robustness.curve_samples=100"]
SAMPLES = {"first": 300, "second": 150}


def wait_until(condition, what: str, timeout: float = 600, process: subprocess.Popen | None = None, log=None):
    """Poll `condition` until it returns something true (returned); fail after `timeout` s or when `process` ends."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        details = f":\n{log.read_text()}" if log is not None else ""
        assert process is None or process.poll() is None, f"ended before {what}{details}"
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}{details}"
        time.sleep(0.2)
    return value


def status(repo: Path) -> dict:
    return json.loads(run(["dvc", "status", "--json"], repo).stdout)


def status_after_setting(repo: Path, section: str, *path_and_value: object) -> dict:
    """`dvc status` with one param of params.yaml changed; the file is restored after."""
    path = repo / "params.yaml"
    original = path.read_text()
    try:
        params = yaml.safe_load(original)
        *keys, last, value = [section, *path_and_value]
        node = params
        for key in keys:
            node = node[key]
        node[last] = value
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        return status(repo)
    finally:
        path.write_text(original)


def commit_all(repo: Path, message: str) -> None:
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", message], repo)


def run_metrics(client, run_id: str) -> dict[str, list[float]]:
    """Every model metric of a run (system metrics aside) with its whole history."""
    names = [k for k in client.get_run(run_id).data.metrics if not k.startswith("system/")]
    return {k: [m.value for m in client.get_metric_history(run_id, k)] for k in names}


def status_after_appending(repo: Path, module: str) -> dict:
    """`dvc status` with a comment appended to one module of the package; the module is restored after."""
    path = repo / "src" / "mnist_cnn" / module
    original = path.read_text()
    try:
        path.write_text(original + "# an edit\n")
        return status(repo)
    finally:
        path.write_text(original)


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory: pytest.TempPathFactory, synthetic_mnist: Path) -> Path:
    """A repository after `dvc repro` and one ablation experiment, `--temp` (two runs, two versions)."""
    repo = make_pipeline_repo(tmp_path_factory.mktemp("pipeline"), synthetic_mnist)
    run(["dvc", "repro"], repo)
    # --temp runs in a copy under .dvc/tmp/exps/: it must still log into the repo's store.
    run(["dvc", "exp", "run", "--temp", "-S", "augment=false", "-S", "seed=7"], repo)
    return repo


@pytest.fixture(scope="session")
def rerun(tmp_path_factory: pytest.TempPathFactory, synthetic_mnist: Path) -> dict:
    """A repository of its own (beside `pipeline`, so that both build at once) through four scenarios:
    1. `dvc repro` (run 1, version 1), then `dvc status` with one module edited, or one param set, at a time;
    2. the refusal's code edited (not committed) and `dvc repro` again: the stages after train rerun in a new
       run that says the code differs from its commit, and register publishes its version 2;
    3. two experiments of one trained model, `first` and `second`, that differ only in
       robustness.corruption_samples (train cached in the second);
    4. `dvc exp run -n margins` with a gate margin and the refusal budget set by -S, then a bad margin.
    Returns the repository and what was seen."""
    repo = make_pipeline_repo(tmp_path_factory.mktemp("rerun"), synthetic_mnist)
    client = store_client(repo)
    seen: dict = {"repo": repo}
    run(["dvc", "repro"], repo)
    seen["registered_first"] = json.loads((repo / "models/registered.json").read_text())
    seen["status_after_edit"] = {
        module: status_after_appending(repo, module)
        for module in ("core/augment.py", "core/refusal.py", "registry/gate.py", "tools/loadtest.py")
    }
    seen["status_after_param"] = {
        "register.seed_std.ood": status_after_setting(repo, "register", "seed_std", "ood", 0.05),
        "register.margin_z": status_after_setting(repo, "register", "margin_z", 3.0),
        "evaluate.refused_training": status_after_setting(repo, "evaluate", "refused_training", 0.02),
    }
    commit_all(repo, "the first dvc repro")
    first_run = seen["registered_first"]["run_id"]
    seen["first_run_metrics"] = run_metrics(client, first_run)

    refusal = repo / "src/mnist_cnn/core/refusal.py"
    assert REFUSAL_CODE[0] in refusal.read_text()
    refusal.write_text(refusal.read_text().replace(*REFUSAL_CODE))
    seen["rerun_log"] = run(["dvc", "repro"], repo).stdout
    seen["registered"] = json.loads((repo / "models/registered.json").read_text())
    seen["first_run_metrics_after"] = run_metrics(client, first_run)
    seen["first_run"], seen["code_run"] = client.get_run(first_run), client.get_run(seen["registered"]["run_id"])
    seen["code_run_metrics"] = run_metrics(client, seen["registered"]["run_id"])
    seen["head"] = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    champion = client.get_model_version_by_alias("mnist-cnn", "champion")
    seen["champion_after_rerun"] = str(champion.version)
    download = mlflow.artifacts.download_artifacts(
        artifact_uri=client.get_model_version_download_uri("mnist-cnn", champion.version),
        dst_path=str(tmp_path_factory.mktemp("champion")),
    )
    seen["champion_refusal"] = torch.load(Path(download) / "artifacts/refusal.pt", weights_only=True)
    seen["workspace_refusal"] = torch.load(repo / "models/refusal.pt", weights_only=True)
    seen["superseded_gate_tag"] = client.get_model_version("mnist-cnn", "1").tags.get("gate", "")
    commit_all(repo, "refuse more")

    for name, samples in SAMPLES.items():
        command = ["dvc", "exp", "run", "-n", name, *EXPERIMENT, "-S", f"robustness.corruption_samples={samples}"]
        seen[f"{name}_log"] = run(command, repo).stdout
        seen[f"{name}_robustness"] = json.loads((repo / "metrics/robustness.json").read_text())
        seen[f"{name}_registered"] = json.loads((repo / "models/registered.json").read_text())

    seen["margins_log"] = run(
        ["dvc", "exp", "run", "-n", "margins", "-S", "register.margin_z=3", "-S", "evaluate.refused_training=0.02"],
        repo,
    ).stdout
    seen["margins_registered"] = json.loads((repo / "models/registered.json").read_text())
    seen["exp_show"] = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    bad = ["dvc", "exp", "run", "-S", "register.margin_z=-1"]
    seen["bad_margin"] = subprocess.run(bad, cwd=repo, env=tool_env(), capture_output=True, text=True, timeout=600)
    seen["runs"] = {r.info.run_name: r for r in all_runs(client)}
    seen["versions"] = {str(v.version): v for v in client.search_model_versions("name='mnist-cnn'")}
    seen["aliases"] = {a: str(v) for a, v in client.get_registered_model("mnist-cnn").aliases.items()}
    seen["metrics"] = {name: run_metrics(client, r.info.run_id) for name, r in seen["runs"].items()}
    # The tests after these share the repository as its last commit left it: the experiments applied their
    # results to the workspace, and the bad margin stopped register after DVC had removed its output.
    run(["git", "checkout", "--", "."], repo)
    run(["dvc", "checkout", "--force"], repo)
    return seen


def readme_preset_command() -> list[str]:
    """The `dvc exp run -n improved ...` line exactly as README.md gives it."""
    match = re.search(r"^dvc exp run -n improved (?:.*\\\n)*.*$", (REPO / "README.md").read_text(), re.MULTILINE)
    assert match, "README.md has no `dvc exp run -n improved` line"
    return shlex.split(match.group(0).replace("\\\n", " "))


@pytest.fixture(scope="session")
def killed_repro(tmp_path_factory: pytest.TempPathFactory, synthetic_mnist: Path) -> dict:
    """A second repository, for what must not disturb `pipeline`: `dvc repro` whose train stage is
    killed by SIGKILL mid-training, and what that leaves. Its train.py prints a committed marker."""
    repo = make_pipeline_repo(tmp_path_factory.mktemp("queued"), synthetic_mnist, train__epochs=1000)
    train = repo / "src" / "mnist_cnn" / "stages" / "train.py"
    train.write_text(train.read_text() + '\nprint("code: as committed")\n')
    run(["git", "commit", "-qam", "mark the committed code"], repo)
    seen: dict = {"repo": repo}

    run_file, log = repo / "models" / "mlflow_run.json", repo.parent / "killed-repro.log"
    with log.open("w") as sink:
        dvc = subprocess.Popen(["dvc", "repro"], cwd=repo, env=tool_env(), stdout=sink, stderr=subprocess.STDOUT)
    try:
        # The train stage has created its run (the file is written whole, after the run has its tags).
        wait_until(run_file.exists, "the train stage created its run", process=dvc, log=log)
        seen["killed_id"] = json.loads(run_file.read_text())["run_id"]
        client = store_client(repo)
        pid = int(client.get_run(seen["killed_id"]).data.tags["pid"])
        # Training has begun: the first epoch is under way once the training set is logged as its input.
        wait_until(
            lambda: client.get_run(seen["killed_id"]).inputs.dataset_inputs, "training began", process=dvc, log=log
        )
        seen["killed_cmdline"] = Path(f"/proc/{pid}/cmdline").read_bytes()
        os.kill(pid, signal.SIGKILL)
        seen["killed_repro_exit"] = dvc.wait(timeout=120)
    finally:
        if dvc.poll() is None:
            dvc.kill()
            dvc.wait()
    seen["killed_repro_log"] = log.read_text()
    seen["model_after_kill"] = (repo / "models" / "model.pt").exists()
    seen["status_after_kill"] = client.get_run(seen["killed_id"]).info.status
    return seen


@pytest.fixture(scope="session")
def recovered_repro(killed_repro: dict) -> dict:
    """`dvc repro` again after the kill (2 epochs now): it recovers, and creates the store's next run."""
    repo = killed_repro["repo"]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["epochs"] = 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "commit", "-qam", "2 epochs"], repo)
    run(["dvc", "repro"], repo)
    return {
        "repo": repo,
        "run_id": json.loads((repo / "models" / "mlflow_run.json").read_text())["run_id"],
        "model_exists": (repo / "models" / "model.pt").exists(),
        "status": status(repo),
        "temp_files": [p for p in repo.rglob("*.tmp") if ".dvc" not in p.parts and "mlruns" not in p.parts],
    }


@pytest.fixture(scope="session")
def queued_experiments(recovered_repro: dict) -> dict:
    """Two experiments queued: `queued-1` (seed 1) and the README's `dvc exp run -n improved ...` preset
    (seed 2); the workspace's train.py then edited, and the queue run by 2 parallel workers (one sqlite
    store). Returns what the queue said and logged."""
    repo = recovered_repro["repo"]
    train = repo / "src" / "mnist_cnn" / "stages" / "train.py"
    committed = train.read_text()
    seen: dict = {"repo": repo, "preset_command": readme_preset_command()}
    assert seen["preset_command"][:3] == ["dvc", "exp", "run"], seen["preset_command"]
    run(["dvc", "exp", "run", "--queue", "-n", "queued-1", "-S", "seed=1"], repo)
    run(["dvc", "exp", "run", "--queue", *seen["preset_command"][3:], "-S", "seed=2"], repo)
    train.write_text(committed.replace("as committed", "edited after queueing"))
    try:
        # --run-all starts 2 workers and follows every experiment's log until all have ended.
        # One thread per process: 2 trainings on 2 cores would otherwise oversubscribe them.
        result = run(["dvc", "exp", "run", "--run-all", "-j", "2"], repo, OMP_NUM_THREADS="1")
    finally:
        subprocess.run(["dvc", "queue", "stop"], cwd=repo, env=tool_env(), capture_output=True, timeout=60)
        train.write_text(committed)
    seen["run_all_output"] = result.stdout + result.stderr
    seen["queue_status"] = run(["dvc", "queue", "status"], repo).stdout
    seen["queue_logs"] = {name: run(["dvc", "queue", "logs", name], repo).stdout for name in ("queued-1", "improved")}
    return seen


@pytest.fixture(scope="session")
def applied_preset(queued_experiments: dict) -> Path:
    """`dvc exp apply improved`: the preset's outputs in the workspace."""
    repo = queued_experiments["repo"]
    run(["dvc", "exp", "apply", "improved"], repo)
    return repo


@pytest.fixture(scope="session")
def scoring_server(rerun: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """`make serve`'s server (python -m mnist_cnn.serving.server: MLflow's app behind the guard, 2
    workers, one torch thread each) on the `rerun` repository's workspace model, started once for
    test_serving.py and test_serving_hostile.py. Yields its URL, the model URI, the launcher's pid and
    the line it printed about the model it resolved."""
    repo = rerun["repo"]
    port, folder = free_port(), tmp_path_factory.mktemp("serve")
    registered = json.loads((repo / "models/registered.json").read_text())["model"]  # the workspace's model
    cmd = [str(VENV_BIN / "python"), "-m", "mnist_cnn.serving.server", "-m", registered, "-p", str(port)]
    cmd += ["--workers", "2"]
    uri = f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    with http_server(cmd, folder, "/ping", port, **env) as base:
        log = next(folder.glob("server-*.log"))
        yield {"url": base, "model": registered, "log": log, "repo": repo}
