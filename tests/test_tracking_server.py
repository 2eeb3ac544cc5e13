"""Team tracking: the pipeline logs to a real `mlflow server` (SQL backend, proxied artifact store)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from helpers import VENV_BIN, free_port, http_server, make_pipeline_repo, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("tracking-server")
    port = free_port()
    cmd = [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--backend-store-uri", f"sqlite:///{root / 'team.db'}", "--artifacts-destination", str(root / "artifacts")]
    cmd += ["--workers", "1"]
    with http_server(cmd, root, "/health", port, timeout=300) as base:  # migrations of a new store take a while
        yield base, root


def test_pipeline_runs_land_on_the_shared_server(
    server: tuple[str, Path], tmp_path: Path, synthetic_mnist: Path
) -> None:
    url, root = server
    repo = make_pipeline_repo(tmp_path / "repo", synthetic_mnist)
    # One pipeline run, as an experiment (DVC passes the variable to every stage, also under
    # --temp/--queue: their landing in one store is tested on the local store, tests/test_pipeline.py).
    run(["dvc", "exp", "run", "-n", "teammate", "-S", "augment=false"], repo, MLFLOW_TRACKING_URI=url)
    assert not (repo / "mlruns").exists()  # nothing went to a local store

    client = MlflowClient(tracking_uri=url)
    experiment = client.get_experiment_by_name("mnist-cnn")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    assert [r.data.params["augment"] for r in runs] == ["False"]
    assert runs[0].data.tags["dvc.exp_name"] == "teammate"
    first = runs[0]
    assert first.info.status == "FINISHED"
    for key in ("train_loss", "test_loss", "test_accuracy"):
        assert [m.step for m in client.get_metric_history(first.info.run_id, key)] == [1, 2]

    # Artifacts went through the server into its artifact destination.
    reports = {Path(a.path).name for a in client.list_artifacts(first.info.run_id, "reports")}
    assert "confusion_matrix.png" in reports
    local = client.download_artifacts(first.info.run_id, "reports/confusion_matrix.png", str(tmp_path))
    assert Path(local).read_bytes() == (repo / "reports/confusion_matrix.png").read_bytes()
    stored = list((root / "artifacts").rglob("confusion_matrix.png"))
    assert len(stored) == 1

    # The registry is the server's: one version per run, aliases set.
    versions = client.search_model_versions("name='mnist-cnn'")
    assert {v.run_id for v in versions} == {r.info.run_id for r in runs}
    aliases = client.get_registered_model("mnist-cnn").aliases
    assert set(aliases) == {"champion", "challenger"}
    assert str(aliases["challenger"]) == str(aliases["champion"]) == "1"
