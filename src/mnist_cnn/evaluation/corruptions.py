"""Corrupted copies of the test images, uint8 (N, 28, 28) in and out (the float work in [0, 1]).

Curves: rotation, shift and scale of a given size, one affine_grid + grid_sample call per batch
(bilinear, zero fill, as MNIST-C's skimage warp). MNIST-C (Mu & Gilmer 2019): the fifteen corruptions
at the published severities, in torch for whole batches: the four geometric ones here, the others in
photometric.py. Where the paper draws a random number per image, so do we, from a generator seeded
per corruption: every model is scored on identical bytes.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mnist_cnn.config import AFFINE_CORRUPTIONS, CORRUPTIONS
from mnist_cnn.evaluation import photometric
from mnist_cnn.evaluation.photometric import SIZE

CHUNK = 2000  # images corrupted at once


# ---------------------------------------------------------------- geometry


def warp(images: torch.Tensor, inverse: torch.Tensor, inverse_shift: torch.Tensor) -> torch.Tensor:
    """Sample each output pixel p at input inverse @ (p - c) + c + inverse_shift: `inverse` (N, 2, 2) and
    `inverse_shift` (N, 2; pixels, x right, y down) map output to input coordinates, as skimage's
    warp(inverse_map=...) and affine_grid do. About the centre a linear map is the same matrix in
    affine_grid's normalised coordinates; a shift scales by 2/size."""
    n = images.shape[0]
    theta = torch.cat([inverse, (inverse_shift * (2.0 / SIZE)).unsqueeze(2)], dim=2).to(torch.float32)
    x = images.to(torch.float32).unsqueeze(1) / 255.0
    grid = F.affine_grid(theta, [n, 1, SIZE, SIZE], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return to_uint8(out.squeeze(1))


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _batch(value: float | torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float64).expand(n).to(device)


Amount = float | torch.Tensor  # one for the batch, or one per image


def moved(
    images: torch.Tensor, degrees: Amount = 0.0, dx: Amount = 0.0, dy: Amount = 0.0, zoom: Amount = 1.0
) -> torch.Tensor:
    """Rotate counter-clockwise on screen by `degrees` and zoom by `zoom` (< 1 shrinks the digit, > 1
    enlarges and may crop it), both about the centre, then move the ink dx pixels right, dy down."""
    n, device = images.shape[0], images.device
    a = _batch(degrees, n, device) * (math.pi / 180)
    cos, sin = torch.cos(a), torch.sin(a)
    # Forward map, y down: [[cos, sin], [-sin, cos]] * zoom; the inverse is its transpose / zoom.
    inverse = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
    inverse = inverse / _batch(zoom, n, device).view(n, 1, 1)
    return warp(images, inverse, -torch.stack([_batch(dx, n, device), _batch(dy, n, device)], 1))


def random_signs(n: int, generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randint(0, 2, (n, *shape), generator=generator).to(torch.float64) * 2 - 1


# ---------------------------------------------------------------- MNIST-C's geometric corruptions
# Each takes floats (N, 28, 28) in [0, 1] and a CPU generator; the paper's severity in brackets.


def shear(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    # [2] skimage AffineTransform(shear=0.4 rad) as the inverse map, random direction.
    n = x.shape[0]
    c = 0.4 * random_signs(n, g)
    zero, one = torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
    inverse = torch.stack([torch.stack([one, -torch.sin(c)], 1), torch.stack([zero, torch.cos(c)], 1)], 1)
    return warp(to_uint8(x), inverse.to(x.device), torch.zeros(n, 2, dtype=torch.float64, device=x.device)) / 255


def rotate(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    degrees = math.degrees(0.4) * random_signs(x.shape[0], g)  # [2] 0.4 rad = 22.9 degrees, random direction
    return moved(to_uint8(x), degrees=degrees.to(x.device)) / 255


def scale(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return moved(to_uint8(x), zoom=0.7) / 255  # [3] inverse map x 1/0.7: the digit shrinks to 70%


def translate(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    d = 3 * random_signs(x.shape[0], g, 2).to(x.device)  # [3] 3 pixels along x and y, random signs
    return moved(to_uint8(x), dx=d[:, 0], dy=d[:, 1]) / 255


# Each corruption is the function of its name, here or in photometric.py; config.CORRUPTIONS lists the names.
MNIST_C: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    name: globals()[name] if name in AFFINE_CORRUPTIONS else getattr(photometric, name) for name in CORRUPTIONS
}


def corrupt(name: str, images: torch.Tensor) -> torch.Tensor:
    """The MNIST-C corruption `name` of uint8 images (N, 28, 28), same bytes on every call."""
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))  # its own fixed seed
    x = images.to(torch.float32) / 255
    # Fixed-size chunks bound the memory (zigzag's line masks are large per image); one
    # generator runs through them in order, so the bytes still depend on nothing else.
    return torch.cat([to_uint8(MNIST_C[name](x[i : i + CHUNK], generator)) for i in range(0, len(x), CHUNK)])


# ---------------------------------------------------------------- curves

SHIFT_DIRECTIONS = {"x": (1, 0), "y": (0, 1), "diagonal": (1, 1)}


def both_ways(angles: list[float]) -> list[float]:
    """The rotation curve's angles: each clockwise and counter-clockwise, 0 once, ascending."""
    return sorted(set(angles) | {-a for a in angles if a})


def curve_point(curve: str, size: float, images: torch.Tensor) -> torch.Tensor:
    """The curve's transformation of the given size. rotation: degrees, counter-clockwise when
    positive; shift_x/_y/_diagonal: whole pixels, each image in its own fixed random direction
    along the axis (or axes), as MNIST-C's translate; scale: the zoom factor."""
    if curve == "rotation":
        return moved(images, degrees=size)
    if curve == "scale":
        return moved(images, zoom=size)
    ux, uy = SHIFT_DIRECTIONS[curve.removeprefix("shift_")]
    signs = random_signs(images.shape[0], torch.Generator().manual_seed(0), 2).to(images.device)
    return moved(images, dx=size * ux * signs[:, 0], dy=size * uy * signs[:, 1])
