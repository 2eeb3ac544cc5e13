"""Out-of-distribution handwriting: real digits by other writers, as a user would send them.

scikit-learn's `load_digits` (1,797 digits by 43 writers, 8x8 blocks of 16 grey levels), each rendered
as a user's picture (enlarged, somewhere on a larger greyish page, ink of varying strength, now and then
reversed, sensor noise) and put through picture.to_mnist. One fixed seed; evaluation only. MNIST's test
set shares its writers' habits with the training set; this one does not (docs/ood.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import lru_cache

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits

from mnist_cnn.core.model import CPU_BATCH, accuracy, normalize_fields
from mnist_cnn.core.picture import to_mnist

SEED = 20260
MIN_SIDE, MAX_SIDE = 60, 200  # px of the enlarged 8x8 digit
REVERSED = 0.15  # share of pictures with light ink on a dark page


def render(block: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """One 8x8 digit (0-16, ink high) -> a greyscale picture of it on a page."""
    side = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    ink = Image.fromarray((block / 16.0).astype(np.float32), mode="F").resize((side, side), Image.Resampling.BICUBIC)
    ink = np.clip(np.asarray(ink), 0.0, 1.0)
    # A page 1.2-2x the digit, with the digit anywhere on it (a margin of at least 10% is left).
    page_h, page_w = (np.array([side, side]) * rng.uniform(1.2, 2.0, size=2)).astype(int)
    top = int(rng.integers(side // 10, page_h - side - side // 10 + 1))
    left = int(rng.integers(side // 10, page_w - side - side // 10 + 1))
    strength = np.zeros((page_h, page_w), dtype=np.float32)
    strength[top : top + side, left : left + side] = ink
    paper = rng.uniform(190.0, 255.0)  # white to greyish paper
    darkest = rng.uniform(0.0, 90.0)  # black ink to faint pencil
    pixels = paper + strength * (darkest - paper)
    if rng.random() < REVERSED:  # chalk on a board, or an inverted screenshot
        pixels = 255.0 - pixels
    pixels = pixels + rng.normal(0.0, rng.uniform(0.0, 8.0), size=pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="L")


def pictures() -> Iterator[tuple[Image.Image, int]]:
    """Each rendered picture with its label, in load_digits' order (deterministic)."""
    digits = load_digits()
    rng = np.random.default_rng(SEED)
    for block, label in zip(digits.images, digits.target, strict=True):
        yield render(block, rng), int(label)


@lru_cache(maxsize=1)
def load_ood_set() -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, 28, 28) MNIST-like fields, as predict feeds the model, and int64 (N,) labels."""
    prepared = [(to_mnist(picture, f"ood digit {i}"), label) for i, (picture, label) in enumerate(pictures())]
    images = np.stack([field for field, _ in prepared])
    targets = np.array([label for _, label in prepared], dtype=np.int64)
    images.flags.writeable = targets.flags.writeable = False  # one cached copy per process: keep it intact
    return images, targets


def ood_accuracy(predict_log_probs_fn: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """Accuracy on the set; the function maps normalised (N, 1, 28, 28) floats to (N, 10) scores."""
    images, labels = load_ood_set()
    with torch.inference_mode():  # in small batches: see core.model.CPU_BATCH
        scores = torch.cat([predict_log_probs_fn(x) for x in torch.split(normalize_fields(images), CPU_BATCH)])
    return accuracy(scores, torch.tensor(labels))
