"""The generated non-digits (core.outliers): every kind is a 28x28 field as picture.to_mnist makes one,
deterministic for a seed, and none is empty."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import render_digits
from mnist_cnn.core import outliers


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = render_digits(60, seed=0)
    return torch.from_numpy(images).unsqueeze(1).float() / 255, torch.from_numpy(labels).long()


@pytest.mark.parametrize("kind", list(outliers.KINDS))
def test_each_kind_is_a_centred_field_of_ink(kind: str, digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        field = outliers.one(kind, rng, *digits)
        assert field.shape == (1, 28, 28) and field.dtype == torch.float32
        assert field.min() >= 0 and field.max() <= 1 and (field > 0.5).sum() >= 10, kind
        if kind != "noise":  # the ink's box fits about 20x20 and its centre of mass is near the middle
            rows, cols = torch.nonzero(field[0] > 0.5, as_tuple=True)
            assert max(rows.max() - rows.min(), cols.max() - cols.min()) <= 22, kind
            mass, axis = field[0].sum(), torch.arange(28)
            centre = ((field[0].sum(1) * axis).sum() / mass, (field[0].sum(0) * axis).sum() / mass)
            assert all(abs(c - 13.5) <= 1.5 for c in centre), (kind, centre)


def test_generate_draws_the_kinds_by_their_shares_and_repeats_for_a_seed(
    digits: tuple[torch.Tensor, torch.Tensor],
) -> None:
    first = outliers.generate(40, np.random.default_rng(3), *digits)
    again = outliers.generate(40, np.random.default_rng(3), *digits)
    other = outliers.generate(40, np.random.default_rng(4), *digits)
    assert first.shape == (40, 1, 28, 28)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert len({tuple(x.flatten().tolist()) for x in first}) == 40  # no two alike


def test_the_shares_are_a_distribution_and_mirrored_digits_are_not_their_own_mirror_image() -> None:
    assert abs(sum(outliers.KINDS.values()) - 1) < 1e-9 and min(outliers.KINDS.values()) > 0
    assert not {0, 1, 8} & set(outliers.MIRRORED)


def test_symmetric_figures_are_their_own_mirror_image(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    rng = np.random.default_rng(5)
    for _ in range(10):
        field = outliers.one("symmetric", rng, *digits)[0]
        mirrored = outliers.centre_of_mass(field.flip(-1)[None, None])[0, 0]
        overlap = (torch.minimum(field, mirrored).sum() / field.sum()).item()
        assert overlap > 0.8, overlap  # whole-pixel centring and the soft edge leave a little apart
        unrelated = outliers.one("strokes", rng, *digits)[0]
        assert (torch.minimum(unrelated, unrelated.flip(-1)).sum() / unrelated.sum()).item() < overlap


def test_blobs_are_solid_and_never_a_thin_bar(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    rng = np.random.default_rng(6)
    for _ in range(20):
        ink = outliers.one("blob", rng, *digits)[0] > 0.5
        rows, cols = torch.nonzero(ink, as_tuple=True)
        height, width = (rows.max() - rows.min() + 1).item(), (cols.max() - cols.min() + 1).item()
        assert min(height, width) >= 6, (height, width)  # a 1 is a bar a few pixels wide
        assert ink.sum() >= 0.35 * height * width  # filled, not outlined


def test_turned_digits_lie_on_their_side_and_a_lone_one_is_never_a_0_1_or_8(
    digits: tuple[torch.Tensor, torch.Tensor],
) -> None:
    images, _ = digits
    labels = torch.full((len(images),), 1)
    labels[3] = 7  # the one digit a lone turn may take; pairs may take the 1s too
    lone = [outliers.fit_and_centre(torch.rot90(images[3], k, dims=(1, 2))) for k in (1, -1)]
    rng = np.random.default_rng(7)
    fields = [outliers.one("turned", rng, images, labels) for _ in range(40)]
    alone = sum(any(torch.equal(field, turned) for turned in lone) for field in fields)
    assert 15 <= alone <= 37, alone  # 70% lone digits; the rest pairs, which are none of these
    assert not any(torch.equal(field, outliers.fit_and_centre(images[3])) for field in fields)


def test_the_lines_kind_draws_straight_strokes_and_the_others_bend() -> None:
    rng = np.random.default_rng(8)
    for kind, straight in ((0, True), (1, False), (2, False)):
        for _ in range(5):
            points = outliers._curve(rng, kind=kind)
            spread = np.linalg.svd(points - points.mean(0), compute_uv=False)  # a line has one direction
            assert (spread[1] < 1e-9 * spread[0]) == straight, (kind, spread)
