"""Generated non-digits (src/mnist_cnn/evaluation/nondigits.py): the same pictures on every run, every
kind through picture.to_mnist, and the refused rate of each kind."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import render_digits
from mnist_cnn.core import refusal
from mnist_cnn.core.model import Net
from mnist_cnn.evaluation import nondigits


@pytest.mark.parametrize("kind", nondigits.KINDS)
def test_each_kind_is_the_same_set_on_every_run(kind: str) -> None:
    first = [np.asarray(p) for p in nondigits.pictures(kind, 6)]
    again = [np.asarray(p) for p in nondigits.pictures(kind, 6)]
    other = [np.asarray(p) for p in nondigits.pictures(kind, 6, seed=1)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(a.shape == b.shape and np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    assert len({p.shape for p in first}) > 1  # pictures of many sizes, as users send them
    assert all(p.dtype == np.uint8 and p.ndim == 2 for p in first)


@pytest.mark.parametrize("kind", nondigits.KINDS)
def test_every_kind_goes_through_picture_preparation(kind: str) -> None:
    fields, blank = nondigits.prepared(kind, 10)
    assert len(fields) + blank == 10
    assert fields.dtype == np.uint8 and fields.shape[1:] == (28, 28)
    if kind == "blank":
        assert blank >= 5  # the faint pages have no ink at all
    else:
        assert blank == 0 and (fields.reshape(10, -1).max(1) == 255).all()  # ink stretched to full strength


def test_refusal_rates_of_every_kind() -> None:
    torch.manual_seed(0)
    net = Net().eval()
    images, labels = render_digits(200, seed=0)
    stats = refusal.fit(net, torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long(), seed=0)
    rates = nondigits.refusal_rates(net, stats, count=6)
    assert set(rates) == {f"refused_{kind}" for kind in nondigits.KINDS}
    assert all(0 <= rate <= 1 for rate in rates.values()), rates
    assert rates["refused_blank"] >= 0.5  # the faint pages are refused before the network
