"""Training the not-a-digit detector (core.detector): training digits against procedurally generated
non-digits (core.outliers, outlier exposure), all through the same augmentation, so that neither place,
size, pen width, blur nor resolution tells them apart: only the shapes do.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from mnist_cnn.core import outliers
from mnist_cnn.core.augment import Extras, augment
from mnist_cnn.core.detector import Detector, Tensors
from mnist_cnn.core.model import standardize

# What training digits and non-digits go through alike (so neither place, size, pen width nor blur tells
# them apart): the classifier's rotation and shift, plus scale, stroke width and blur, as users' pictures vary.
AUGMENT = Extras(scale=0.15, thickness=0.8, blur=1.0)
LOW_RESOLUTION = 0.3  # the share of pictures also brought down to 7-14 px and back up (a small or coarse scan)


def low_resolution(x: torch.Tensor, generator: torch.Generator, share: float) -> torch.Tensor:
    """`share` of the fields of (N, 1, 28, 28), in [0, 1], shrunk to one random side of 7-14 px (area
    averaging) and enlarged back (bicubic), their ink restored to full strength: coarse, blocky strokes."""
    out = x.clone()
    chosen = torch.nonzero(torch.rand(len(x), generator=generator) < share)[:, 0]
    sides = torch.randint(7, 15, (len(chosen),), generator=generator)
    for side in range(7, 15):
        group = chosen[sides == side]
        if len(group):
            small = F.interpolate(x[group], size=(side, side), mode="area")
            big = F.interpolate(small, size=x.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
            out[group] = big / big.amax((1, 2, 3), keepdim=True).clamp_min(1e-6)
    return out


def held_out_split(count: int, held_out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices trained on, indices held out) of `count` training images, a fixed permutation of `seed`."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return order[held_out:], order[:held_out]


def train(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    width: int,
    negatives: int,
    seed: int,
) -> Tensors:
    """Weights of a detector trained on uint8 digits (N, 1, 28, 28) with labels (N,): each step half
    digits (their labels), half non-digits (class 10) drawn from `negatives` generated once (generating is
    slower than a step), both augmented alike, each time afresh; Adam, cosine-decayed rate."""
    torch.manual_seed(seed)
    generator, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    digits = images.float() / 255.0
    started = time.perf_counter()
    pool = outliers.generate(negatives, rng, digits, labels)
    print(f"detector: {negatives} non-digits generated in {time.perf_counter() - started:.0f} s")
    net = Detector(width)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    half = batch_size // 2
    not_digit = torch.full((half,), 10)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        pick = torch.randint(len(digits), (half,), generator=generator)
        drawn = torch.randint(len(pool), (half,), generator=generator)
        batch = augment(torch.cat([digits[pick], pool[drawn]]), generator, AUGMENT)
        batch = low_resolution(batch, generator, LOW_RESOLUTION)
        loss = F.cross_entropy(net(standardize(batch)), torch.cat([labels[pick], not_digit]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"detector: step {step}/{steps}, loss {loss.item():.4f}, {time.perf_counter() - started:.0f} s")
    return {name: p.detach().clone() for name, p in net.named_parameters()}
