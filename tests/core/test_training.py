"""The training loop: determinism, every image counted, bf16 and the CUDA graph path, the schedules,
the augmentation extras."""

from __future__ import annotations

import itertools
import platform

import pytest
import torch

from helpers import make_params
from mnist_cnn.cli import UserError
from mnist_cnn.core import runtime
from mnist_cnn.core.runtime import native_bf16
from mnist_cnn.core.training import build, train_epoch
from mnist_cnn.stages.train import measure_test_set

# Every proposed improvement switched on at once.
IMPROVED = {
    "model__batchnorm": True,
    "model__dropout": 0.3,
    "model__depth": 3,
    "train__lr_schedule": "onecycle",
    "train__weight_decay": 0.01,
}


# bf16 training on a CPU that would emulate it is refused (use_bf16): those tests run where it is native.
BF16 = pytest.param("bf16", marks=pytest.mark.skipif(not native_bf16(torch.device("cpu")), reason="no native bf16"))


@pytest.fixture
def deterministic_mode_restored():
    yield
    torch.use_deterministic_algorithms(False)  # process-wide: do not leak into other tests


def toy_data(n: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Bright blocks whose position encodes the label: learnable in one short epoch."""
    labels = torch.arange(n) % 10
    images = torch.zeros(n, 1, 28, 28, dtype=torch.uint8)
    for i, label in enumerate(labels.tolist()):
        row, col = divmod(label, 5)
        images[i, 0, 4 + 10 * row : 12 + 10 * row, 2 + 5 * col : 6 + 5 * col] = 255
    return images.to(device), labels.to(device)


@pytest.mark.parametrize(
    "options",
    [{}, IMPROVED, pytest.param({**IMPROVED, "train__precision": "bf16"}, marks=BF16.marks)],
    ids=["report", "improved", "bf16"],
)
def test_same_seed_gives_bitwise_identical_training_on_cpu(options: dict) -> None:
    images, labels = toy_data(256)
    results = []
    for _ in range(2):
        step = build(make_params(train__device="cpu", **options), images, labels)
        loss = train_epoch(step, len(images), 64)
        results.append((loss, [p.detach().clone() for p in step.model.parameters()]))
    assert results[0][0] == results[1][0]
    for a, b in zip(results[0][1], results[1][1], strict=True):
        assert torch.equal(a, b)


def test_different_seed_gives_different_weights() -> None:
    images, labels = toy_data(128)
    params = make_params(train__device="cpu")
    first = build(params, images, labels)
    second = build(make_params(train__device="cpu", seed=params.seed + 1), images, labels)
    assert not torch.equal(first.model.conv1.weight, second.model.conv1.weight)


def test_last_short_batch_is_trained_not_dropped() -> None:
    images, labels = toy_data(100)  # 64 + 36
    step = build(make_params(train__device="cpu"), images, labels)
    train_epoch(step, len(images), 64)
    adam_steps = {int(state["step"]) for state in step.optimizer.state.values()}
    assert adam_steps == {2}


@pytest.mark.skipif(not native_bf16(torch.device("cpu")), reason="no native bf16")
def test_bf16_is_the_fast_path_and_fp32_the_reports() -> None:
    images, labels = toy_data(64)
    fast = build(make_params(train__device="cpu", train__precision="bf16"), images, labels)
    assert fast.channels_last and fast.net.conv2.weight.is_contiguous(memory_format=torch.channels_last)
    assert fast.optimizer.defaults["fused"]
    exact = build(make_params(train__device="cpu", train__precision="fp32"), images, labels)
    assert not exact.channels_last and exact.net.conv2.weight.is_contiguous()
    assert not exact.optimizer.defaults["fused"]  # the report's multi-tensor Adam, bit for bit


@pytest.mark.parametrize("precision", ["fp32", BF16])
def test_training_learns(precision: str) -> None:
    images, labels = toy_data(640)
    step = build(make_params(train__device="cpu", train__precision=precision, train__lr=0.003), images, labels)
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
        step = build(
            make_params(train__device="cuda", train__precision=precision, train__cuda_graph=graph, train__lr=0.003),
            images,
            labels,
        )
        losses = [train_epoch(step, len(images), 64) for _ in range(3)]
        assert (step.graph is not None) == graph
        final[graph] = (losses[-1], measure_test_set(step.model, images, labels, 500)[1])
    # Different random streams (graphs use the default CUDA generator), same learning.
    assert final[True][1] > 0.5
    assert abs(final[True][0] - final[False][0]) < 0.5 * final[False][0] + 0.05


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_graphed_step_reads_the_scheduled_rate_from_a_tensor() -> None:
    # A captured graph bakes in Python floats; the schedule must reach Adam through a tensor.
    images, labels = toy_data(640, "cuda")  # 10 steps per epoch
    step = build(
        make_params(train__device="cuda", train__cuda_graph=True, train__lr_schedule="step", train__lr=0.01),
        images,
        labels,
    )
    rate = step.optimizer.param_groups[0]["lr"]
    assert isinstance(rate, torch.Tensor) and rate.device.type == "cuda" and rate.dtype == torch.float32
    train_epoch(step, len(images), 64)
    assert step.graph is not None
    assert step.optimizer.param_groups[0]["lr"] is rate
    assert float(rate) == pytest.approx(0.007)


def test_training_refuses_emulated_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(runtime, "native_bf16", lambda device: False)
    with pytest.raises(UserError, match=r"use train.precision: auto \(bf16 where native\) or fp32$"):
        build(make_params(train__device="cpu", train__precision="bf16"), *toy_data(64))


def test_a_diverging_loss_stops_training_naming_epoch_and_step() -> None:
    images, labels = toy_data(80)
    step = build(make_params(train__device="cpu", train__batch_size=8), images, labels)
    with pytest.raises(UserError, match=r"epoch 3, step 1 of 10"):
        for epoch in range(1, 4):
            with torch.no_grad():
                if epoch == 3:  # poison the weights: the next loss is NaN
                    step.model.fc2.bias.fill_(float("nan"))
            train_epoch(step, len(images), 8, epoch=epoch)


# --- learning-rate schedules, weight decay, deterministic mode ------------------


def lr_per_step(schedule: str, epochs: int = 3, n: int = 80, batch: int = 8) -> list[float]:
    """The rate of each step: 10 steps per epoch (small batches: only the schedule matters here)."""
    images, labels = toy_data(n)
    step = build(
        make_params(
            train__device="cpu",
            train__lr=0.01,
            train__lr_schedule=schedule,
            train__epochs=epochs,
            train__batch_size=batch,
        ),
        images,
        labels,
    )
    rates = []
    for _ in range(epochs):
        for start in range(0, n, batch):
            rates.append(float(step.optimizer.param_groups[0]["lr"]))
            step(torch.arange(start, min(start + batch, n)))
    return rates


def test_no_schedule_keeps_the_rate() -> None:
    assert set(lr_per_step("none")) == {0.01}


def test_step_schedule_decays_by_0_7_per_epoch() -> None:
    rates = lr_per_step("step")  # 10 steps per epoch
    assert rates[:10] == [0.01] * 10
    assert rates[10:20] == pytest.approx([0.007] * 10)
    assert rates[20:] == pytest.approx([0.0049] * 10)


def test_cosine_schedule_anneals_towards_zero() -> None:
    rates = lr_per_step("cosine")
    assert rates[0] == 0.01
    assert all(a > b for a, b in itertools.pairwise(rates))
    assert rates[-1] < 0.0005


def test_onecycle_warms_up_to_lr_then_anneals() -> None:
    rates = lr_per_step("onecycle")  # 30 steps: the peak at 30% of them
    peak = rates.index(max(rates))
    assert max(rates) == pytest.approx(0.01)
    assert 7 <= peak <= 10
    assert rates[0] == pytest.approx(0.01 / 25)
    assert rates[-1] < 0.0002


def test_weight_decay_uses_adamw_and_changes_training() -> None:
    images, labels = toy_data(256)
    plain = build(make_params(train__device="cpu"), images, labels)
    decayed = build(make_params(train__device="cpu", train__weight_decay=0.5), images, labels)
    assert type(plain.optimizer) is torch.optim.Adam
    assert type(decayed.optimizer) is torch.optim.AdamW
    assert decayed.optimizer.param_groups[0]["weight_decay"] == 0.5
    for step in (plain, decayed):
        train_epoch(step, len(images), 64)
    assert decayed.model.fc1.weight.norm() < plain.model.fc1.weight.norm()


def test_improvements_learn() -> None:
    images, labels = toy_data(640)
    step = build(make_params(train__device="cpu", train__lr=0.003, **IMPROVED), images, labels)
    losses = [train_epoch(step, len(images), 64) for _ in range(3)]
    assert losses[-1] < losses[0]
    assert measure_test_set(step.model, images, labels, 256)[1] > 0.5


def test_deterministic_mode_gives_the_same_training(deterministic_mode_restored: None) -> None:
    # The deterministic loss (a gather instead of nll_loss) is the same mean: same learning, same runs.
    images, labels = toy_data(256)
    default = build(make_params(train__device="cpu"), images, labels)
    default_loss = train_epoch(default, len(images), 64)
    losses = []
    for _ in range(2):
        step = build(make_params(train__device="cpu", train__deterministic=True), images, labels)
        losses.append(train_epoch(step, len(images), 64))
    assert torch.are_deterministic_algorithms_enabled()
    assert losses[0] == losses[1]
    assert losses[0] == pytest.approx(default_loss, rel=1e-4)
    # The test-set loss takes the same deterministic route, and is the same mean.
    deterministic_test_loss = measure_test_set(step.model, images, labels, 100)[0]
    torch.use_deterministic_algorithms(False)
    assert deterministic_test_loss == pytest.approx(measure_test_set(step.model, images, labels, 100)[0], rel=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("graph", [False, True])
def test_deterministic_cuda_runs_are_bitwise_identical(graph: bool, deterministic_mode_restored: None) -> None:
    images, labels = toy_data(1000, "cuda")
    weights, test_losses = [], []
    for _ in range(2):
        step = build(
            make_params(train__device="cuda", train__deterministic=True, train__cuda_graph=graph, **IMPROVED),
            images,
            labels,
        )
        for _ in range(2):
            train_epoch(step, len(images), 64)
        weights.append([p.detach().clone() for p in step.model.parameters()])
        test_losses.append(measure_test_set(step.net, images, labels, 500)[0])  # as fit() does after each epoch
    for a, b in zip(*weights, strict=True):
        assert torch.equal(a, b)
    assert test_losses[0] == test_losses[1]


def test_training_with_every_extra_is_reproducible_and_differs() -> None:
    images, labels = toy_data(128)
    every = {
        "augment_scale": 0.15,
        "augment_thickness": 0.5,
        "augment_blur": 1.5,
        "augment_invert": 0.3,
        "augment_erase": 0.3,
        "augment_noise": 0.2,
    }

    def weights(**extras: float) -> list[torch.Tensor]:
        step = build(make_params(train__device="cpu", **extras), images, labels)
        train_epoch(step, len(images), 64)
        return [p.detach().clone() for p in step.model.parameters()]

    first, again, plain = weights(**every), weights(**every), weights()
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, plain, strict=True))
