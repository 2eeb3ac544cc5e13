"""The MLflow UI, in a real headless Chromium, shows the pipeline's runs and registered model.

`mlflow ui` serves the `queued_pipeline` fixture's store (a `dvc repro` and two queued experiments,
one of them the README's preset) on a free loopback port; tests/ui/check_ui.mjs
(playwright-core driving Debian's /usr/bin/chromium) opens the champion's run page (params, metrics,
dataset inputs with their digest), its model-metrics tab (the per-epoch curves first, at most 31
charts) and system-metrics tab, its logged model, the registered model's page and the experiment's training view,
checks the texts there and saves one screenshot per page; run-page.png, with the params and metrics
tables framed, is the one docs/tracking.md shows (docs/img/run-page.png). Chromium comes from
`.ci/run` (apt-get); playwright-core from `make test` (npm, exact pin in tests/ui/package.json, no
lockfile), or from this module when it is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from helpers import REPO, VENV_BIN, free_port, http_server

UI_DIR = REPO / "tests" / "ui"
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
SCREENSHOTS = Path("/tmp/mnist-cnn-ui")  # a stable copy of the screenshots, to quote

# Skipped before the (session-wide, minutes-long) pipeline fixture is built, not after.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed"),
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (apt-get install chromium; .ci/run does it)"
    ),
]


@pytest.fixture(scope="module")
def node() -> str:
    node = shutil.which("node")
    assert node is not None  # see pytestmark
    if not (UI_DIR / "node_modules" / "playwright-core").is_dir():
        # `make test` installs it first; a bare `pytest` gets it here.
        npm = shutil.which("npm")
        assert npm, "playwright-core is not installed under tests/ui and npm is missing"
        cmd = [npm, "install", "--no-package-lock", "--no-audit", "--no-fund", "--prefix", str(UI_DIR)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"npm install failed:\n{result.stdout}\n{result.stderr}"
    return node


@pytest.fixture(scope="module")
def store(applied_preset: Path) -> str:
    """The store of the queued scenarios' checkout (the `pipeline` worker has enough to do)."""
    return f"sqlite:///{applied_preset / 'mlruns' / 'mlflow.db'}"


@pytest.fixture(scope="module")
def ui(store: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    workdir = tmp_path_factory.mktemp("mlflow-ui")  # whatever the server writes stays out of the repo
    cmd = [str(VENV_BIN / "mlflow"), "ui", "--backend-store-uri", store, "--host", "127.0.0.1", "--port", str(port)]
    # Minutes, not seconds: on 2 cores shared with the suite's pipelines the server took over 60 s to answer.
    with http_server(cmd, workdir, "/health", port, timeout=240) as base:
        yield base


def test_ui_shows_run_metrics_and_registered_model(
    store: str, node: str, ui: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("mnist-cnn")
    assert experiment is not None
    aliases = client.get_registered_model("mnist-cnn").aliases
    assert set(aliases) >= {"champion", "challenger"}, aliases
    champion = client.get_model_version_by_alias("mnist-cnn", "champion")
    run_ids = {r.info.run_id for r in client.search_runs([experiment.experiment_id])}
    assert champion.run_id in run_ids, (champion.run_id, run_ids)

    digest = {i.dataset.digest for r in client.search_runs([experiment.experiment_id]) for i in r.inputs.dataset_inputs}
    assert len(digest) == 1, digest  # one data/processed for every run

    out = tmp_path / "screenshots"
    args = [ui, experiment.experiment_id, champion.run_id, str(out), "mnist-cnn", str(champion.version)]
    args += [f"{alias}={version}" for alias, version in sorted(aliases.items())]
    result = subprocess.run(
        [node, str(UI_DIR / "check_ui.mjs"), *args],
        cwd=UI_DIR,
        env={
            **os.environ,
            "CHROMIUM": str(CHROMIUM),
            "DATASET_DIGEST": digest.pop(),
            "LOGGED_MODEL_ID": client.get_run(champion.run_id).outputs.model_outputs[0].model_id,
        },
        capture_output=True,
        text=True,
        timeout=180,
    )
    shots = sorted(out.glob("*.png"))
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for shot in shots:
        shutil.copy(shot, SCREENSHOTS / shot.name)
    with capsys.disabled():
        print(f"\nUI screenshots: {', '.join(str(SCREENSHOTS / s.name) for s in shots)}")
    assert result.returncode == 0, f"UI check failed:\n{result.stdout}\n{result.stderr}"
    assert [s.name for s in shots] == [
        "logged-model.png",
        "registered-model.png",
        "run-inputs.png",
        "run-model-metrics.png",
        "run-overview.png",
        "run-page.png",
        "run-system-metrics.png",
        "runs-table.png",
    ]
    for shot in shots:
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000, shot
