"""MNIST-C's photometric corruptions (src/mnist_cnn/evaluation/photometric.py), through corruptions.corrupt
as the corrupt stage runs them, against the published definitions (google-research/mnist-c, corruptions.py,
at the severities params.yaml names), on images whose answer can be worked out by hand."""

from __future__ import annotations

import torch
from scipy import ndimage

from helpers import render_digits
from mnist_cnn.evaluation import photometric
from mnist_cnn.evaluation.corruptions import corrupt


def test_brightness_adds_half_the_range_and_clips() -> None:
    grey = torch.arange(256, dtype=torch.uint8).repeat(4)[: 28 * 28].view(1, 28, 28)
    bright = corrupt("brightness", grey).int()
    dark = grey <= 127  # k/255 + 0.5 is k + 127.5 in 0-255: 127 or 128 more, as uint8 rounds the half
    assert set((bright - grey.int())[dark].unique().tolist()) <= {127, 128}
    assert (bright[~dark] == 255).all()  # clipped


def test_stripe_inverts_the_left_and_right_quarters_only() -> None:
    digits = torch.from_numpy(render_digits(64, seed=3)[0])
    striped = corrupt("stripe", digits)
    assert torch.equal(striped[:, :, :7], 255 - digits[:, :, :7])
    assert torch.equal(striped[:, :, 21:], 255 - digits[:, :, 21:])
    assert torch.equal(striped[:, :, 7:21], digits[:, :, 7:21])


def test_shot_noise_is_a_poisson_count_of_three_photons() -> None:
    # c = 3 at severity 5: clip(poisson(3x) / 3, 0, 1), so the only levels are 0, 1/3, 2/3 and 1.
    half = torch.full((200, 28, 28), 128, dtype=torch.uint8)
    noisy = corrupt("shot_noise", half)
    assert set(noisy.unique().tolist()) <= {0, 85, 170, 255}
    counts = torch.poisson(torch.full((200 * 784,), 3 * 128 / 255), generator=torch.Generator().manual_seed(1))
    expected = (counts.clamp(max=3) / 3).mean()  # the same clipped Poisson, drawn here
    assert abs(float(noisy.double().mean() / 255) - float(expected)) < 0.01


def test_impulse_noise_sets_17_percent_of_pixels_to_black_or_white_half_each() -> None:
    grey = torch.full((200, 28, 28), 100, dtype=torch.uint8)
    noisy = corrupt("impulse_noise", grey)
    assert set(noisy.unique().tolist()) == {0, 100, 255}
    assert abs(float((noisy != 100).double().mean()) - 0.17) < 0.01
    assert abs(float((noisy == 255).double().mean() - (noisy == 0).double().mean())) < 0.01


def test_glass_blur_blurs_along_the_columns_only_as_the_published_images_are() -> None:
    # skimage's gaussian(..., multichannel=True) on a 2-D image reads its last axis as channels: the
    # published glass_blur blurs each column (down the rows) only, so a vertical line is not blurred
    # sideways. Only the swaps move its ink: each pulls a pixel from up or left of it, so ink moves
    # right by at most one column per pass (two passes), while leftward swaps can chain.
    line = torch.zeros(50, 28, 28, dtype=torch.uint8)
    line[:, :, 14] = 255
    blurred = corrupt("glass_blur", line)
    assert blurred[:, :, 17:].sum() == 0  # a blur across the rows would reach column 17 and beyond
    assert blurred[:, :, 16].sum() > 0 and blurred[:, :, 13].sum() > 0  # the swaps did move ink
    x = torch.rand(4, 28, 28, generator=torch.Generator().manual_seed(0))
    reference = ndimage.gaussian_filter(x.numpy(), sigma=(0, 0.7, 0), mode="nearest", truncate=4.0)
    torch.testing.assert_close(photometric.gaussian_blur(x, 0.7, axes=(1,)), torch.from_numpy(reference))
    both = ndimage.gaussian_filter(x.numpy(), sigma=(0, 1.0, 1.0), mode="nearest", truncate=4.0)
    torch.testing.assert_close(photometric.gaussian_blur(x, 1.0), torch.from_numpy(both))
