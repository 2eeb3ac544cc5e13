"""A team tracking server (conftest's `server`: `mlflow server` on a throwaway PostgreSQL cluster where
the binaries exist, else on sqlite, with a proxied artifact destination), and two experiments of a
fresh repository queued and run in parallel (`dvc queue start -j 2`) against it, as two teammates
would: each runs the whole pipeline, and the first of them creates the experiment and the registered
model on the server while the other may be doing the same. Where the team extra is installed, the
server's artifact destination is the object store's bucket (docs/operations.md, "A team on object
storage"), from which the champion is then served."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path

import mlflow
import psycopg
import pytest
from mlflow import MlflowClient

from helpers import VENV_BIN, TeamServer, free_port, http_server, make_pipeline_repo, render_digits, run, tool_env
from object_store import BUCKET, missing_extra


def destination_files(server: TeamServer, experiment_id: str) -> list[str]:
    """The files of one experiment in the server's artifact destination: the bucket or the directory."""
    if server.store is not None:
        return list(server.store.objects(f"mlflow/{experiment_id}/"))
    return [str(p) for p in (server.root / "artifacts" / experiment_id).rglob("*") if p.is_file()]


def wait_for_queue(repo: Path, timeout: float = 900) -> str:
    deadline = time.monotonic() + timeout
    while any(word in (status := run(["dvc", "queue", "status"], repo).stdout) for word in ("Queued", "Running")):
        assert time.monotonic() < deadline, f"the queue did not drain within {timeout} s:\n{status}"
        time.sleep(5)
    return status


@pytest.fixture(scope="module")
def queued(server: TeamServer, tmp_path_factory: pytest.TempPathFactory, synthetic_mnist: Path) -> dict:
    """Two experiments of a fresh repository queued and run by 2 workers against the server."""
    tmp_path = tmp_path_factory.mktemp("team")
    url = server.url
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
    return {"repo": repo, "tmp": tmp_path, "status": status}


def test_parallel_experiments_run_the_pipeline_on_the_team_server(server: TeamServer, queued: dict) -> None:
    url, repo, tmp_path, status = server.url, queued["repo"], queued["tmp"], queued["status"]
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
    stored = [Path(name) for name in destination_files(server, experiment.experiment_id)]
    assert len([p for p in stored if p.name == "confusion_matrix.png"]) == 2
    assert len([p for p in stored if p.name == "MLmodel"]) == 2  # each run's logged model

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


def test_the_artifacts_live_in_the_bucket_and_the_champion_is_served_from_it(
    server: TeamServer, queued: dict, tmp_path: Path
) -> None:
    if server.store is None:
        pytest.skip(missing_extra() or "the team server keeps its artifacts in a directory")
    assert server.artifacts == f"s3://{BUCKET}/mlflow"
    client = MlflowClient(tracking_uri=server.url)
    experiment = client.get_experiment_by_name("mnist-cnn")
    assert experiment.artifact_location == "mlflow-artifacts:/" + experiment.experiment_id  # proxied
    bucket = server.store.objects(f"mlflow/{experiment.experiment_id}/")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2
    for r in runs:
        # The figure fetched through the server is the bucket's object.
        figure = mlflow.artifacts.download_artifacts(
            run_id=r.info.run_id,
            artifact_path="reports/confusion_matrix.png",
            dst_path=str(tmp_path / r.info.run_id),
            tracking_uri=server.url,
        )
        key = f"mlflow/{experiment.experiment_id}/{r.info.run_id}/artifacts/reports/confusion_matrix.png"
        assert Path(figure).read_bytes() == bucket[key]

    # The champion's model: every file of it fetched through the server is an object of the bucket.
    champion = client.get_model_version_by_alias("mnist-cnn", "champion")
    uri = client.get_model_version_download_uri("mnist-cnn", champion.version)  # mlflow-artifacts:/<path>
    assert uri.startswith("mlflow-artifacts:/"), uri
    target = str(tmp_path / "champion")
    model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=target, tracking_uri=server.url))
    prefix = "mlflow/" + uri.removeprefix("mlflow-artifacts:/").strip("/") + "/"
    fetched = {str(p.relative_to(model_dir)): p.read_bytes() for p in model_dir.rglob("*") if p.is_file()}
    assert "MLmodel" in fetched and "artifacts/refusal.pt" in fetched, sorted(fetched)
    assert fetched == {key.removeprefix(prefix): body for key, body in bucket.items() if key.startswith(prefix)}

    # `mlflow models serve` on the champion, with no key pair: the server hands it presigned URLs of the bucket.
    pixels = render_digits(4, seed=3)[0]
    port = free_port()
    cmd = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", "models:/mnist-cnn@champion", "--env-manager", "local"]
    cmd += ["-h", "127.0.0.1", "-p", str(port)]
    with http_server(cmd, tmp_path, "/ping", port, MLFLOW_TRACKING_URI=server.url) as base:
        request = urllib.request.Request(
            f"{base}/invocations",
            data=json.dumps({"inputs": pixels.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            served = json.loads(response.read())["predictions"]
    local = mlflow.pyfunc.load_model(str(model_dir)).predict(pixels)
    assert [s["digit"] for s in served] == [r["digit"] for r in local]
    assert [s["reason"] for s in served] == [r["reason"] for r in local]
