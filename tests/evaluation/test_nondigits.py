"""Generated non-digits (src/mnist_cnn/evaluation/nondigits.py): the same pictures on every run, every
kind through picture.to_mnist (the symbols beside the letters), and the refused rate of each kind."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import untrained_with_refusal
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
    net, _, _, stats = untrained_with_refusal()
    rates = nondigits.refusal_rates(net, stats, count=6)
    assert set(rates) == {f"refused_{kind}" for kind in nondigits.KINDS}
    assert all(0 <= rate <= 1 for rate in rates.values()), rates
    assert rates["refused_blank"] >= 0.5  # the faint pages are refused before the network


def test_the_symbols_are_drawn_in_turn_and_prepared_as_predict_would() -> None:
    assert nondigits.SYMBOLS == "+=?&#%@" and not set(nondigits.SYMBOLS) & set(nondigits.LETTERS)
    fields, blank = nondigits.prepared("symbols", 14)
    again, _ = nondigits.prepared("symbols", 14)
    assert blank == 0 and fields.shape == (14, 28, 28) and fields.dtype == np.uint8
    assert np.array_equal(fields, again)
    assert all((field > 127).sum() >= 15 for field in fields)  # ink in every field
    assert not np.array_equal(fields[0], fields[7])  # the same symbol at another size and place
    letters, _ = nondigits.prepared("letters", 14)
    assert not np.array_equal(letters, fields)


def test_every_kind_has_its_own_rate() -> None:
    torch.manual_seed(0)
    net = Net().eval()
    stats = {"temperature": torch.tensor(1.0), "ink_range": torch.tensor([1.0, 1.0])}  # refuses all ink
    stats |= {f"{k}_{part}": v for k, dim in (("conv", 64), ("logits", 10))
              for part, v in (("means", torch.zeros(10, dim)), ("precision", torch.eye(dim)),
                              ("threshold", torch.tensor(1e9)))}  # fmt: skip
    rates = nondigits.refusal_rates(net, stats, count=4)
    assert set(rates) == {f"refused_{kind}" for kind in ("noise", "blank", "shapes", "letters", "symbols")}
    assert all(rate == 1.0 for rate in rates.values())  # blank by no ink, or by the ink rule
