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
