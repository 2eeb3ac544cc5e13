"""Batched training augmentation on the training device: the report's rotation + translation, and extras.

Equivalent, per image, to torchvision's RandomRotation(10) followed by RandomAffine(0, translate=(0.1, 0.1)):
an angle uniform in [-10, 10] degrees and a whole-pixel shift uniform in +-10% of the width and height,
nearest-neighbour sampling, zero fill. One affine_grid + grid_sample call transforms the whole batch, each
image its own transform, so the data never leaves the device (no per-image PIL work or DataLoader workers).
The extras (`Extras`, each off by default) are batched the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Extras:
    """The optional augmentations (params.yaml's augment_*), each 0 = off. An extra that is off draws
    nothing from the generator, so the report's augmentation keeps its random stream exactly."""

    scale: float = 0.0  # each image scaled by a factor in [1 - scale, 1 + scale]
    thickness: float = 0.0  # strokes bolder or finer by up to this fraction of a 3x3 dilation/erosion
    blur: float = 0.0  # a Gaussian blur of sigma uniform in [0, blur] pixels
    invert: float = 0.0  # probability of inverting one random rectangle
    erase: float = 0.0  # probability of painting one random rectangle a flat random grey
    noise: float = 0.0  # Gaussian pixel noise of std uniform in [0, noise]


def augment(images: torch.Tensor, generator: torch.Generator | None, extras: Extras) -> torch.Tensor:
    """The training augmentation of a float batch in [0, 1]: strokes, then geometry, then the look."""
    return photometric(geometric(images, generator, extras), generator, extras)


def geometric(images: torch.Tensor, generator: torch.Generator | None, extras: Extras) -> torch.Tensor:
    """The strokes' width, then rotation, shift and scale: where and how large the digit is."""
    x = images
    if extras.thickness > 0:  # before the affine: pixel-sized strokes, as the data's
        x = random_thickness(x, generator, extras.thickness)
    return random_affine(x, generator, max_scale=extras.scale)  # on [0, 1] pixels the zero fill is background


def photometric(images: torch.Tensor, generator: torch.Generator | None, extras: Extras) -> torch.Tensor:
    """Blur, inverted and erased rectangles, pixel noise: how the picture looks."""
    x = images
    if extras.blur > 0:
        x = random_blur(x, generator, extras.blur)
    if extras.invert > 0:
        box = random_boxes(x, generator, extras.invert)
        x = torch.where(box, 1 - x, x)
    if extras.erase > 0:
        box = random_boxes(x, generator, extras.erase)
        grey = torch.rand(x.shape[0], 1, 1, 1, device=x.device, generator=generator, dtype=x.dtype)
        x = torch.where(box, grey, x)
    if extras.noise > 0:
        std = torch.rand(x.shape[0], 1, 1, 1, device=x.device, generator=generator, dtype=x.dtype) * extras.noise
        x = (x + std * torch.randn(x.shape, device=x.device, generator=generator, dtype=x.dtype)).clamp(0, 1)
    return x


def random_blur(images: torch.Tensor, generator: torch.Generator | None, max_sigma: float) -> torch.Tensor:
    """Blur each image with its own Gaussian, sigma uniform in [0, max_sigma] pixels (zero padding)."""
    n, c, h, w = images.shape
    sigma = torch.rand(n, device=images.device, generator=generator, dtype=images.dtype) * max_sigma + 1e-3
    radius = math.ceil(2 * max_sigma)
    d = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (d[None, :] / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (N*C, K): one per channel
    # Separable, and one grouped convolution for the whole batch: each image is its own group.
    x = images.reshape(1, n * c, h, w)
    x = F.conv2d(x, kernel[:, None, :, None], padding=(radius, 0), groups=n * c)
    x = F.conv2d(x, kernel[:, None, None, :], padding=(0, radius), groups=n * c)
    return x.reshape(n, c, h, w)


def random_boxes(images: torch.Tensor, generator: torch.Generator | None, p: float) -> torch.Tensor:
    """A boolean (N, 1, H, W) mask: with probability p, one rectangle per image, else none.

    Drawn as torchvision's RandomErasing draws its rectangle: 2-33% of the area, aspect ratio
    log-uniform in [0.3, 3.3], placed uniformly (clamped to the image rather than redrawn).
    """
    n, _, h, w = images.shape
    device, g = images.device, generator
    chosen = torch.rand(n, device=device, generator=g) < p
    area = (0.02 + 0.31 * torch.rand(n, device=device, generator=g)) * (h * w)
    ratio = torch.exp(math.log(0.3) + math.log(3.3 / 0.3) * torch.rand(n, device=device, generator=g))
    box_h = torch.sqrt(area * ratio).round().clamp(1, h)
    box_w = torch.sqrt(area / ratio).round().clamp(1, w)
    top = (torch.rand(n, device=device, generator=g) * (h - box_h + 1)).floor()
    left = (torch.rand(n, device=device, generator=g) * (w - box_w + 1)).floor()
    rows, cols = torch.arange(h, device=device), torch.arange(w, device=device)
    in_rows = (rows >= top[:, None]) & (rows < (top + box_h)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + box_w)[:, None])
    return (in_rows[:, :, None] & in_cols[:, None, :] & chosen[:, None, None])[:, None]
