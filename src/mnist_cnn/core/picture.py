"""Picture preparation: any picture of one digit -> the 28x28 field MNIST's digits are: greyscale,
light ink on black, cropped to the ink, thin strokes widened, scaled to fit 20x20 (aspect kept),
placed with its centre of mass at the centre. predict, the served model's callers, the
out-of-distribution set and the generated non-digits all go through it.
"""

from __future__ import annotations

import io
import math
import sys
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import ndimage

from mnist_cnn.cli import UserError

FIT = 20  # MNIST: the digit's bounding box fits 20x20 ...
SIZE = 28  # ... inside a 28x28 field, centred by centre of mass
MIN_CONTRAST = 32  # ink must differ from the background by this many grey levels
MIN_STROKE = 2.5  # px at the 20 px scale; most MNIST strokes are 2.5-4 px wide
# A picture of more pixels is refused before it is decoded: well under Pillow's own limits (it warns
# past 89M pixels and refuses past 179M), and at most 160 MB decoded (RGBA). docs/serving.md.
MAX_PIXELS = 40_000_000
# A larger picture is downscaled (JPEG while decoding, others by box averaging) before any array is
# made of it: the digit ends up 20 px tall, so more detail is never used, and memory stays bounded.
MAX_SIDE = 1024


class NoInk(UserError):
    """A nearly uniform picture: predict refuses it as blank, other callers may treat it as an error."""


def read_image(name: str) -> Image.Image:
    """Open a file, or stdin for `-`, as 8-bit greyscale (transparency composited onto white), at most
    MAX_SIDE px a side. A picture of more than MAX_PIXELS pixels, an empty stdin and anything Pillow
    cannot read are one UserError; Pillow's warnings (a bomb, odd metadata) never reach the user."""
    if name == "-":
        data = sys.stdin.buffer.read()
        if not data:
            raise UserError("-: stdin is empty (pipe a PNG or JPEG into it)")
        source: str | io.BytesIO = io.BytesIO(data)
    else:
        source = name
    pillow_limit = Image.MAX_IMAGE_PIXELS
    try:
        # Pillow's own bomb check (a warning, or an error that does not say the size) is replaced by
        # the lower cap below, which names the size; Image.open reads only the header.
        Image.MAX_IMAGE_PIXELS = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # odd metadata and the like: nothing a user can act on
            with Image.open(source) as opened:
                width, height = opened.size
                if width * height > MAX_PIXELS:
                    raise UserError(
                        f"{name}: {width}x{height} is {width * height:,} pixels, more than the "
                        f"{MAX_PIXELS:,} this tool reads: scale the picture down first"
                    )
                return _small_grey(opened)
    except UnidentifiedImageError:
        raise UserError(f"{name}: cannot read as an image (not a PNG, JPEG or other picture format)") from None
    except (OSError, Image.DecompressionBombError, ValueError, SyntaxError, EOFError) as error:
        raise UserError(f"{name}: cannot read as an image ({str(error).splitlines()[0]})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit


def _small_grey(opened: Image.Image) -> Image.Image:
    """An opened picture, upright, greyscale on white, downscaled early to at most MAX_SIDE a side:
    the decoded picture and one byte per pixel besides it, never a float array of its full size."""
    if opened.format == "JPEG":
        opened.draft("L", (MAX_SIDE, MAX_SIDE))  # the decoder itself scales by 1/2, 1/4 or 1/8
    image = ImageOps.exif_transpose(opened)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    grey = image.convert("L")
    factor = math.ceil(max(grey.size) / MAX_SIDE)
    return grey.reduce(factor) if factor > 1 else grey  # box average: a thin pen line turns faint, not lost


def crop_to_ink(pixels: np.ndarray) -> np.ndarray:
    """The bounding box of the pixels brighter than half the ink's strength."""
    rows, cols = np.nonzero(pixels > 127.5)
    return pixels[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


def thicken(ink: np.ndarray) -> np.ndarray:
    """Widen strokes that would be thinner than MIN_STROKE once the digit is scaled to FIT px (a pen line
    on a large photo shrinks to a faint sub-pixel trace); a stroke is twice the ink's distance to the paper."""
    mask = ink > 127.5
    stroke = 2 * float(np.percentile(ndimage.distance_transform_edt(mask)[mask], 95))
    # Growing by r on each side makes the scaled stroke (stroke + 2r) * FIT / (side + 2r): solve for MIN_STROKE.
    grow = (MIN_STROKE * max(ink.shape) / FIT - stroke) / (2 * (1 - MIN_STROKE / FIT))
    if grow < 0.5:
        return ink
    pad = math.ceil(grow) + 1
    distance = ndimage.distance_transform_edt(~np.pad(mask, pad))
    grown = np.maximum(np.pad(ink, pad), np.clip(grow + 0.5 - distance, 0.0, 1.0) * 255.0)
    return crop_to_ink(grown)


def to_mnist(image: Image.Image, name: str = "image") -> np.ndarray:
    """A greyscale picture of one digit -> uint8 (28, 28), light ink on black, as MNIST's."""
    pixels = np.asarray(image, dtype=np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = float(np.median(border))
    if background > 127.5:  # light paper: make the ink the bright part
        pixels, background = 255.0 - pixels, 255.0 - background
    peak = float(pixels.max())
    if peak - background < MIN_CONTRAST:
        raise NoInk(f"{name}: no ink found (the picture is nearly uniform)")
    # Background -> 0, the darkest ink -> 255: greyish paper and faint pencil become MNIST-like.
    pixels = np.clip((pixels - background) / (peak - background), 0.0, 1.0) * 255.0
    ink = thicken(crop_to_ink(pixels))

    height, width = ink.shape
    scale = FIT / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = np.asarray(Image.fromarray(ink.astype(np.uint8)).resize(size, Image.Resampling.LANCZOS), dtype=np.float32)
    small = np.clip(small * (255.0 / small.max()), 0.0, 255.0)  # full-strength ink, as MNIST's

    # Place the centre of mass on the field's centre, keeping the digit inside the field.
    com_y, com_x = ndimage.center_of_mass(small)
    centre = (SIZE - 1) / 2
    top = int(np.clip(round(centre - com_y), 0, SIZE - small.shape[0]))
    left = int(np.clip(round(centre - com_x), 0, SIZE - small.shape[1]))
    field = np.zeros((SIZE, SIZE), dtype=np.uint8)
    field[top : top + small.shape[0], left : left + small.shape[1]] = np.rint(small)
    return field
