"""Batched random rotation + translation on the training device.

Equivalent, per image, to torchvision's RandomRotation(10) followed by RandomAffine(0, translate=(0.1, 0.1)):
an angle uniform in [-10, 10] degrees and a whole-pixel shift uniform in +-10% of the width and height,
nearest-neighbour sampling, zero fill. One affine_grid + grid_sample call transforms the whole batch, each
image its own transform, so the data never leaves the device (no per-image PIL work or DataLoader workers).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def affine_theta(
    angle_deg: torch.Tensor, shift_px: torch.Tensor, size: int, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """(N, 2, 3) matrices for affine_grid: rotate by angle about the centre, then shift.

    `angle_deg` (N,) is counter-clockwise as in torchvision; `shift_px` (N, 2) is
    (dx, dy) in pixels, positive right and down. affine_grid maps output
    coordinates to input coordinates, so theta is the inverse transform, in the
    normalised [-1, 1] coordinates of a square image. `scale` (N,), if given, enlarges
    (> 1) or shrinks (< 1) each image about its centre before the shift.
    """
    a = angle_deg * (math.pi / 180.0)
    cos, sin = torch.cos(a), torch.sin(a)
    # Forward map in image coordinates (y down), counter-clockwise on screen:
    # [x', y'] = [[cos, sin], [-sin, cos]] [x, y] + t. Its inverse is the transpose.
    t = shift_px * (2.0 / size)
    tx, ty = t[:, 0], t[:, 1]
    row0 = torch.stack([cos, -sin, -(cos * tx - sin * ty)], dim=1)
    row1 = torch.stack([sin, cos, -(sin * tx + cos * ty)], dim=1)
    theta = torch.stack([row0, row1], dim=1)
    return theta if scale is None else theta / scale[:, None, None]


def random_affine(
    images: torch.Tensor,
    generator: torch.Generator | None,
    max_degrees: float = 10.0,
    max_translate: float = 0.1,
    max_scale: float = 0.0,
) -> torch.Tensor:
    """Rotate and shift each float image of (N, C, H, W) by its own random amount.

    max_scale > 0 also scales each image by a factor uniform in [1 - max_scale, 1 + max_scale],
    sampled bilinearly (nearest-neighbour would break thin strokes when shrinking); 0 draws
    nothing more, so the report's augmentation draws the same random stream with or without it.
    """
    n, _, h, w = images.shape
    device = images.device
    angle = (torch.rand(n, device=device, generator=generator) * 2 - 1) * max_degrees
    # torchvision draws a uniform shift and rounds it to whole pixels. (Scalars
    # only, no host-to-device copies: this runs inside CUDA graph capture.)
    u = torch.rand(n, 2, device=device, generator=generator) * 2 - 1
    shift = torch.stack([u[:, 0] * (max_translate * w), u[:, 1] * (max_translate * h)], dim=1).round()
    scale = None
    if max_scale > 0:
        scale = 1 + (torch.rand(n, device=device, generator=generator) * 2 - 1) * max_scale
    theta = affine_theta(angle, shift, w, scale).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    mode = "nearest" if scale is None else "bilinear"
    return F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False)


def random_thickness(images: torch.Tensor, generator: torch.Generator | None, amount: float) -> torch.Tensor:
    """Make each image's strokes thicker or thinner by its own random amount in [-amount, amount].

    A 3x3 grey dilation (max-pool) widens a stroke by a pixel on each side, an erosion (min-pool)
    narrows it; the image is blended towards one of them by |t|, t uniform in [-amount, amount]
    (amount <= 1). Users' pens, and enlarged scans, are often bolder or finer than MNIST's strokes.
    """
    n = images.shape[0]
    t = ((torch.rand(n, device=images.device, generator=generator) * 2 - 1) * amount).to(images.dtype)
    t = t[:, None, None, None]
    dilated = F.max_pool2d(images, 3, stride=1, padding=1)
    eroded = -F.max_pool2d(-images, 3, stride=1, padding=1)
    target = torch.where(t > 0, dilated, eroded)
    return images + t.abs() * (target - images)
