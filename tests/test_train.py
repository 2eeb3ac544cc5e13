"""The training loop: devices, determinism, every image counted, bf16 and the CUDA graph path."""

from __future__ import annotations

import pytest
import torch
import yaml

from conftest import REPO
from mnist_cnn.config import Params, UserError, validate
from mnist_cnn.train import build, measure_test_set, pick_device, train_epoch


def params(**train: object) -> Params:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"].update(train)
    return validate(raw)


def toy_data(n: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Bright blocks whose position encodes the label: learnable in one short epoch."""
    labels = torch.arange(n) % 10
    images = torch.zeros(n, 1, 28, 28, dtype=torch.uint8)
    for i, label in enumerate(labels.tolist()):
        row, col = divmod(label, 5)
        images[i, 0, 4 + 10 * row : 12 + 10 * row, 2 + 5 * col : 6 + 5 * col] = 255
    return images.to(device), labels.to(device)


def test_pick_device() -> None:
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match=r"train\.device"):
            pick_device("cuda")


def test_same_seed_gives_bitwise_identical_training_on_cpu() -> None:
    images, labels = toy_data(256)
    results = []
    for _ in range(2):
        step = build(params(device="cpu"), images, labels)
        loss = train_epoch(step, len(images), 64)
        results.append((loss, [p.detach().clone() for p in step.model.parameters()]))
    assert results[0][0] == results[1][0]
    for a, b in zip(results[0][1], results[1][1], strict=True):
        assert torch.equal(a, b)


def test_different_seed_gives_different_weights() -> None:
    images, labels = toy_data(128)
    first = build(params(device="cpu"), images, labels)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["seed"] += 1
    second = build(validate(raw), images, labels)
    assert not torch.equal(first.model.conv1.weight, second.model.conv1.weight)


def test_last_short_batch_is_trained_not_dropped() -> None:
    images, labels = toy_data(100)  # 64 + 36
    step = build(params(device="cpu"), images, labels)
    train_epoch(step, len(images), 64)
    adam_steps = {int(state["step"]) for state in step.optimizer.state.values()}
    assert adam_steps == {2}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_learns(precision: str) -> None:
    images, labels = toy_data(640)
    step = build(params(device="cpu", precision=precision, lr=0.003), images, labels)
    losses = [train_epoch(step, len(images), 64) for _ in range(3)]
    _, accuracy = measure_test_set(step.model, images, labels, 256)
    assert losses[-1] < losses[0]
    assert accuracy > 0.5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graph_step_trains_like_eager(precision: str) -> None:
    images, labels = toy_data(1000, "cuda")  # 15 full batches + a short one
    final = {}
    for graph in (False, True):
        step = build(params(device="cuda", precision=precision, cuda_graph=graph, lr=0.003), images, labels)
        losses = [train_epoch(step, len(images), 64) for _ in range(3)]
        assert (step.graph is not None) == graph
        final[graph] = (losses[-1], measure_test_set(step.model, images, labels, 500)[1])
    # Different random streams (graphs use the default CUDA generator), same learning.
    assert final[True][1] > 0.5
    assert abs(final[True][0] - final[False][0]) < 0.5 * final[False][0] + 0.05


def test_a_diverging_loss_stops_training_naming_epoch_and_step() -> None:
    images, labels = toy_data(640)
    step = build(params(device="cpu"), images, labels)
    with pytest.raises(UserError, match=r"epoch 3, step 1 of 10"):
        for epoch in range(1, 4):
            with torch.no_grad():
                if epoch == 3:  # poison the weights: the next loss is NaN
                    step.model.fc2.bias.fill_(float("nan"))
            train_epoch(step, len(images), 64, epoch=epoch)
