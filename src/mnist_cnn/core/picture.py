"""Picture preparation: any picture of one digit -> the 28x28 field MNIST's digits are: greyscale,
light ink on black, cropped to the ink, thin strokes widened, scaled to fit 20x20 (aspect kept),
placed with its centre of mass at the centre. predict, the served model's callers, the
out-of-distribution set and the generated non-digits all go through it.
"""

from __future__ import annotations

import io
import math
import sys

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import ndimage

from mnist_cnn.cli import UserError

FIT = 20  # MNIST: the digit's bounding box fits 20x20 ...
SIZE = 28  # ... inside a 28x28 field, centred by centre of mass
MIN_CONTRAST = 32  # ink must differ from the background by this many grey levels
MIN_STROKE = 2.5  # px at the 20 px scale; most MNIST strokes are 2.5-4 px wide


class NoInk(UserError):
    """A nearly uniform picture: predict refuses it as blank, other callers may treat it as an error."""


def read_image(name: str) -> Image.Image:
    """Open a file, or stdin for `-`, as 8-bit greyscale (transparency composited onto white)."""
    try:
        source = io.BytesIO(sys.stdin.buffer.read()) if name == "-" else name
        with Image.open(source) as opened:
            image = ImageOps.exif_transpose(opened)
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                rgba = image.convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
            return image.convert("L")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError) as error:
        raise UserError(f"{name}: cannot read as an image ({error})") from None


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
