"""Data-parallel training (src/mnist_cnn/core/distributed.py): shards, checks, and 2 CPU processes under torchrun."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from helpers import REPO, make_pipeline_repo, overridden, run, stage_error, write_params
from mnist_cnn.cli import UserError
from mnist_cnn.config import validate
from mnist_cnn.core import distributed
from mnist_cnn.core.distributed import shard
from mnist_cnn.core.model import Net
from mnist_cnn.core.training import steps_per_epoch
from mnist_cnn.data.mnist import load_processed
from mnist_cnn.stages import train
from mnist_cnn.stages.train import check_parallel


@pytest.mark.parametrize("n", [10, 11, 13])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_are_disjoint_equal_and_cover_all_but_a_remainder(n: int, world: int) -> None:
    order = torch.randperm(n)
    shards = [shard(order, rank, world) for rank in range(world)]
    assert {len(s) for s in shards} == {n // world if world > 1 else n}
    taken = torch.cat(shards).tolist()
    assert len(set(taken)) == len(taken)
    assert n - len(taken) < world


def test_steps_per_epoch_do_not_change_with_the_process_count() -> None:
    assert steps_per_epoch(60000, 64, 1) == steps_per_epoch(60000, 64, 2) == 938
    assert steps_per_epoch(100, 64, 1) == 2
    assert steps_per_epoch(101, 64, 2) == 2  # 50 images a rank, 32 a step


def raw_params(**train: object) -> dict:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"].update(train)
    return raw


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"nproc": 3}, r"train\.batch_size \(64\) must be divisible by train\.nproc \(3\)"),
        ({"nproc": 2, "cuda_graph": True}, r"train\.cuda_graph cannot be combined with train\.nproc \(2\)"),
    ],
)
def test_impossible_combinations_are_refused(train: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        validate(raw_params(**train))


def test_a_graph_is_refused_under_a_hand_started_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    # Several machines: torchrun is run by hand, so train.nproc stays 1 and only WORLD_SIZE tells.
    params = validate(raw_params(cuda_graph=True))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    check_parallel(params)
    monkeypatch.setenv("WORLD_SIZE", "16")
    with pytest.raises(UserError, match=r"train\.cuda_graph cannot be combined with torchrun's 16"):
        check_parallel(params)
    monkeypatch.setenv("WORLD_SIZE", "5")
    with pytest.raises(UserError, match=r"train\.batch_size \(64\) must be divisible by torchrun's 5"):
        check_parallel(validate(raw_params()))


def test_nproc_must_be_positive() -> None:
    with pytest.raises(UserError, match=r"'train\.nproc'"):
        validate(raw_params(nproc=0))


def test_a_bad_nproc_stops_the_stage_before_torchrun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], in_process: None
) -> None:
    write_params(tmp_path, tmp_path / "no-data", train__nproc=5)
    monkeypatch.setattr(distributed, "relaunch", lambda nproc: pytest.fail(f"torchrun started with {nproc}"))
    monkeypatch.chdir(tmp_path)
    line = stage_error(train.main, capsys)
    assert line == "error: params.yaml: train.batch_size (64) must be divisible by train.nproc (5)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


@pytest.mark.slow
def test_two_cpu_processes_train_like_one(
    tmp_path: Path, synthetic_mnist: Path, monkeypatch: pytest.MonkeyPatch, in_process: None
) -> None:
    """`dvc repro train` with train.nproc=2: torchrun, gloo, 2 ranks; its outputs in the formats of
    one process, and its accuracy close to one process's on the same data and params (trained
    here, in-process). The later stages read the checkpoint, which is the same file either way."""
    repo = make_pipeline_repo(tmp_path / "ddp", synthetic_mnist, train__nproc=2)
    out = run(["dvc", "repro", "train"], repo).stdout
    assert "torch.distributed.run --standalone --nproc-per-node=2" in out
    assert out.count("epoch 1:") == 1  # only rank 0 reports

    # The outputs of one process: rank 0 writes them, once.
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    params = validate(raw)
    assert json.loads((repo / "metrics/train.json").read_text()).keys() == {"train_loss", "train_seconds"}
    history = (repo / "plots/train_history.csv").read_text().splitlines()
    assert history[0] == "epoch,train_loss,test_loss,test_accuracy,seconds"
    assert len(history) == 1 + params.train.epochs
    checkpoint = torch.load(repo / "models/model.pt", weights_only=True)
    assert checkpoint["state_dict"].keys() == Net(**checkpoint["arch"]).state_dict().keys()

    # One MLflow run, from rank 0, with world_size.
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    (ddp_run,) = mlflow.search_runs(experiment_names=["mnist-cnn"], output_format="list")
    assert ddp_run.data.params["world_size"] == "2"
    assert ddp_run.info.status == "FINISHED"

    # One process, same seed, data and params: about the same accuracy.
    monkeypatch.chdir(repo)
    single = validate(overridden(raw, train__nproc=1))
    images, labels = load_processed("train")
    step = train.build(single, images, labels)
    for _ in range(single.train.epochs):
        train.train_epoch(step, len(images), single.train.batch_size)
    _, single_accuracy = train.measure_test_set(step.net, *load_processed("test"), single.train.eval_batch_size)
    ddp_accuracy = ddp_run.data.metrics["epoch/test_accuracy"]
    assert ddp_accuracy > 0.5
    assert abs(ddp_accuracy - single_accuracy) < 0.1, (ddp_accuracy, single_accuracy)
