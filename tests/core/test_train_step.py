"""One optimisation step (src/mnist_cnn/core/train_step.py): it lowers the loss on the batch it sees,
sums the epoch's loss, and remembers the first step whose loss is NaN or infinite."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import render_digits
from mnist_cnn.core.augment import Extras
from mnist_cnn.core.model import Net
from mnist_cnn.core.train_step import TrainStep, jensen_shannon, mean_nll


def step_on_digits(n: int = 32, augment: bool = False, consistency: float = 0.0) -> TrainStep:
    torch.manual_seed(0)
    images, labels = render_digits(n, seed=0)
    net = Net()
    return TrainStep(
        net,
        torch.optim.Adam(net.parameters(), lr=1e-3),
        torch.from_numpy(images).unsqueeze(1),
        torch.from_numpy(labels).long(),
        augment=augment,
        bf16=False,
        batch_size=n,
        generator=torch.Generator().manual_seed(0),
        cuda_graph=False,
        extras=Extras(blur=1.0, noise=0.2) if consistency else None,
        consistency=consistency,
    )


def losses(step: TrainStep, index: torch.Tensor, count: int) -> list[float]:
    """The batch's mean loss at each of `count` steps on it (the step adds loss x batch size to loss_sum)."""
    found = []
    for _ in range(count):
        before = step.loss_sum.item()
        step(index)
        found.append((step.loss_sum.item() - before) / index.numel())
    return found


def test_steps_lower_the_loss_on_their_batch() -> None:
    step = step_on_digits()
    step.start_epoch()
    seen = losses(step, torch.arange(32), 5)
    assert seen[-1] < seen[0] * 0.9, seen
    assert step.steps.item() == 5 and step.first_bad_step.item() == -1
    step.start_epoch()  # a new epoch starts its sums afresh
    assert step.loss_sum.item() == 0 and step.steps.item() == 0


def test_augmented_steps_see_new_pictures_each_time_and_still_learn() -> None:
    step = step_on_digits(augment=True)
    step.start_epoch()
    seen = losses(step, torch.arange(32), 8)
    assert len(set(seen)) == len(seen)
    assert min(seen[-3:]) < seen[0], seen


def test_a_nan_loss_is_recorded_as_the_first_bad_step() -> None:
    step = step_on_digits(n=16)
    step.start_epoch()
    index = torch.arange(16)
    step(index)  # step 1: a finite loss
    with torch.no_grad():
        step.net.fc2.bias.fill_(float("nan"))
    step(index)  # step 2: NaN
    step(index)  # step 3: NaN again, but step 2 was the first
    assert step.first_bad_step.item() == 2
    step.start_epoch()
    assert step.first_bad_step.item() == -1


@pytest.mark.parametrize("deterministic", [False, True])
def test_mean_nll_is_the_mean_negative_log_likelihood(deterministic: bool) -> None:
    log_probs = torch.log_softmax(torch.randn(50, 10, generator=torch.Generator().manual_seed(0)), 1)
    labels = torch.arange(50) % 10
    try:
        torch.use_deterministic_algorithms(deterministic)
        loss = mean_nll(log_probs, labels)
    finally:
        torch.use_deterministic_algorithms(False)
    assert loss.item() == pytest.approx(F.nll_loss(log_probs, labels).item(), rel=1e-6)


def test_jensen_shannon_is_zero_for_agreeing_views_and_bounded_by_log_3() -> None:
    log_probs = torch.log_softmax(torch.randn(20, 10, generator=torch.Generator().manual_seed(1)), 1)
    assert jensen_shannon((log_probs, log_probs, log_probs)).item() == pytest.approx(0.0, abs=1e-6)
    sure = torch.full((20, 10), -30.0)
    one, two, three = (sure.index_fill(1, torch.tensor([k]), 0.0) for k in range(3))  # each sure of another class
    assert jensen_shannon((one, two, three)).item() == pytest.approx(torch.log(torch.tensor(3.0)).item(), rel=1e-4)
    mixed = jensen_shannon((log_probs, log_probs.roll(1, 0), log_probs))
    assert 0 < mixed.item() < jensen_shannon((one, two, three)).item()


def test_a_consistency_step_learns_and_records_the_classification_loss_alone() -> None:
    step = step_on_digits(augment=True, consistency=12.0)
    step.start_epoch()
    seen = losses(step, torch.arange(32), 8)
    assert min(seen[-3:]) < seen[0], seen
    assert max(seen) < 2.5  # the NLL of 10 classes (ln 10 = 2.3 at chance), not NLL + 12 x JSD
    again = step_on_digits(augment=True, consistency=12.0)
    again.start_epoch()
    assert losses(again, torch.arange(32), 8) == seen  # the same draws: reproducible
    plain = step_on_digits(augment=True)
    plain.start_epoch()
    assert losses(plain, torch.arange(32), 8) != seen
