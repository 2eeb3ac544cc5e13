"""The generated non-digits (evaluation.nondigits): the symbols beside the letters, each kind with its
own metric name, deterministic pictures that predict's preprocessing turns into fields of ink."""

from __future__ import annotations

import numpy as np
import torch

from mnist_cnn.core.model import Net
from mnist_cnn.evaluation import nondigits


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
