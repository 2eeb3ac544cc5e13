"""Procedurally generated non-digits that are not characters: the negatives of the not-a-digit detector
(outlier exposure, Hendrycks et al. 2019). Each is a 28x28 field as picture.to_mnist makes one (the
ink's box fitted into 20x20, centred by centre of mass), pixels in [0, 1]:

- strokes: 2-5 random lines, arcs and curves at MNIST's stroke width, apart or each starting on an earlier
  one; lines: 2-4 straight ones only; arc: one open bend (a quarter to three quarters of a turn);
  scribble: one long wandering line; outline: a closed figure with corners (a triangle, a star, a box
  with a diagonal; no round ring: a 0);
- from training digits: chimera (one digit's top or left part joined to another digit's rest), crossed
  (a digit with extra strokes across it), pair (two digits side by side), turned (a digit or a pair on
  its side), mirrored (a digit that is not its own mirror image, flipped);
- blob (solid ellipses and polygons) and noise.

No letters, symbols or font glyphs: what the detector refuses of those is measured, not fitted.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from mnist_cnn.core.augment import affine_theta

SIZE, FIT = 28, 20  # picture.to_mnist: the ink's box fits 20x20 in a 28x28 field
SAMPLES = 40  # points along each stroke
# Kind -> share of the negatives. Digit-made kinds carry MNIST's own pen texture: the detector must
# learn the shapes of digits, not how MNIST was drawn.
KINDS = {
    "strokes": 0.08, "lines": 0.08, "joined": 0.1, "symmetric": 0.08, "arc": 0.04, "scribble": 0.04,
    "outline": 0.08, "chimera": 0.13, "crossed": 0.08, "pair": 0.08, "turned": 0.09, "mirrored": 0.04,
    "blob": 0.05, "noise": 0.03,
}  # fmt: skip
MIRRORED = (3, 4, 6, 7, 9)  # a mirrored 0, 1 or 8 is that digit, a mirrored 2 or 5 close to the other


def _curve(rng: np.random.Generator, start: np.ndarray | None = None, kind: int | None = None) -> np.ndarray:
    """One stroke in the unit square, (SAMPLES, 2): a line (kind 0), an elliptic arc (1) or a quadratic
    curve (2), from `start` if given; the kind random if not given."""
    t = np.linspace(0.0, 1.0, SAMPLES)[:, None]
    kind = int(rng.integers(3)) if kind is None else kind
    if kind == 0:
        a, b = rng.random((2, 2))
        a = a if start is None else start
        return a + t * (b - a)
    if kind == 1:
        centre, radii = rng.random(2), rng.uniform(0.15, 0.5, 2)
        start_angle, sweep = rng.uniform(0, 2 * math.pi), rng.uniform(0.5, 1.6) * math.pi
        if start is not None:  # the arc's centre placed so that it begins at `start`
            centre = start - radii * np.array([math.cos(start_angle), math.sin(start_angle)])
        angle = start_angle + t[:, 0] * sweep
        return centre + radii * np.stack([np.cos(angle), np.sin(angle)], 1)
    a, b, c = rng.random((3, 2))
    a = a if start is None else start
    return (1 - t) ** 2 * a + 2 * (1 - t) * t * b + t**2 * c


def _joined(rng: np.random.Generator) -> list[np.ndarray]:
    """2-5 strokes, each after the first starting at a random point of an earlier one (a junction)."""
    strokes = [_curve(rng)]
    for _ in range(int(rng.integers(1, 5))):
        earlier = strokes[int(rng.integers(len(strokes)))]
        strokes.append(_curve(rng, start=earlier[int(rng.integers(SAMPLES))]))
    return strokes


def _symmetric(rng: np.random.Generator) -> list[np.ndarray]:
    """1-3 strokes (apart or joined) and their mirror image across a vertical line: a figure symmetric left
    to right, which among digits only 0, 1 and 8 are (and those the detector learns as digits)."""
    half = (
        _joined(rng)[: int(rng.integers(1, 4))]
        if rng.random() < 0.5
        else [_curve(rng) for _ in range(int(rng.integers(1, 4)))]
    )
    axis = float(rng.uniform(0.3, 0.7))  # the halves overlap or stand apart
    return half + [np.stack([2 * axis - s[:, 0], s[:, 1]], 1) for s in half]


def _arc(rng: np.random.Generator) -> np.ndarray:
    t = np.linspace(0.0, 1.0, 2 * SAMPLES)
    start, sweep = rng.uniform(0, 2 * math.pi), rng.uniform(0.5, 1.5) * math.pi
    angle = start + t * sweep
    return np.stack([np.cos(angle), np.sin(angle)], 1) * rng.uniform(0.5, 1.0, (1, 2))


def _path(points: np.ndarray) -> np.ndarray:
    """A polyline through `points` (K, 2), densely sampled."""
    t = np.linspace(0.0, 1.0, 24, endpoint=False)[:, None, None]
    segments = points[:-1][None] + t * (points[1:] - points[:-1])[None]
    return np.concatenate([segments.transpose(1, 0, 2).reshape(-1, 2), points[-1:]])


def _outline(rng: np.random.Generator) -> np.ndarray:
    shape = rng.integers(3)
    if shape == 0:  # a triangle, corners about a third of a turn apart (not so flat as to be a bar)
        angle = rng.uniform(0, 2 * math.pi) + np.arange(4) * 2 * math.pi / 3 + rng.uniform(-0.4, 0.4, 4)
        angle[3] = angle[0]
        return _path(np.stack([np.cos(angle), np.sin(angle)], 1) * rng.uniform(0.6, 1, (1, 2)))
    if shape == 1:  # a five-pointed star, drawn in one line
        angle = rng.uniform(0, 2 * math.pi) + np.arange(6) * 4 * math.pi / 5
        return _path(0.5 + 0.5 * np.stack([np.cos(angle), np.sin(angle)], 1) * rng.uniform(0.6, 1, (1, 2)))
    w, h = rng.uniform(0.5, 1.0, 2)
    box = np.array([[0, 0], [w, 0], [w, h], [0, h], [0, 0], [w, h]])  # a box and one diagonal
    return _path(box)


def _scribble(rng: np.random.Generator) -> np.ndarray:
    steps = int(rng.integers(25, 60))
    heading = np.cumsum(rng.normal(0.0, 0.6, steps)) + rng.uniform(0, 2 * math.pi)
    return _path(np.cumsum(np.stack([np.cos(heading), np.sin(heading)], 1), 0))


def _solid(rng: np.random.Generator) -> torch.Tensor:
    """1-3 solid figures (1, 28, 28), ellipses or convex polygons of 3-6 corners, overlapping or not; none
    thinner than 1:2 (a thin bar is a 1)."""
    page = Image.new("L", (4 * SIZE, 4 * SIZE), 0)
    for _ in range(int(rng.integers(1, 4))):
        centre, radius = rng.uniform(30, 82, 2), rng.uniform(12, 40)
        radii = np.array([radius, radius * rng.uniform(0.5, 2.0)])
        if rng.random() < 0.5:
            ImageDraw.Draw(page).ellipse([*(centre - radii), *(centre + radii)], fill=255)
        else:
            count = int(rng.integers(3, 7))
            steps = np.arange(count) + rng.uniform(-0.3, 0.3, count)  # corners spread round, not bunched
            angle = rng.uniform(0, 2 * math.pi) + steps * 2 * math.pi / count
            corners = centre + radii * np.stack([np.cos(angle), np.sin(angle)], 1)
            ImageDraw.Draw(page).polygon([tuple(c) for c in corners.tolist()], fill=255)
    return torch.from_numpy(np.asarray(page, dtype=np.float32) / 255.0)[None]


def _pair(rng: np.random.Generator, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Two digits (1, 28, 28) side by side, touching or overlapping a little: (1, 28, 28 + gap)."""
    gap = int(rng.integers(14, 25))
    canvas = torch.zeros(1, SIZE, SIZE + gap)
    canvas[:, :, :SIZE] = left
    canvas[:, :, gap:] = torch.maximum(canvas[:, :, gap:], right)
    return canvas


def draw(strokes: list[np.ndarray], radius: float) -> torch.Tensor:
    """Strokes (point lists in any units) drawn as one field (1, 28, 28): their box fitted into 20x20,
    ink of full strength within `radius` px of a stroke's centre line, a one-pixel soft edge, the centre
    of mass centred."""
    points = np.concatenate(strokes)
    low, high = points.min(0), points.max(0)
    scale = (FIT - 2 * radius) / max(float((high - low).max()), 1e-6)
    points = (points - (low + high) / 2) * scale + (SIZE - 1) / 2
    grid = np.stack(np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="xy"), -1).reshape(-1, 2)
    distance = torch.cdist(torch.from_numpy(grid).float(), torch.from_numpy(points).float()).min(1).values
    return centre_of_mass((radius + 0.5 - distance).clamp(0, 1).reshape(1, 1, SIZE, SIZE))[0]


def fit_and_centre(field: torch.Tensor) -> torch.Tensor:
    """A (1, H, W) picture as to_mnist would place it: the ink's box scaled to fit 20x20, centre of mass centred."""
    rows, cols = torch.nonzero(field[0] > 0.5, as_tuple=True)
    if len(rows) == 0:
        return torch.zeros(1, SIZE, SIZE)
    ink = field[:, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    scale = FIT / max(ink.shape[1:])
    size = (max(1, round(ink.shape[1] * scale)), max(1, round(ink.shape[2] * scale)))
    small = F.interpolate(ink[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    small = (small / small.max().clamp_min(1e-6)).clamp(0, 1)
    out = torch.zeros(1, SIZE, SIZE)
    top, left = (SIZE - size[0]) // 2, (SIZE - size[1]) // 2
    out[:, top : top + size[0], left : left + size[1]] = small
    return centre_of_mass(out[None])[0]


def centre_of_mass(x: torch.Tensor) -> torch.Tensor:
    """Shift each field of (N, 1, 28, 28) by whole pixels so its centre of mass is at the centre."""
    n = x.shape[0]
    mass = x.sum((1, 2, 3)).clamp_min(1e-6)
    axis = torch.arange(SIZE, dtype=x.dtype)
    com_y = (x.sum((1, 3)) * axis).sum(1) / mass
    com_x = (x.sum((1, 2)) * axis).sum(1) / mass
    shift = torch.stack([(SIZE - 1) / 2 - com_x, (SIZE - 1) / 2 - com_y], 1).round()
    theta = affine_theta(torch.zeros(n), shift, SIZE)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def one(kind: str, rng: np.random.Generator, digits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One non-digit (1, 28, 28) of `kind`; digits (N, 1, 28, 28) in [0, 1] with their labels feed the
    digit-made kinds."""
    radius = float(rng.uniform(1.0, 2.0))  # strokes 2-4 px wide, as MNIST's
    pick = lambda: int(rng.integers(len(digits)))  # noqa: E731
    if kind == "strokes":
        return draw([_curve(rng) for _ in range(int(rng.integers(2, 6)))], radius)
    if kind == "joined":
        return draw(_joined(rng), radius)
    if kind == "symmetric":
        return draw(_symmetric(rng), radius)
    if kind == "lines":  # straight strokes only, apart or crossing
        return draw([_curve(rng, kind=0) for _ in range(int(rng.integers(2, 5)))], radius)
    if kind == "arc":
        return draw([_arc(rng)], radius)
    if kind == "scribble":
        return draw([_scribble(rng)], radius)
    if kind == "outline":
        return draw([_outline(rng)], radius)
    if kind == "chimera":
        # Not a 1: joined to most digits' other part, a 1's part is a stroke that digit also has.
        a = next(j for j in iter(pick, None) if labels[j] != 1)
        b = next(j for j in iter(pick, None) if labels[j] not in (1, labels[a]))
        cut = int(rng.integers(10, 19))
        joined = digits[a].clone()
        if rng.random() < 0.5:
            joined[:, cut:] = digits[b][:, cut:]
        else:
            joined[:, :, cut:] = digits[b][:, :, cut:]
        return fit_and_centre(joined)
    if kind == "crossed":  # not a 0, 1 or 7: writers cross or flag those
        extra = draw([_curve(rng) for _ in range(int(rng.integers(1, 3)))], radius)
        base = next(j for j in iter(pick, None) if labels[j] not in (0, 1, 7))
        return fit_and_centre(torch.maximum(digits[base], extra))
    if kind == "pair":
        return fit_and_centre(_pair(rng, digits[pick()], digits[pick()]))
    if kind == "turned":  # a digit or a pair on its side
        # Not 0 or 8 (turned, still a 0 or an 8; a pair of them an 8), nor a lone 1 (a slanted 1 turned is one).
        other = lambda *no: digits[next(j for j in iter(pick, None) if labels[j] not in no)]  # noqa: E731
        field = other(0, 1, 8) if rng.random() < 0.7 else _pair(rng, other(0, 8), other(0, 8))
        return fit_and_centre(torch.rot90(field, 1 if rng.random() < 0.5 else -1, dims=(1, 2)))
    if kind == "mirrored":
        j = next(j for j in iter(pick, None) if int(labels[j]) in MIRRORED)
        return centre_of_mass(digits[j].flip(-1)[None])[0]
    if kind == "blob":
        return fit_and_centre(_solid(rng))
    field = torch.from_numpy(rng.random((1, SIZE, SIZE), dtype=np.float32))
    return field * (torch.from_numpy(rng.random((1, SIZE, SIZE))) < rng.uniform(0.2, 1.0)).float()


def generate(count: int, rng: np.random.Generator, digits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`count` non-digits (count, 1, 28, 28) in [0, 1], kinds drawn by their shares."""
    names = list(KINDS)
    kinds = rng.choice(len(names), size=count, p=np.array(list(KINDS.values())) / sum(KINDS.values()))
    return torch.stack([one(names[k], rng, digits, labels) for k in kinds])
