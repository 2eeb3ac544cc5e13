"""The not-a-digit detector (core.detector, core.detector_training): the functional forward pass is the
module's, training on small data separates digits from generated non-digits, the low-resolution
augmentation keeps shapes and ink."""

from __future__ import annotations

import numpy as np
import torch

from helpers import render_digits
from mnist_cnn.core import detector, detector_training, outliers
from mnist_cnn.core.model import normalize


def test_scores_of_the_weights_are_the_modules_forward() -> None:
    torch.manual_seed(0)
    net = detector.Detector(width=4)
    x = torch.randn(5, 1, 28, 28)
    weights = {name: p.detach() for name, p in net.named_parameters()}
    expected = net(x).detach()
    assert expected.shape == (5, 11)
    scores = detector.score_all(weights, x, batch_size=2)
    assert torch.allclose(scores, detector.not_digit_logit(expected), atol=1e-5)
    # the log-odds of class 10 against the ten digits together
    p = torch.softmax(expected, 1)[:, 10]
    assert torch.allclose(scores, torch.log(p / (1 - p)), atol=1e-4)
    assert set(weights) == {f"{layer}.{kind}" for layer in ("conv1", "conv2", "conv3", "fc1", "fc2")
                            for kind in ("weight", "bias")}  # fmt: skip


def test_the_score_of_several_members_is_the_mean_of_theirs() -> None:
    torch.manual_seed(1)
    each = [{name: p.detach() for name, p in detector.Detector(width=4).named_parameters()} for _ in range(3)]
    x = torch.randn(6, 1, 28, 28)
    alone = [detector.score_all(weights, x) for weights in each]
    together = detector.joined(each)
    assert sorted(together)[:2] == ["m0.conv1.bias", "m0.conv1.weight"] and len(together) == 30
    assert all(torch.equal(a[k], b[k]) for a, b in zip(detector.members(together), each, strict=True) for k in a)
    assert torch.allclose(detector.score_all(together, x), torch.stack(alone).mean(0), atol=1e-6)
    assert len(detector.members(each[0])) == 1  # a detector saved before members: one member


def test_held_out_split_is_a_fixed_partition() -> None:
    fitted, held = detector_training.held_out_split(100, 30, seed=1)
    assert len(held) == 30 and len(fitted) == 70
    assert sorted(torch.cat([fitted, held]).tolist()) == list(range(100))
    assert torch.equal(held, detector_training.held_out_split(100, 30, seed=1)[1])
    assert not torch.equal(held, detector_training.held_out_split(100, 30, seed=2)[1])


def test_low_resolution_coarsens_the_chosen_share_only() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.from_numpy(render_digits(200, seed=1)[0]).unsqueeze(1).float() / 255
    out = detector_training.low_resolution(x, generator, share=0.5)
    changed = (out - x).abs().flatten(1).amax(1) > 1e-6
    assert 60 <= int(changed.sum()) <= 140  # about half
    assert torch.allclose(out[changed].amax((1, 2, 3)), torch.ones(int(changed.sum())))  # full-strength ink
    assert out.min() >= 0 and out.max() <= 1


def test_a_short_training_scores_digits_below_non_digits() -> None:
    images, labels = render_digits(600, seed=0)
    images, labels = torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long()
    weights = detector_training.train(
        images[:500], labels[:500], steps=60, batch_size=32, lr=0.003, width=8, negatives=300, seed=0
    )
    again = detector_training.train(
        images[:500], labels[:500], steps=60, batch_size=32, lr=0.003, width=8, negatives=300, seed=0
    )
    assert all(torch.equal(weights[k], again[k]) for k in weights)  # one seed, one detector
    digits = detector.score_all(weights, normalize(images[500:]))  # digits it has not fitted
    others = outliers.generate(100, np.random.default_rng(9), images[:500].float() / 255, labels[:500])
    non_digits = detector.score_all(weights, normalize((others * 255).round().to(torch.uint8)))
    # Most non-digits score above the digits' 95th percentile after 60 steps on 500 digits.
    assert (non_digits > torch.quantile(digits, 0.95)).float().mean() > 0.6
