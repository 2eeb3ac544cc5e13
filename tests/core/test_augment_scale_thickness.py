"""The optional augmentations (augment_scale, augment_thickness): what each does to a picture, and
that params accept them only together with augment."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import yaml

from helpers import REPO
from mnist_cnn.config import UserError, validate
from mnist_cnn.core.augment import random_affine, random_thickness


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


def raw_params(**top: Any) -> dict[str, Any]:
    raw = copy.deepcopy(yaml.safe_load((REPO / "params.yaml").read_text()))
    raw.update(top)
    return raw


@pytest.mark.parametrize(
    ("top", "expected"),
    [
        ({"augment": False, "augment_thickness": 0.5}, "need augment: true"),
        ({"augment_scale": 1.0}, "'augment_scale'"),
        ({"augment_thickness": -0.1}, "'augment_thickness'"),
    ],
)
def test_bad_values_are_one_clear_error(top: dict[str, Any], expected: str) -> None:
    with pytest.raises(UserError, match=expected):
        validate(raw_params(**top))
