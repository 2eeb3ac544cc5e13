"""Picture preparation (src/mnist_cnn/core/picture.py): any picture of one digit becomes an MNIST field,
light ink on black, fitted into 20x20 and centred by centre of mass, thin strokes widened; a uniform
picture has no ink; a file that is not a picture is one clear error."""

from __future__ import annotations

import io
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps
from scipy import ndimage

from mnist_cnn.cli import UserError
from mnist_cnn.core import picture
from mnist_cnn.core.picture import NoInk, read_image, to_mnist

CENTRE = 13.5  # centre of a 28x28 field in pixel-index coordinates


def draw_zero(size: tuple[int, int] = (300, 200), box: tuple[int, int, int, int] = (30, 20, 110, 170)) -> Image.Image:
    """A large dark '0' drawn with line segments, far off-centre on white paper."""
    image = Image.new("L", size, 255)
    x0, y0, x1, y1 = box
    t = np.linspace(0, 2 * np.pi, 60)
    points = [((x0 + x1) / 2 + (x1 - x0) / 2 * np.cos(a), (y0 + y1) / 2 + (y1 - y0) / 2 * np.sin(a)) for a in t]
    ImageDraw.Draw(image).line(points, fill=0, width=12, joint="curve")
    return image


def draw_seven(size: tuple[int, int] = (400, 300)) -> Image.Image:
    image = Image.new("L", size, 230)  # greyish paper, grey pencil
    ImageDraw.Draw(image).line([(250, 40), (370, 40), (290, 280)], fill=90, width=9, joint="curve")
    return image


def ink_box(field: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(field)
    return rows.min(), rows.max(), cols.min(), cols.max()


def test_dark_on_light_off_centre_digit_becomes_mnist_like() -> None:
    field = to_mnist(draw_zero())
    assert field.shape == (28, 28)
    assert field.dtype == np.uint8
    assert field[0].max() == field[-1].max() == field[:, 0].max() == field[:, -1].max() == 0  # dark background
    assert field.max() == 255  # bright ink
    top, bottom, left, right = ink_box(field)
    assert min(top, left) >= 4 and max(bottom, right) <= 23  # within the central 20x20
    assert bottom - top + 1 in (19, 20, 21)  # the taller side fills the 20 px box
    com_y, com_x = ndimage.center_of_mass(field.astype(np.float64))
    assert abs(com_y - CENTRE) <= 1 and abs(com_x - CENTRE) <= 1
    assert field[14, 14] == 0  # the hole of the zero survives


def test_asymmetric_digit_on_grey_paper_is_centred_by_mass_and_full_strength() -> None:
    field = to_mnist(draw_seven())
    top, bottom, left, right = ink_box(field)
    assert max(bottom - top, right - left) + 1 in (19, 20, 21)
    com_y, com_x = ndimage.center_of_mass(field.astype(np.float64))
    assert abs(com_y - CENTRE) <= 1 and abs(com_x - CENTRE) <= 1
    assert field.max() == 255  # faint pencil on grey paper is stretched to MNIST's contrast
    assert field[0].max() == 0


@pytest.mark.parametrize("pen", [2, 6])
def test_thin_pen_on_a_large_picture_keeps_an_mnist_stroke(pen: int) -> None:
    picture = Image.new("L", (800, 600), 255)
    ImageDraw.Draw(picture).line([(300, 50), (600, 50), (400, 550)], fill=0, width=pen)
    field = to_mnist(picture)
    # Scaled down 25x, the pen would be a faint trace of ~15 bright pixels; MNIST's 7s have 55-135.
    assert (field > 127).sum() >= 50
    stroke = 2 * np.percentile(ndimage.distance_transform_edt(field > 127)[field > 127], 95)
    assert stroke >= 2


def test_light_on_dark_is_not_inverted() -> None:
    dark_on_light = draw_zero()
    light_on_dark = ImageOps.invert(dark_on_light)
    field = to_mnist(light_on_dark)
    assert field[0].max() == 0 and field.max() == 255
    np.testing.assert_array_equal(field, to_mnist(dark_on_light))  # same picture whichever the polarity


@pytest.mark.parametrize("fill", [255, 0, 128])
def test_uniform_image_has_no_ink(fill: int) -> None:
    with pytest.raises(UserError, match="no ink"):
        to_mnist(Image.new("L", (120, 80), fill), "blank.png")


def test_faint_noise_is_not_ink() -> None:
    noise = np.random.default_rng(0).integers(240, 256, size=(64, 64), dtype=np.uint8)
    with pytest.raises(UserError, match=r"noise\.png: no ink"):
        to_mnist(Image.fromarray(noise), "noise.png")


def test_transparent_png_is_read_as_ink_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (200, 200), (0, 0, 0, 0))  # transparent black: would read as all-black
    ImageDraw.Draw(rgba).line([(100, 20), (100, 180)], fill=(0, 0, 0, 255), width=14)
    rgba.save(tmp_path / "one.png")
    field = to_mnist(read_image(str(tmp_path / "one.png")))
    assert field.max() == 255 and field[0].max() == 0
    top, bottom, left, right = ink_box(field)
    assert bottom - top + 1 >= 19 and right - left + 1 <= 6  # a tall thin stroke


def test_no_ink_is_its_own_error() -> None:
    """predict answers a blank picture as refused rather than stopping: it tells NoInk from other errors."""
    with pytest.raises(NoInk):
        to_mnist(Image.new("L", (30, 30), 200))


@pytest.mark.parametrize("content", [b"hello", b"\x89PNG\r\n\x1a\n" + bytes(20)], ids=["text", "cut-png"])
def test_a_file_that_is_not_a_picture_is_one_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "notes.png"
    path.write_bytes(content)
    with pytest.raises(UserError, match=rf"^{path}: cannot read as an image \("):
        read_image(str(path))


def test_a_missing_file_or_a_directory_is_one_error(tmp_path: Path) -> None:
    for name in (str(tmp_path / "missing.jpg"), str(tmp_path)):
        with pytest.raises(UserError, match=r": cannot read as an image \("):
            read_image(name)


def test_a_picture_over_the_pixel_cap_is_one_error_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Image.new("L", (100, 100), 255).save(tmp_path / "big.png")
    monkeypatch.setattr(picture, "MAX_PIXELS", 1000)
    with pytest.raises(UserError, match=r"big\.png: .*100x100.*1,000"):
        read_image(str(tmp_path / "big.png"))


def test_stdin_is_read_like_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    draw_seven().save(tmp_path / "seven.png")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO((tmp_path / "seven.png").read_bytes())))
    np.testing.assert_array_equal(np.asarray(read_image("-")), np.asarray(read_image(str(tmp_path / "seven.png"))))


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    """A phone photo is stored sideways with an EXIF orientation: it is read the way it is shown."""
    picture = draw_seven()
    exif = Image.Exif()
    exif[0x0112] = 3  # orientation: rotated 180 degrees
    picture.rotate(180).save(tmp_path / "photo.jpg", exif=exif, quality=95)
    read = read_image(str(tmp_path / "photo.jpg"))
    assert read.mode == "L" and read.size == picture.size
    assert np.abs(np.asarray(read, dtype=np.int16) - np.asarray(picture, dtype=np.int16)).mean() < 3


def test_a_large_picture_under_the_cap_is_read_small_and_without_a_float_copy(tmp_path: Path) -> None:
    side = 5_000  # 25M pixels: under the cap; a float32 copy would be 100 MB
    big = Image.new("L", (side, side), 255)
    ImageDraw.Draw(big).line([(2500, 500), (2500, 4500)], fill=0, width=300)
    path = tmp_path / "big.png"
    big.save(path)
    del big
    tracemalloc.start()
    try:
        image = read_image(str(path))
        field = to_mnist(image)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert max(image.size) <= picture.MAX_SIDE
    assert peak < 40 * 2**20, peak  # numpy's arrays are traced: no full-size float copy
    rows, cols = np.nonzero(field > 127)
    assert rows.max() - rows.min() + 1 >= 19 and cols.max() - cols.min() + 1 <= 6  # still a tall thin one
