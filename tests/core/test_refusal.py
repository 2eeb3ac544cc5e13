"""Not a digit (src/mnist_cnn/core/refusal.py): blank pages, noise and solid shapes refused with their
reason, digits answered; deterministic statistics; the thresholds; threads sharing a net; the detector's
part. (predict's use of it is tested in tests/serving/test_predict.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from helpers import make_params, render_digits, trained_one_epoch
from mnist_cnn.core import detector, refusal
from mnist_cnn.core.augment import Extras, random_affine
from mnist_cnn.core.model import Net, load_model, normalize_fields, standardize
from mnist_cnn.core.picture import to_mnist
from mnist_cnn.files import load_tensors

BUDGET = make_params().evaluate  # params.yaml's refusal budget, calibration sizes and detector share


def test_blank_noise_and_shapes_are_refused_and_digits_answered(font_model: Path) -> None:
    net, stats = load_model(str(font_model / "model.pt")), load_tensors(font_model / "refusal.pt")
    images, labels = render_digits(40, seed=7)  # digits the model has not seen
    digits = np.stack([to_mnist(Image.fromarray(image)) for image in images])
    square = Image.new("L", (100, 100), 255)
    ImageDraw.Draw(square).rectangle((20, 25, 80, 85), fill=0)
    noise = np.random.default_rng(0).integers(0, 256, size=(28, 28), dtype=np.uint8)
    others = np.stack([np.zeros((28, 28), np.uint8), np.full((28, 28), 255, np.uint8), noise, to_mnist(square)])
    answered, probabilities, reasons = refusal.answer(net, stats, normalize_fields(np.concatenate([digits, others])))
    assert reasons[40:42] == [refusal.BLANK, refusal.BLANK]  # a black and a white field
    assert all(reason.startswith("not a digit") for reason in reasons[42:]), reasons[42:]
    assert (answered[40:] == -1).all() and (probabilities[40:] == 0).all()
    assert sum(r is None for r in reasons[:40]) >= 36, reasons[:40]
    assert (answered[:40] == labels).mean() >= 0.5, answered[:40]  # one epoch on unprepared digits reads most
    assert ((probabilities[:40] > 0.1) == (answered[:40] >= 0)).all()


def test_refusal_statistics_are_deterministic() -> None:
    torch.manual_seed(0)
    net = Net().eval()
    images, labels = render_digits(600, seed=0)
    images, labels = torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long()
    first = refusal.fit(net, images[:600], labels[:600], seed=3, budget=BUDGET)
    again = refusal.fit(net, images[:600], labels[:600], seed=3, budget=BUDGET)
    layers = {f"{k}_{part}" for k in ("conv", "logits") for part in ("means", "precision", "threshold")}
    assert set(first) == layers | {"ink_range", "temperature"}
    for key in first:
        assert torch.equal(first[key], again[key]), key
    assert first["conv_means"].shape == (10, 64) and first["conv_precision"].shape == (64, 64)
    assert first["logits_means"].shape == (10, 10) and first["logits_precision"].shape == (10, 10)
    assert first["conv_threshold"] > 0 and first["logits_threshold"] > 0 and first["temperature"] > 0


def test_the_thresholds_cut_the_same_tail_of_each_score_and_refuse_the_rate_together() -> None:
    generator = torch.Generator().manual_seed(0)
    near, far = torch.rand(10_000, generator=generator), 1000 * torch.rand(10_000, generator=generator)
    small, large = refusal.union_thresholds([near, far], 0.02)
    # Two independent scores: each cuts about 1% (1 - 0.99^2 = 0.02), whatever its scale.
    assert (near > small).float().mean().item() == pytest.approx(0.01, abs=0.001)
    assert (far > large).float().mean().item() == pytest.approx(0.01, abs=0.001)
    assert ((near > small) | (far > large)).float().mean().item() == pytest.approx(0.02, abs=0.0002)
    # The same score twice: the union is the score, so each threshold cuts the full 2%.
    same = refusal.union_thresholds([near, near.clone()], 0.02)
    assert (near > same[0]).float().mean().item() == pytest.approx(0.02, abs=0.0002)


def test_answers_are_right_when_threads_share_the_net() -> None:
    """The scoring server answers concurrent requests in threads that share one net."""
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(0)
    net = Net().eval()
    images = torch.randint(0, 256, (200, 1, 28, 28), dtype=torch.uint8)
    stats = refusal.fit(net, images, torch.arange(200) % 10, seed=0, budget=BUDGET)
    batches = [torch.randn(n, 1, 28, 28) for n in (1, 16, 3, 8) * 5]
    alone = [refusal.answer(net, stats, x)[0] for x in batches]
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(lambda x: refusal.answer(net, stats, x)[0], batches))
    for a, b in zip(alone, together, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def trained() -> tuple[Net, torch.Tensor, torch.Tensor]:
    """A model trained for 1 epoch on 3,000 font-rendered digits, and its training set."""
    torch.manual_seed(0)
    images, labels = render_digits(3000, seed=0)
    images, labels = torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long()
    return trained_one_epoch(images, labels), images, labels


def test_a_score_with_a_larger_share_cuts_that_many_times_the_tail() -> None:
    generator = torch.Generator().manual_seed(1)
    a, b = torch.rand(20_000, generator=generator), torch.rand(20_000, generator=generator)
    ta, tb = refusal.union_thresholds([a, b], 0.02, shares=[1.0, 3.0])
    assert (b > tb).float().mean().item() == pytest.approx(3 * (a > ta).float().mean().item(), rel=0.05)
    assert ((a > ta) | (b > tb)).float().mean().item() == pytest.approx(0.02, abs=0.0002)


def test_the_detector_joins_the_refusal_fitted_on_the_digits_it_held_out(
    trained: tuple[Net, torch.Tensor, torch.Tensor],
) -> None:
    net, images, labels = trained
    torch.manual_seed(0)
    weights = {name: p.detach() for name, p in detector.Detector(width=4).named_parameters()}
    held_out = torch.randperm(len(images), generator=torch.Generator().manual_seed(5))
    on = BUDGET.model_copy(update={"detector_share": 10.0})
    off = refusal.fit(net, images, labels, seed=3, budget=BUDGET.model_copy(update={"detector_share": 0.0}),
                      detector={**weights, "held_out": held_out})  # fmt: skip
    assert not any(k.startswith(detector.PREFIX) or k == "detector_threshold" for k in off)  # share 0: off
    stats = refusal.fit(net, images, labels, seed=3, budget=on, detector={**weights, "held_out": held_out})
    assert {f"{detector.PREFIX}{k}" for k in weights} | {"detector_threshold"} <= set(stats)
    assert all(torch.equal(stats[detector.PREFIX + k], v) for k, v in weights.items())
    # The thresholds come from the held-out digits as training saw them: the three scores refuse the
    # fitted rate of them together, the detector detector_share times each distance's tail.
    generator = torch.Generator().manual_seed(3)
    torch.randperm(len(images), generator=generator)  # as fit draws them: its random pick comes first
    seen = random_affine(images[held_out].float() / 255, generator)
    x = standardize(seen)
    features, _ = refusal.features_and_log_probs(net, x)
    distances = refusal.all_distances(features, stats)
    far = torch.stack([distances[k] > stats[f"{k}_threshold"] for k in refusal.LAYERS]).any(0)
    unlike = refusal.detector_scores(stats, x) > stats["detector_threshold"]
    assert (far | unlike).float().mean().item() == pytest.approx(on.refused_training, abs=2 / len(images))
    assert unlike.sum() >= 2 * max(int((distances[k] > stats[f"{k}_threshold"]).sum()) for k in refusal.LAYERS)

    # Its decision: above the detector's threshold, refused with its reason; without a detector, never by it.
    digits, probabilities, reasons = refusal.answer(net, stats | {"detector_threshold": torch.tensor(-1e9)}, x[:20])
    assert (digits == -1).all() and (probabilities == 0).all()
    assert all(r.startswith("not a digit (the not-a-digit detector scores it ") for r in reasons if "ink" not in r)
    plain = {k: v for k, v in stats.items() if not k.startswith(detector.PREFIX) and k != "detector_threshold"}
    assert not any("detector" in (r or "") for r in refusal.answer(net, plain, x)[2])


def test_the_distances_calibrate_on_the_models_own_photometric_augmentation(
    trained: tuple[Net, torch.Tensor, torch.Tensor],
) -> None:
    net, images, labels = trained
    budget = BUDGET.model_copy(update={"detector_share": 0.0, "calibration_images": 1000})
    plain = refusal.fit(net, images, labels, seed=3, budget=budget)
    # Without photometric pieces nothing changes, draw for draw (the report's model keeps its statistics).
    geometric_only = refusal.fit(net, images, labels, seed=3, budget=budget, extras=Extras(scale=0.1, thickness=0.5))
    assert all(torch.equal(plain[k], geometric_only[k]) for k in plain)
    looks = refusal.fit(net, images, labels, seed=3, budget=budget, extras=Extras(blur=1.0, noise=0.15))
    # Blurred and noisy digits lie further out in the conv features: that threshold loosens; what the fit
    # takes from the clean and geometric views (the means, the ink range, the temperature) stays.
    assert looks["conv_threshold"] > 1.5 * plain["conv_threshold"]
    for k in ("conv_means", "logits_precision", "ink_range", "temperature"):
        assert torch.equal(looks[k], plain[k])
