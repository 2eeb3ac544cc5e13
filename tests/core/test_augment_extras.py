"""The optional augmentations (params.yaml's augment_*): what each does to a picture, that all off
keeps the report's random stream, and that params accept them only together with augment."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import yaml

from helpers import REPO, make_params
from mnist_cnn.cli import UserError
from mnist_cnn.config import validate
from mnist_cnn.core.augment import Extras, augment, random_affine, random_blur, random_boxes, random_thickness
from mnist_cnn.core.training import build, train_epoch


def strokes() -> torch.Tensor:
    """Eight 28x28 pictures of a 2 px wide cross, floats in [0, 1], shape (8, 1, 28, 28)."""
    images = torch.zeros(8, 1, 28, 28)
    images[:, :, 13:15, 6:22] = 1.0
    images[:, :, 6:22, 13:15] = 1.0
    return images


def test_thickness_moves_each_image_between_its_erosion_and_dilation() -> None:
    images = strokes()
    out = random_thickness(images, torch.Generator().manual_seed(0), 1.0)
    ink, new_ink = images.sum((1, 2, 3)), out.sum((1, 2, 3))
    assert (new_ink > ink).any() and (new_ink < ink).any()  # some bolder, some finer
    dilated = torch.nn.functional.max_pool2d(images, 3, stride=1, padding=1)
    assert (out <= dilated + 1e-6).all() and (out >= 0).all()
    assert torch.equal(random_thickness(images, torch.Generator().manual_seed(0), 0.0), images)


def test_scale_shrinks_and_enlarges_about_the_centre() -> None:
    images = strokes()
    out = random_affine(images, torch.Generator().manual_seed(1), max_degrees=0.0, max_translate=0.0, max_scale=0.5)
    ratio = out.sum((1, 2, 3)) / images.sum((1, 2, 3))  # ink area grows or shrinks with the scale
    assert ratio.min() < 0.9 and ratio.max() > 1.1
    assert ((ratio > 0.2) & (ratio < 2.5)).all()
    unscaled = random_affine(images, torch.Generator().manual_seed(1), max_degrees=0.0, max_translate=0.0)
    assert torch.equal(unscaled, images)


def g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_all_extras_off_is_the_reports_augmentation_draw_for_draw() -> None:
    images = strokes()
    assert torch.equal(augment(images, g(3), Extras()), random_affine(images, g(3)))
    with_scale = augment(images, g(3), Extras(scale=0.2, thickness=0.5))
    assert not torch.equal(with_scale, random_affine(images, g(3)))


def test_blur_spreads_ink_and_keeps_its_sum() -> None:
    images = strokes()
    out = random_blur(images, g(0), 2.0)
    assert torch.allclose(out.sum((1, 2, 3)), images.sum((1, 2, 3)), rtol=1e-4)  # the cross is far from the edges
    peak = out.amax((1, 2, 3))
    assert (peak <= 1).all() and peak.min() < 0.8  # a 2 px stroke loses its peak under a wide blur
    assert out[:, :, :2].sum() == 0  # radius 4 from the cross's first row (6): rows 0 and 1 stay black
    spread = (out > 1e-3).sum((1, 2, 3))
    assert len(set(spread.tolist())) > 1  # each image its own sigma
    nearly_none = random_blur(images, g(0), 0.001)
    assert torch.allclose(nearly_none, images, atol=1e-6)


def test_boxes_are_one_rectangle_of_2_to_33_percent_or_none() -> None:
    images = torch.zeros(400, 1, 28, 28)
    boxes = random_boxes(images, g(1), 0.5)[:, 0]
    area = boxes.sum((1, 2)).float() / (28 * 28)
    chosen = area > 0
    assert 0.4 < chosen.float().mean() < 0.6
    assert area[chosen].min() >= 0.015 and area[chosen].max() <= 0.34
    rows, cols = boxes.any(2), boxes.any(1)  # a rectangle is the product of its rows and columns
    assert torch.equal(boxes, rows[:, :, None] & cols[:, None, :])
    assert not random_boxes(images, g(1), 0.0).any()


def test_invert_and_erase_change_one_rectangle_each() -> None:
    images = strokes()
    inverted = augment(images, g(2), Extras(invert=1.0))
    plain = random_affine(images, g(2))
    changed = inverted != plain
    assert changed.any((1, 2, 3)).all()
    assert torch.allclose(inverted[changed], 1 - plain[changed])
    erased = augment(images, g(4), Extras(erase=1.0))
    for image, reference in zip(erased, random_affine(images, g(4)), strict=True):
        # The flat grey is one value per picture; where it equals the picture's own pixel nothing shows.
        values = image[image != reference].unique()
        assert values.numel() <= 1


def test_noise_is_bounded_and_varies_per_image() -> None:
    images = torch.full((64, 1, 28, 28), 0.5)
    out = augment(images, g(5), Extras(noise=0.3))
    assert (out >= 0).all() and (out <= 1).all()
    # Away from the border, which the affine's shift fills with black, the page is 0.5 plus noise.
    std = (out - 0.5)[:, :, 4:-4, 4:-4].std((1, 2, 3))
    assert std.max() < 0.3 * 1.1 and std.max() > 0.15 and std.min() < 0.1


def test_training_with_every_extra_is_reproducible_and_differs() -> None:
    images = (strokes().repeat(16, 1, 1, 1) * 255).to(torch.uint8)
    labels = torch.arange(128) % 10
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


def raw_params(**top: Any) -> dict[str, Any]:
    raw = copy.deepcopy(yaml.safe_load((REPO / "params.yaml").read_text()))
    raw.update(top)
    return raw


@pytest.mark.parametrize(
    ("top", "expected"),
    [
        ({"augment": False, "augment_thickness": 0.5}, "augment_thickness need augment: true"),
        ({"augment": False, "augment_noise": 0.1, "augment_erase": 0.5}, "augment_erase, augment_noise need augment"),
        ({"augment_scale": 1.0}, "'augment_scale'"),
        ({"augment_thickness": -0.1}, "'augment_thickness'"),
        ({"augment_blur": 4.0}, "'augment_blur'"),
        ({"augment_invert": 1.5}, "'augment_invert'"),
        ({"augment_noise": "0.1"}, "'augment_noise'"),
    ],
)
def test_bad_values_are_one_clear_error(top: dict[str, Any], expected: str) -> None:
    with pytest.raises(UserError, match=expected):
        validate(raw_params(**top))
