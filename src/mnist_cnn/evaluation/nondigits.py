"""Pictures that are not digits, generated deterministically, to measure how often they are refused:
as a user would send them (any size, dark on light paper) and put through picture.to_mnist. Kinds:
noise (random pixels, full range or a band of greys), blank (nearly blank pages, faint noise, specks of
dust), shapes (one large solid rectangle, ellipse or triangle, no thinner than 1:2: a thin bar is a 1),
letters that do not look like a digit, and symbols. Letters and symbols are rendered with a font; they
are evaluation sets only: nothing trains or fits a threshold on them.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from mnist_cnn.config import NONDIGIT_KINDS
from mnist_cnn.core import refusal
from mnist_cnn.core.picture import NoInk, to_mnist

KINDS = NONDIGIT_KINDS
COUNT = 200  # generated pictures of each kind
LETTERS = "ACEFHKMNPRUVWXYacefhkmnprtuvwxy"
SYMBOLS = "+=?&#%@"
TEXT = {"letters": LETTERS, "symbols": SYMBOLS}  # the kinds drawn as characters of the font


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:  # the font is not installed: PIL's own (also a scalable DejaVu-like face)
        return ImageFont.load_default(size=size)


def pictures(kind: str, count: int, seed: int = 0) -> Iterator[Image.Image]:
    rng = np.random.default_rng([seed, KINDS.index(kind)])
    for i in range(count):
        side = int(rng.integers(28, 201))
        if kind == "noise":
            low = int(rng.choice([0, 0, 100, 180]))
            page = Image.fromarray(rng.integers(low, 256, size=(side, side), dtype=np.uint8))
        elif kind == "blank" and i % 2 == 0:
            paper = int(rng.integers(200, 256))
            faint = rng.integers(0, 24, size=(side, side))
            page = Image.fromarray(np.clip(paper - faint, 0, 255).astype(np.uint8))
        elif kind == "blank":
            page = Image.new("L", (side, side), 255)
            for _ in range(int(rng.integers(1, 4))):
                x, y, r = rng.integers(0, side), rng.integers(0, side), rng.integers(1, 3)
                ImageDraw.Draw(page).ellipse((x - r, y - r, x + r, y + r), fill=int(rng.integers(0, 100)))
        elif kind == "shapes":
            page = Image.new("L", (side, side), int(rng.integers(200, 256)))
            w = side * rng.uniform(0.4, 0.9)
            h = float(np.clip(w * rng.uniform(0.5, 2.0), 0.2 * side, 0.95 * side))
            x0, y0 = rng.uniform(0, side - w), rng.uniform(0, side - h)
            box, fill = (x0, y0, x0 + w, y0 + h), int(rng.integers(0, 120))
            shape = ("rectangle", "ellipse", "triangle")[i % 3]
            if shape == "triangle":
                ImageDraw.Draw(page).polygon([(x0, y0 + h), (x0 + w, y0 + h), (x0 + w / 2, y0)], fill=fill)
            else:
                getattr(ImageDraw.Draw(page), shape)(box, fill=fill)
        else:
            size = int(rng.integers(24, 121))
            page = Image.new("L", (size * 2, size * 2), 255)
            text = TEXT[kind][i % len(TEXT[kind])]
            ImageDraw.Draw(page).text((size // 3, size // 4), text, fill=0, font=_font(size))
        yield page


def prepared(kind: str, count: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """(the 28x28 fields predict would give the network, how many pictures it refused as blank first)."""
    fields, blank = [], 0
    for picture in pictures(kind, count, seed):
        try:
            fields.append(to_mnist(picture))
        except NoInk:
            blank += 1
    return np.stack(fields) if fields else np.zeros((0, 28, 28), np.uint8), blank


def refusal_rates(net: torch.nn.Module, stats: dict[str, torch.Tensor], count: int = COUNT) -> dict[str, float]:
    """The refused fraction of each kind of generated non-digit, through predict's preprocessing."""
    rates = {}
    for kind in KINDS:
        fields, blank = prepared(kind, count)
        refused = blank + (refusal.refused_fraction(net, stats, fields) * len(fields) if len(fields) else 0)
        rates[f"refused_{kind}"] = refused / count
    return rates
