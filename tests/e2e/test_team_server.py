"""A team tracking server (conftest's `server`: `mlflow server` on a throwaway PostgreSQL cluster where
the binaries exist, else on sqlite, with a proxied artifact destination), and two experiments of a
fresh repository queued and run in parallel (`dvc queue start -j 2`) against it, as two teammates
would: each runs the whole pipeline, and the first of them creates the experiment and the registered
model on the server while the other may be doing the same."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import psycopg
import pytest
from mlflow import MlflowClient

from helpers import TeamServer, make_pipeline_repo, run, tool_env


def wait_for_queue(repo: Path, timeout: float = 900) -> str:
    deadline = time.monotonic() + timeout
    while any(word in (status := run(["dvc", "queue", "status"], repo).stdout) for word in ("Queued", "Running")):
        assert time.monotonic() < deadline, f"the queue did not drain within {timeout} s:\n{status}"
        time.sleep(5)
    return status


def test_parallel_experiments_run_the_pipeline_on_the_team_server(
    server: TeamServer, tmp_path: Path, synthetic_mnist: Path
) -> None:
    url, root = server.url, server.root
    repo = make_pipeline_repo(tmp_path / "repo", synthetic_mnist)
    run(["dvc", "exp", "run", "--queue", "-n", "no-augment", "-S", "augment=false"], repo)
    run(["dvc", "exp", "run", "--queue", "-n", "seed-7", "-S", "seed=7"], repo)
    # Two workers at once, as two teammates would; one thread each on a 2-core machine.
    try:
        # Output to a file: the detached workers inherit it, and a pipe would stay open until they exit.
        with (tmp_path / "queue.log").open("w") as log:
            env = tool_env(MLFLOW_TRACKING_URI=url, OMP_NUM_THREADS="1")
            start = ["dvc", "queue", "start", "-j", "2"]
            subprocess.run(start, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=120, check=True)
        status = wait_for_queue(repo)
    finally:
        subprocess.run(["dvc", "queue", "stop", "--kill"], cwd=repo, env=tool_env(), capture_output=True, timeout=60)
    assert status.count("Success") == 2, status
    assert not (repo / "mlruns").exists()  # nothing went to a local store

    client = MlflowClient(tracking_uri=url)
    experiment = client.get_experiment_by_name("mnist-cnn")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    assert len(runs) == 2, [(r.info.run_id, r.info.status) for r in runs]
    named = {r.data.tags.get("dvc.exp_name", ""): r for r in runs}
    assert sorted(named) == ["no-augment", "seed-7"]
    for r in runs:
        assert r.info.status == "FINISHED", r.info
        for key in ("epoch/train_loss", "epoch/test_loss", "epoch/test_accuracy"):
            assert [m.step for m in client.get_metric_history(r.info.run_id, key)] == [1, 2], (r.info.run_id, key)
        # Artifacts went through the server into its artifact destination.
        assert "confusion_matrix.png" in {Path(a.path).name for a in client.list_artifacts(r.info.run_id, "reports")}
    run(["dvc", "exp", "apply", "seed-7"], repo)  # the experiment's outputs, from DVC's cache
    local = client.download_artifacts(named["seed-7"].info.run_id, "reports/confusion_matrix.png", str(tmp_path))
    assert Path(local).read_bytes() == (repo / "reports/confusion_matrix.png").read_bytes()
    # (The server is shared with the registry's promotion test, whose models are in other experiments.)
    stored = root / "artifacts" / experiment.experiment_id
    assert len(list(stored.rglob("confusion_matrix.png"))) == 2
    assert len(list(stored.rglob("MLmodel"))) == 2  # each run's logged model

    # The registry is the server's: one version per run; both aliases name versions of this model.
    versions = client.search_model_versions("name='mnist-cnn'")
    assert sorted(v.run_id for v in versions) == sorted(r.info.run_id for r in runs)
    aliases = client.get_registered_model("mnist-cnn").aliases
    assert {"champion", "challenger"} <= set(aliases)
    assert {str(aliases["champion"]), str(aliases["challenger"])} <= {v.version for v in versions}

    # Where the backend is PostgreSQL, the runs and versions are rows of its tables.
    if server.why_not_postgres:
        pytest.skip(f"the server ran on sqlite: {server.why_not_postgres}")
    with psycopg.connect(server.backend.replace("postgresql+psycopg://", "postgresql://")) as connection:
        stored = {row[0] for row in connection.execute("SELECT run_uuid FROM runs")}
        assert {r.info.run_id for r in runs} <= stored
        (count,) = connection.execute("SELECT count(*) FROM model_versions WHERE name = 'mnist-cnn'").fetchone()
        assert count == 2
