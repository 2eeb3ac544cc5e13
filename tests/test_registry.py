"""Registry promotion (src/mnist_cnn/registry.py) against a real MLflow sqlite store, and predict from it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient
from PIL import Image, ImageDraw

from helpers import REPO
from mnist_cnn import predict, refusal, registry
from mnist_cnn.config import Params, run_stage, validate
from mnist_cnn.data import save_tensors
from mnist_cnn.model import Net


def make_params(**train_or_data: object) -> Params:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in train_or_data.items():
        section, _, field = key.partition("__")
        raw[section][field] = value
    return validate(raw)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real sqlite store for the module (creating one costs seconds); each test has its own model name."""
    previous = mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)  # what predict reads
        patch.setenv("DVC_EXP_BASELINE_REV", "abc123")  # tracking.git_commit() reads it first
        patch.delenv("DVC_EXP_NAME", raising=False)
        mlflow.set_tracking_uri(uri)
        yield uri
    mlflow.set_tracking_uri(previous)


@pytest.fixture
def client(store: str) -> MlflowClient:
    return MlflowClient()


@pytest.fixture
def name(client: MlflowClient, request: pytest.FixtureRequest) -> str:
    name = f"model-{request.node.name[:40]}"
    client.create_registered_model(name)
    return name


def new_version(client: MlflowClient, name: str, tmp_path: Path) -> str:
    count = len(client.search_model_versions(f"name='{name}'"))
    source = tmp_path / f"artifacts-{count + 1}"
    source.mkdir()
    return str(client.create_model_version(name, source=str(source)).version)


def aliases(client: MlflowClient, name: str) -> dict[str, str]:
    return {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}


def test_champion_moves_only_on_strictly_better_full_data_models(
    client: MlflowClient, name: str, tmp_path: Path
) -> None:
    full = make_params()
    steps = [  # (test accuracy, params, champion afterwards, moved?)
        (0.95, full, "1", True),  # the first version becomes champion
        (0.97, full, "2", True),  # better
        (0.97, full, "2", False),  # a tie keeps the old champion
        (0.96, full, "2", False),  # worse
        (0.999, make_params(data__subset=600), "2", False),  # a subset model, however good, never
        (0.98, full, "6", True),  # better again
    ]
    reasons = []
    for accuracy, params, champion, moved in steps:
        version = new_version(client, name, tmp_path)
        promotion = registry.promote(client, version, accuracy, params, name=name)
        reasons.append(promotion.reason)
        assert aliases(client, name) == {"challenger": version, "champion": champion}, version
        assert (promotion.champion, promotion.champion_moved) == (champion, moved), promotion
        assert ("champion ->" in promotion.message()) == moved
    subset_tags = client.get_model_version(name, "5").tags
    assert subset_tags["subset"] == "600"
    assert subset_tags["param.data.subset"] == "600"
    assert "subset" not in client.get_model_version(name, "6").tags
    assert reasons[2] == "test accuracy 97.00% = champion's 97.00%"
    assert reasons[4] == "trained on a subset of 600 images"
    third = registry.promote(client, "3", 0.97, full, name=name)  # re-evaluating an old version: challenger follows it
    assert not third.champion_moved
    assert aliases(client, name) == {"challenger": "3", "champion": "6"}


def test_tags_record_accuracy_every_param_commit_and_experiment(
    client: MlflowClient, name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DVC_EXP_NAME", "bushy-lobe")
    params = make_params(train__lr=0.0005)
    version = new_version(client, name, tmp_path)
    registry.promote(client, version, 0.9912, params, name=name)
    tags = client.get_model_version(name, version).tags
    assert float(tags["test_accuracy"]) == 0.9912
    assert tags["param.train.lr"] == "0.0005"
    assert tags["param.augment"] == "True"
    assert tags["param.data.subset"] == "0"
    assert tags["dvc.exp_name"] == "bushy-lobe"
    assert tags["git.commit"] == "abc123"
    assert "subset" not in tags
    flat_keys = {k for k in tags if k.startswith("param.")}
    assert {"param.seed", "param.train.epochs", "param.train.precision", "param.data.mirrors"} <= flat_keys


def test_champion_set_by_hand_without_accuracy_is_left_alone(client: MlflowClient, name: str, tmp_path: Path) -> None:
    manual = new_version(client, name, tmp_path)
    client.set_registered_model_alias(name, "champion", manual)
    version = new_version(client, name, tmp_path)
    promotion = registry.promote(client, version, 0.99, make_params(), name=name)
    assert aliases(client, name) == {"champion": manual, "challenger": version}
    assert not promotion.champion_moved and "no readable" in promotion.reason
    again = registry.promote(client, version, 0.99, make_params(), name=name)  # idempotent for the same version
    assert aliases(client, name) == {"champion": manual, "challenger": version}
    assert not again.champion_moved


def test_predict_loads_the_champion_evaluate_registered(
    client: MlflowClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """evaluate's real log_model + promote, then predict through models:/mnist-cnn@champion."""
    from mnist_cnn.evaluate import register_model

    torch.manual_seed(0)
    net = Net().eval()
    checkpoint = tmp_path / "model.pt"
    torch.save({"state_dict": net.state_dict()}, checkpoint)
    stats = refusal.fit(net, torch.randint(0, 256, (100, 1, 28, 28), dtype=torch.uint8), torch.arange(100) % 10, 0)
    save_tensors(tmp_path / "refusal.pt", stats)  # beside the checkpoint, as evaluate leaves it
    example = np.zeros((2, 1, 28, 28), dtype=np.float32)
    with mlflow.start_run() as run:
        version = register_model(net, stats, example, run.info.run_id)
    promotion = registry.promote(client, version, 0.5, make_params())  # the default name: mnist-cnn
    assert promotion.champion_moved and aliases(client, "mnist-cnn") == {"champion": "1", "challenger": "1"}

    picture = Image.new("L", (120, 90), 255)
    ImageDraw.Draw(picture).line([(40, 10), (40, 80)], fill=0, width=8)
    image = tmp_path / "one.png"
    picture.save(image)
    answers = []
    for model in ("models:/mnist-cnn@champion", str(checkpoint)):
        predict.main(["--model", model, "--json", str(image)])
        answers.append(json.loads(capsys.readouterr().out))
    assert answers[0]["digit"] == answers[1]["digit"]
    assert answers[0]["probability"] == pytest.approx(answers[1]["probability"], abs=1e-5)

    with pytest.raises(SystemExit) as exit_info:
        run_stage(lambda: predict.main(["--model", "models:/mnist-cnn@nonesuch", str(image)]))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: models:/mnist-cnn@nonesuch: ")
