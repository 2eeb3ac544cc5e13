"""On-device augmentation (src/mnist_cnn/core/augment.py) against torchvision, on drawn MNIST-shaped digits.

Convention: augment.py promises torchvision's RandomRotation(10) then RandomAffine(0, translate=(0.1, 0.1)),
so a positive angle turns the digit counter-clockwise, like torchvision's `rotate`. torchvision's `affine`
documents the opposite direction ("clockwise"; see the "incoherence of rotation angle direction" comment in
torchvision's rotate), so one `affine` call equal to "rotate by a, then shift" is affine(angle=-a, translate).

The optional augmentations (params.yaml's augment_*), on a drawn cross: what each does to a picture, and
that all off keeps the report's random stream.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from helpers import render_digits
from mnist_cnn.core.augment import (
    Extras,
    affine_theta,
    augment,
    geometric,
    photometric,
    random_affine,
    random_blur,
    random_boxes,
    random_thickness,
)

NEAREST = InterpolationMode.NEAREST
MIN_MATCH = 0.99  # nearest-neighbour rounding at exact ties may differ in a few pixels

ANGLES = [-10.0, -7.5, -5.0, -1.3, 0.0, 2.5, 5.0, 8.8, 10.0]
SHIFTS = [(0, 0), (3, -2), (-3, 3), (1, 0), (0, -1), (-2, -3), (3, 3)]


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """32 drawn MNIST-shaped digits (shifted, noised; offline) as floats in [0, 1], shape (32, 1, 28, 28)."""
    images, _ = render_digits(32, seed=3)
    return torch.from_numpy(images).unsqueeze(1).float().div(255.0)


def ours(images: torch.Tensor, angle: float, shift: tuple[int, int]) -> torch.Tensor:
    """The batched transform exactly as random_affine applies it, with a fixed angle and shift."""
    n = len(images)
    theta = affine_theta(torch.full((n,), angle), torch.tensor([shift] * n, dtype=torch.float32), images.shape[-1])
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def match_fraction(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image: the fraction of pixels that are identical."""
    return (a == b).flatten(1).float().mean(1)


@pytest.mark.parametrize("angle", ANGLES)
def test_matches_torchvision_rotate_then_shift(digits: torch.Tensor, angle: float) -> None:
    worst = 1.0
    for dx, dy in SHIFTS:
        got = ours(digits, angle, (dx, dy))
        # One torchvision call per image, as its transforms would do (the transform is the same for all here).
        want = torch.stack(
            [
                TF.affine(
                    img, angle=-angle, translate=[dx, dy], scale=1.0, shear=[0.0, 0.0], interpolation=NEAREST, fill=0
                )
                for img in digits
            ]
        )
        fractions = match_fraction(got, want)
        worst = min(worst, fractions.min().item())
        assert fractions.min() >= MIN_MATCH, f"angle {angle}, shift {(dx, dy)}: worst image {fractions.min():.4f}"
    print(f"angle {angle:+.1f}: worst image matches torchvision in {worst:.2%} of pixels")


@pytest.mark.parametrize("angle", [-10.0, -5.0, 5.0, 10.0])
def test_rotation_matches_torchvision_rotate(digits: torch.Tensor, angle: float) -> None:
    got = ours(digits, angle, (0, 0))
    want = torch.stack([TF.rotate(img, angle, interpolation=NEAREST, fill=0) for img in digits])
    assert match_fraction(got, want).min() >= MIN_MATCH


@pytest.mark.parametrize("angle", [-10.0, 10.0])
def test_rotation_is_not_mirrored(digits: torch.Tensor, angle: float) -> None:
    # Guards the comparison itself: the opposite direction visibly disagrees.
    got = ours(digits, angle, (0, 0))
    wrong = torch.stack([TF.rotate(img, -angle, interpolation=NEAREST, fill=0) for img in digits])
    assert match_fraction(got, wrong).mean() < 0.95


def test_direction_on_a_single_pixel() -> None:
    image = torch.zeros(1, 1, 28, 28)
    image[0, 0, 14, 24] = 1.0  # right of the centre (the centre is at 13.5, 13.5)
    # +90 degrees is counter-clockwise on screen: right of centre goes to above the centre.
    assert (ours(image, 90.0, (0, 0))[0, 0] > 0).nonzero().tolist() == [[3, 14]]
    # A shift of (dx, dy) = (3, -2) moves content 3 px right and 2 px up.
    assert (ours(image, 0.0, (3, -2))[0, 0] > 0).nonzero().tolist() == [[12, 27]]
    assert (ours(image, 0.0, (-3, 3))[0, 0] > 0).nonzero().tolist() == [[17, 21]]


def test_zero_angle_integer_shift_is_exact(digits: torch.Tensor) -> None:
    for dx, dy in SHIFTS:
        got = ours(digits, 0.0, (dx, dy))
        want = torch.zeros_like(digits)
        src = digits[..., max(0, -dy) : 28 - max(0, dy), max(0, -dx) : 28 - max(0, dx)]
        want[..., max(0, dy) : 28 - max(0, -dy), max(0, dx) : 28 - max(0, -dx)] = src
        assert torch.equal(got, want), (dx, dy)


# --- random_affine ----------------------------------------------------------------


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_affine_shape_dtype_and_values(digits: torch.Tensor, dtype: torch.dtype) -> None:
    images = digits.to(dtype)
    out = random_affine(images, generator(0))
    assert out.shape == images.shape
    assert out.dtype == dtype
    assert out.device == images.device
    # Nearest sampling with zero fill only moves pixels: no new values appear.
    allowed = torch.cat([images.unique(), torch.zeros(1, dtype=dtype)])
    assert torch.isin(out.unique(), allowed).all()
    assert not torch.equal(out, images)


def test_random_affine_leaves_the_input_alone(digits: torch.Tensor) -> None:
    before = digits.clone()
    random_affine(digits, generator(1))
    assert torch.equal(digits, before)


def test_random_affine_same_seed_same_output(digits: torch.Tensor) -> None:
    assert torch.equal(random_affine(digits, generator(7)), random_affine(digits, generator(7)))
    assert not torch.equal(random_affine(digits, generator(7)), random_affine(digits, generator(8)))


def test_random_affine_generator_advances(digits: torch.Tensor) -> None:
    g = generator(3)
    first, second = random_affine(digits, g), random_affine(digits, g)
    assert not torch.equal(first, second)  # each batch gets fresh transforms


def test_random_affine_each_image_gets_its_own_transform(digits: torch.Tensor) -> None:
    one_digit = digits[:1].repeat(32, 1, 1, 1)
    out = random_affine(one_digit, generator(0))
    distinct = {tuple(img.flatten().tolist()) for img in out}
    assert len(distinct) >= 28  # 32 copies of one digit, (almost) all transformed differently


def test_random_affine_zero_range_is_identity(digits: torch.Tensor) -> None:
    out = random_affine(digits, generator(0), max_degrees=0.0, max_translate=0.0)
    assert torch.equal(out, digits)


def test_random_affine_shifts_are_whole_pixels_within_10_percent(digits: torch.Tensor) -> None:
    # Without rotation every output must be one of the 7 x 7 integer shifts of |dx|, |dy| <= round(2.8) = 3.
    images = digits
    out = random_affine(images, generator(5), max_degrees=0.0)
    candidates = {shift: ours(images, 0.0, shift) for shift in [(x, y) for x in range(-3, 4) for y in range(-3, 4)]}
    seen = set()
    for i in range(len(images)):
        matches = [shift for shift, shifted in candidates.items() if torch.equal(out[i], shifted[i])]
        assert matches, f"image {i} is not a whole-pixel shift within 3 px"
        seen.add(matches[0])
    assert len(seen) >= 10  # the shifts really vary


def test_random_affine_angles_stay_within_10_degrees(digits: torch.Tensor) -> None:
    # With the shift off, each output is our rotation by some angle in [-10, 10] (searched in 0.05 degree steps).
    images = digits[:8]
    out = random_affine(images, generator(11), max_translate=0.0)
    inside = torch.stack([match_fraction(ours(images, a / 20, (0, 0)), out) for a in range(-200, 201)])
    assert inside.max(0).values.min() >= 0.99, inside.max(0).values
    outside = torch.stack([match_fraction(ours(images, a, (0, 0)), out) for a in (-25.0, 25.0)])
    assert outside.max() < 0.99


# --- the optional augmentations ----------------------------------------------------


def strokes() -> torch.Tensor:
    """Eight 28x28 pictures of a 2 px wide cross, floats in [0, 1], shape (8, 1, 28, 28)."""
    images = torch.zeros(8, 1, 28, 28)
    images[:, :, 13:15, 6:22] = 1.0
    images[:, :, 6:22, 13:15] = 1.0
    return images


def test_thickness_moves_each_image_between_its_erosion_and_dilation() -> None:
    images = strokes()
    out = random_thickness(images, generator(0), 1.0)
    ink, new_ink = images.sum((1, 2, 3)), out.sum((1, 2, 3))
    assert (new_ink > ink).any() and (new_ink < ink).any()  # some bolder, some finer
    dilated = torch.nn.functional.max_pool2d(images, 3, stride=1, padding=1)
    assert (out <= dilated + 1e-6).all() and (out >= 0).all()
    assert torch.equal(random_thickness(images, generator(0), 0.0), images)


def test_scale_shrinks_and_enlarges_about_the_centre() -> None:
    images = strokes()
    out = random_affine(images, generator(1), max_degrees=0.0, max_translate=0.0, max_scale=0.5)
    ratio = out.sum((1, 2, 3)) / images.sum((1, 2, 3))  # ink area grows or shrinks with the scale
    assert ratio.min() < 0.9 and ratio.max() > 1.1
    assert ((ratio > 0.2) & (ratio < 2.5)).all()
    unscaled = random_affine(images, generator(1), max_degrees=0.0, max_translate=0.0)
    assert torch.equal(unscaled, images)


def test_all_extras_off_is_the_reports_augmentation_draw_for_draw() -> None:
    images = strokes()
    assert torch.equal(augment(images, generator(3), Extras()), random_affine(images, generator(3)))
    with_scale = augment(images, generator(3), Extras(scale=0.2, thickness=0.5))
    assert not torch.equal(with_scale, random_affine(images, generator(3)))


def test_augment_is_the_photometric_pieces_on_the_geometric_view_draw_for_draw() -> None:
    images, every = strokes(), Extras(scale=0.2, thickness=0.5, blur=1.0, invert=0.5, erase=0.5, noise=0.2)
    g = generator(6)
    assert torch.equal(augment(images, generator(6), every), photometric(geometric(images, g, every), g, every))
    view = geometric(images, generator(6), every)
    assert torch.equal(photometric(view, generator(7), Extras(scale=0.2)), view)  # no look piece: unchanged


def test_blur_spreads_ink_and_keeps_its_sum() -> None:
    images = strokes()
    out = random_blur(images, generator(0), 2.0)
    assert torch.allclose(out.sum((1, 2, 3)), images.sum((1, 2, 3)), rtol=1e-4)  # the cross is far from the edges
    peak = out.amax((1, 2, 3))
    assert (peak <= 1).all() and peak.min() < 0.8  # a 2 px stroke loses its peak under a wide blur
    assert out[:, :, :2].sum() == 0  # radius 4 from the cross's first row (6): rows 0 and 1 stay black
    spread = (out > 1e-3).sum((1, 2, 3))
    assert len(set(spread.tolist())) > 1  # each image its own sigma
    nearly_none = random_blur(images, generator(0), 0.001)
    assert torch.allclose(nearly_none, images, atol=1e-6)


def test_boxes_are_one_rectangle_of_2_to_33_percent_or_none() -> None:
    images = torch.zeros(400, 1, 28, 28)
    boxes = random_boxes(images, generator(1), 0.5)[:, 0]
    area = boxes.sum((1, 2)).float() / (28 * 28)
    chosen = area > 0
    assert 0.4 < chosen.float().mean() < 0.6
    assert area[chosen].min() >= 0.015 and area[chosen].max() <= 0.34
    rows, cols = boxes.any(2), boxes.any(1)  # a rectangle is the product of its rows and columns
    assert torch.equal(boxes, rows[:, :, None] & cols[:, None, :])
    assert not random_boxes(images, generator(1), 0.0).any()


def test_invert_and_erase_change_one_rectangle_each() -> None:
    images = strokes()
    inverted = augment(images, generator(2), Extras(invert=1.0))
    plain = random_affine(images, generator(2))
    changed = inverted != plain
    assert changed.any((1, 2, 3)).all()
    assert torch.allclose(inverted[changed], 1 - plain[changed])
    erased = augment(images, generator(4), Extras(erase=1.0))
    for image, reference in zip(erased, random_affine(images, generator(4)), strict=True):
        # The flat grey is one value per picture; where it equals the picture's own pixel nothing shows.
        values = image[image != reference].unique()
        assert values.numel() <= 1


def test_noise_is_bounded_and_varies_per_image() -> None:
    images = torch.full((64, 1, 28, 28), 0.5)
    out = augment(images, generator(5), Extras(noise=0.3))
    assert (out >= 0).all() and (out <= 1).all()
    # Away from the border, which the affine's shift fills with black, the page is 0.5 plus noise.
    std = (out - 0.5)[:, :, 4:-4, 4:-4].std((1, 2, 3))
    assert std.max() < 0.3 * 1.1 and std.max() > 0.15 and std.min() < 0.1
