"""The training loop: devices, determinism, every image counted, bf16 and the CUDA graph path."""

from __future__ import annotations

import itertools
import platform

import pytest
import torch

from helpers import make_params
from mnist_cnn.cli import UserError
from mnist_cnn.core.runtime import native_bf16, pick_device, use_bf16
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


def test_pick_device() -> None:
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match=r"train\.device"):
            pick_device("cuda")


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


def test_auto_picks_bf16_only_where_native_and_emulated_bf16_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    for native in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda native=native: native)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
        assert use_bf16("auto", cpu, "train.precision") is native
        assert use_bf16("fp32", cpu, "train.precision") is False
        if native:
            assert use_bf16("bf16", cpu, "train.precision") is True
        else:
            with pytest.raises(UserError, match=r"^robustness.precision bf16: this CPU \(.+\) has no native bfloat16"):
                use_bf16("bf16", cpu, "robustness.precision")
    # ATen limited to AVX2 (as ATEN_CPU_CAPABILITY=avx2 does) emulates bf16 even on a CPU that has it.
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert use_bf16("auto", cpu, "train.precision") is False
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
