"""MNIST-C's photometric corruptions (Mu & Gilmer 2019): the eleven that change how the digit looks, not
where it is (config.AFFINE_CORRUPTIONS, in corruptions.py, are the others), at the published severities,
in torch for whole batches. Where the paper draws a random number per image, so do these.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from skimage.feature import canny

SIZE = 28  # MNIST's fields


# ---------------------------------------------------------------- helpers


def gaussian_blur(x: torch.Tensor, sigma: float, axes: tuple[int, ...] = (1, 2)) -> torch.Tensor:
    """skimage.filters.gaussian on (N, 28, 28) floats along `axes` (1: down the columns, 2: along
    the rows): truncate 4 sigma, 'nearest' edges, one axis after the other."""
    radius = int(4.0 * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    y = x.unsqueeze(1)
    if 2 in axes:
        y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    if 1 in axes:
        y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))
    return y.squeeze(1)


def line_masks(c0: torch.Tensor, r0: torch.Tensor, c1: torch.Tensor, r1: torch.Tensor) -> torch.Tensor:
    """MNIST-C's anti-aliased line from (c0, r0) to (c1, r1), one per row of the (N,) inputs: intensity
    log(1 - d/2.3) + 1 at vertical distance d, clipped to [0, 1], between columns floor(c0) and ceil(c1);
    a vertical segment (c0 == c1) draws nothing."""
    device = c0.device
    cols = torch.arange(SIZE, dtype=torch.float64, device=device).view(1, 1, SIZE)
    rows = torch.arange(SIZE, dtype=torch.float64, device=device).view(1, SIZE, 1)
    c0, r0, c1, r1 = (v.view(-1, 1, 1) for v in (c0, r0, c1, r1))
    vertical = c1 == c0
    slope = (r1 - r0) / torch.where(vertical, torch.ones_like(c1), c1 - c0)
    dist = (rows - (slope * (cols - c0) + r0)).abs().clamp(0, 2.3 - 1e-10)
    mask = (torch.log(1 - dist / 2.3) + 1).clamp(0, 1)
    inside = (cols >= torch.floor(c0)) & (cols < torch.ceil(c1)) & ~vertical
    return (mask * inside).to(torch.float32)


# ---------------------------------------------------------------- corruptions
# Each takes floats (N, 28, 28) in [0, 1] and a CPU generator; the paper's severity in brackets.


def shot_noise(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    c = 3.0  # [severity 5] photon count at full intensity
    return torch.poisson((x * c).cpu(), generator=g).to(x.device) / c


def impulse_noise(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    amount = 0.17  # [4] fraction of pixels replaced, half by 0 (pepper), half by 1 (salt)
    hit = torch.rand(x.shape, generator=g).to(x.device) < amount
    salt = (torch.rand(x.shape, generator=g) < 0.5).to(x.device)
    return torch.where(hit, salt.to(x.dtype), x)


def glass_blur(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    sigma, delta, iterations = 0.7, 1, 2  # [1]
    # The paper's gaussian(..., multichannel=True) reads a 2-D image's last axis as channels, so the
    # published images are blurred down the columns only (axis 1 here), before and after the swaps.
    x = torch.floor(gaussian_blur(x, sigma, axes=(1,)) * 255)  # truncated to uint8 between the steps
    n = x.shape[0]
    x = x.reshape(n, SIZE * SIZE)
    positions = [h * SIZE + w for h in range(SIZE - delta, delta, -1) for w in range(SIZE - delta, delta, -1)]
    # Swap each pixel, with probability 1/2, with a neighbour up to `delta` up/left. The swaps
    # run in the paper's order (they chain), but each one acts on the whole batch at once.
    steps = iterations * len(positions)
    swap = (torch.rand(steps, n, 1, generator=g) < 0.5).to(x.device)
    offsets = torch.randint(-delta, delta, (steps, n, 2), generator=g)
    neighbours = torch.tensor(positions * iterations).view(-1, 1) + offsets[..., 1] * SIZE + offsets[..., 0]
    neighbours = neighbours.to(x.device)
    for step, pos in enumerate(positions * iterations):
        nb = neighbours[step].unsqueeze(1)
        a, b = x[:, pos : pos + 1].clone(), x.gather(1, nb)
        x.scatter_(1, nb, torch.where(swap[step], a, b))
        x[:, pos : pos + 1] = torch.where(swap[step], b, a)
    return gaussian_blur(x.view(n, SIZE, SIZE) / 255, sigma, axes=(1,))


def motion_blur(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    # [1] ImageMagick's MotionBlurImage(radius 10, sigma 3, angle ~ U(-45, 45)): a one-sided
    # kernel of 2 * radius + 1 taps, Gaussian weights exp(-i^2 / 2 sigma^2), along the angle;
    # pixels at integer offsets round(i cos a), round(i sin a), i = 0..2 radius, each image its own a.
    radius, sigma = 10, 3.0
    n = x.shape[0]
    angle = (torch.rand(n, generator=g, dtype=torch.float64) * 90 - 45) * (math.pi / 180)
    i = torch.arange(2 * radius + 1, dtype=torch.float64)
    weight = torch.exp(-(i**2) / (2 * sigma**2))
    weight = (weight / weight.sum()).to(x.device)
    ox = torch.ceil(i * torch.cos(angle).view(-1, 1) - 0.5).long().to(x.device)  # (N, taps)
    oy = torch.ceil(i * torch.sin(angle).view(-1, 1) - 0.5).long().to(x.device)
    pad = 2 * radius
    padded = F.pad(x, (pad, pad, pad, pad))
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    grid = torch.arange(SIZE, device=x.device)
    out = torch.zeros_like(x)
    for tap in range(len(i)):  # each image reads its own offset pixel for this tap
        rows = (grid + pad).view(1, SIZE, 1) + oy[:, tap].view(n, 1, 1)
        cols = (grid + pad).view(1, 1, SIZE) + ox[:, tap].view(n, 1, 1)
        out += weight[tap].to(x.dtype) * padded[batch, rows, cols]
    return out


def brightness(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    # [5] +0.5 on HSV's value. A grey pixel has saturation 0 and value = its grey level, and
    # skimage's rgb2gray weights sum to 1, so gray -> HSV -> V + 0.5 -> gray is exactly this.
    return x + 0.5


def stripe(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    x = x.clone()
    x[:, :, :7] = 1 - x[:, :, :7]  # invert the left and right quarters
    x[:, :, 21:] = 1 - x[:, :, 21:]
    return x


def plasma_fractal(n: int, g: torch.Generator, device: torch.device, decay: float) -> torch.Tensor:
    """Diamond-square height maps (N, 256, 256) in [0, 1], as MNIST-C's fog draws them."""
    size = 256
    m = torch.zeros(n, size, size, dtype=torch.float32, device=device)
    step, wibble = size, 100.0

    def wibbled(a: torch.Tensor) -> torch.Tensor:
        noise = (torch.rand(a.shape, generator=g) * 2 - 1).to(device) * wibble
        return a / 4 + wibble * noise

    while step >= 2:
        half = step // 2
        corners = m[:, 0:size:step, 0:size:step]
        squares = corners + torch.roll(corners, -1, 1)
        squares = squares + torch.roll(squares, -1, 2)
        m[:, half:size:step, half:size:step] = wibbled(squares)
        centres = m[:, half:size:step, half:size:step]
        corners = m[:, 0:size:step, 0:size:step]
        across = centres + torch.roll(centres, 1, 1) + corners + torch.roll(corners, -1, 2)
        m[:, 0:size:step, half:size:step] = wibbled(across)
        down = centres + torch.roll(centres, 1, 2) + corners + torch.roll(corners, -1, 1)
        m[:, half:size:step, 0:size:step] = wibbled(down)
        step //= 2
        wibble /= decay
    m = m - m.amin(dim=(1, 2), keepdim=True)
    return m / m.amax(dim=(1, 2), keepdim=True)


FOG_MAPS = 100


def fog(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    strength, decay = 3.0, 1.4  # [5]
    top = x.amax(dim=(1, 2), keepdim=True)
    # A 256x256 map (of which the paper uses a 28x28 corner) costs 65k random numbers: images
    # share a pool of FOG_MAPS maps (per chunk), image i the map i % FOG_MAPS, instead of one each.
    maps = plasma_fractal(min(FOG_MAPS, len(x)), g, x.device, decay)[:, :SIZE, :SIZE]
    x = x + strength * maps[torch.arange(len(x), device=x.device) % len(maps)]
    return x * top / (top + strength)


def spatter(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    loc, scale_, sigma, threshold, mud_sigma = 0.65, 0.3, 1.0, 0.65, 1.5  # [4]
    liquid = (torch.randn(x.shape, generator=g) * scale_ + loc).to(x.device)
    liquid = gaussian_blur(liquid, sigma)
    m = gaussian_blur((liquid > threshold).to(x.dtype), mud_sigma)
    m = torch.where(m < 0.8, torch.zeros_like(m), m)
    return x * (1 - m) + (63 / 255) * m  # mud-coloured blots


def dotted_line(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    r = torch.randint(0, 27, (n, 2), generator=g).to(torch.float64).to(x.device)
    zero, end = torch.zeros(n, dtype=torch.float64, device=x.device), torch.full_like(r[:, 0], 27.0)
    line = line_masks(zero, r[:, 0], end, r[:, 1])
    dashes = (torch.arange(SIZE, device=x.device) // 2) % 2 == 1  # 2 columns off, 2 on, ...
    return x + line * dashes


def zigzag_segments(r0: float, r1: float) -> np.ndarray:
    """The paper's zigzag from column 2 to 25: (S, 4) segments (c0, r0, c1, r1). Amplitude and
    half-period are 2 pixels; it is drawn along the line to (25, r1), then rotated onto it."""
    a = b = 2.0
    c0, c1 = 2, 25
    theta = np.arctan((r1 - r0) / (c1 - c0))
    d = (c1 - c0) / np.cos(theta)
    points = [(0.0, 0.0)]
    r_i = 0.0
    for i in range(int((d - a) // (2 * a)) + 1):
        r_i = (-1) ** i * b
        points.append(((2 * i + 1) * a, r_i))
    max_c = (2 * a) * (d // (2 * a))
    if d != max_c:
        points.append((d, r_i / (2 * (d - max_c))))  # the paper's closing point, kept as it is
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    cs, rs = rot @ np.array(points).T
    cs, rs = cs + c0, rs + r0
    return np.stack([cs[:-1], rs[:-1], cs[1:], rs[1:]], axis=1)


def zigzag(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    r0 = torch.randint(0, 27, (n,), generator=g)
    r1 = r0 + torch.randint(-5, 5, (n,), generator=g)
    segments = [zigzag_segments(float(a), float(b)) for a, b in zip(r0, r1, strict=True)]
    count = max(len(s) for s in segments)
    # Pad to equal length with vertical (empty) segments; lines are >= 0, so adding them all
    # and clipping once equals the paper's clip after each segment.
    padded = np.zeros((n, count, 4))
    for k, s in enumerate(segments):
        padded[k, : len(s)] = s
    p = torch.from_numpy(padded.reshape(-1, 4)).to(x.device)
    lines = line_masks(p[:, 0], p[:, 1], p[:, 2], p[:, 3]).view(n, count, SIZE, SIZE)
    return x + lines.sum(1)


def canny_edges(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    # skimage's Canny (sigma 1) works on one 2-D image at a time: the batch is laid out as one
    # mosaic with zero gutters wider than the smoothing reaches (4 sigma), the zero padding a lone
    # image gets, and the 1-pixel rim a lone image never has edges on is cut. It differs from one
    # call per image only where ink meets the rim (there skimage's Sobel reflects the image).
    n, gap = x.shape[0], 8
    cols = math.ceil(math.sqrt(n))
    rows, cell = math.ceil(n / cols), SIZE + gap
    mosaic = np.zeros((rows * cell, cols * cell))
    images = x.cpu().numpy()
    for k in range(n):
        r, c = divmod(k, cols)
        mosaic[r * cell : r * cell + SIZE, c * cell : c * cell + SIZE] = images[k]
    edges = canny(mosaic)
    tiles = edges.reshape(rows, cell, cols, cell)[:, :SIZE, :, :SIZE].transpose(0, 2, 1, 3).reshape(-1, SIZE, SIZE)
    tiles[:, [0, -1], :] = tiles[:, :, [0, -1]] = False
    return torch.from_numpy(tiles[:n].astype(np.float32)).to(x.device)
