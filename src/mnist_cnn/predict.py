"""Predict: which digit is in each picture, with the model from the registry or a checkpoint.

    python -m mnist_cnn.predict [--model URI|PATH] [--json] [--show-input DIR] IMAGE...

IMAGE is a PNG/JPEG of any size, dark ink on light paper or the reverse; `-`
reads one image from stdin. Each is turned into what MNIST looks like: greyscale,
light ink on black, cropped to the ink, scaled to fit 20x20 (aspect kept),
placed on 28x28 with its centre of mass at the centre. `--show-input` writes that
28x28 picture per file, so a surprising answer can be seen for what it was.
A picture that is not a digit (noise, a blank page, a solid shape, a letter) is
refused: `refused: <reason>`, in JSON `"digit": null` with a `reason` (see
mnist_cnn.refusal); the other pictures of the call are still answered.
--model is a registry URI (default models:/mnist-cnn@champion, from
MLFLOW_TRACKING_URI or this checkout's store) or a path to models/model.pt (whose
refusal statistics, models/refusal.pt from evaluate, are read from beside it).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import ndimage

from mnist_cnn import refusal
from mnist_cnn.config import UserError, run_stage
from mnist_cnn.data import load_tensors
from mnist_cnn.model import load_checkpoint, normalize_fields
from mnist_cnn.paths import REFUSAL_STATS

DEFAULT_MODEL = "models:/mnist-cnn@champion"
FIT = 20  # MNIST: the digit's bounding box fits 20x20 ...
SIZE = 28  # ... inside a 28x28 field, centred by centre of mass
MIN_CONTRAST = 32  # ink must differ from the background by this many grey levels
MIN_STROKE = 2.5  # px at the 20 px scale; most MNIST strokes are 2.5-4 px wide
SHOW_SCALE = 10

Predictor = Callable[[np.ndarray], refusal.Answers]  # uint8 fields (N, 28, 28) -> per-image answers


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
    """Widen strokes that would be thinner than MIN_STROKE once the digit is scaled to FIT px.

    A pen line on a large photo shrinks to a faint sub-pixel trace, unlike MNIST's
    2-4 px strokes; the stroke width is measured as twice the ink's distance to the paper.
    """
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


def registry_predictor(uri: str) -> Predictor:
    """A pyfunc model from the MLflow store that tracking.setup() would use (read-only here)."""
    import mlflow  # slow to import; only this path needs it
    from mlflow.exceptions import MlflowException

    from mnist_cnn import tracking

    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        tracking_uri = tracking.local_store()[0]
        store = tracking.store_root() / "mlruns" / "mlflow.db"
        if not store.exists():
            raise UserError(f"{uri}: no MLflow store at {store} (run `dvc repro`, or pass --model models/model.pt)")
    mlflow.set_tracking_uri(tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(uri)
    except MlflowException as error:
        raise UserError(f"{uri}: {error.message.splitlines()[0]}") from None
    except OSError as error:
        raise UserError(f"{uri}: cannot load ({error})") from None
    if takes_pixels(model.metadata.get_input_schema()):
        return lambda fields: from_served(model.predict(fields))
    # Versions registered before the served model took pixels: normalised floats (N, 1, 28, 28).
    return lambda fields: from_served(model.predict(normalize_fields(fields).numpy()))


def takes_pixels(schema: object) -> bool:
    """Whether a registered version's input signature is uint8 pixels (N, 28, 28) (mnist_cnn.served)."""
    if schema is None or not schema.is_tensor_spec():
        return False
    spec = schema.inputs[0]
    return spec.type == np.dtype(np.uint8) and tuple(spec.shape) == (-1, SIZE, SIZE)


def from_served(output: object) -> refusal.Answers:
    """The served model's records (digit, probability, reason); an older version answers a table of
    the same columns, and one logged before refusals existed (the pytorch flavour) log-probabilities:
    its answers are not checked."""
    if isinstance(output, list):
        reasons = [record["reason"] for record in output]
        digits = np.array([record["digit"] for record in output], dtype=np.int64)
        return digits, np.array([record["probability"] for record in output], dtype=np.float32), reasons
    columns = getattr(output, "columns", ())
    if "reason" in columns:
        reasons = [r if isinstance(r, str) else None for r in output["reason"]]
        return output["digit"].to_numpy(), output["probability"].to_numpy(), reasons
    probabilities, digits = torch.as_tensor(np.asarray(output, dtype=np.float32)).exp().max(dim=1)
    return digits.numpy(), probabilities.numpy(), [None] * len(digits)


def checkpoint_predictor(path: str) -> Predictor:
    """The train stage's checkpoint (weights only, no pickled code), with evaluate's refusal statistics
    from beside it; without them (a checkpoint not yet evaluated) answers are not checked."""
    net = load_checkpoint(path)
    stats_path = Path(path).parent / REFUSAL_STATS.name
    stats = load_tensors(stats_path) if stats_path.is_file() else None
    if stats is not None and refusal.is_current(stats):
        return lambda fields: refusal.answer(net, stats, normalize_fields(fields))
    problem = f"no {stats_path}" if stats is None else f"{stats_path} is from an older version"
    print(f"warning: {problem} (run evaluate): pictures that are not digits are not refused", file=sys.stderr)

    def predict(fields: np.ndarray) -> refusal.Answers:
        _, log_probs = refusal.features_and_log_probs(net, normalize_fields(fields))
        probabilities, digits = log_probs.exp().max(dim=1)
        return digits.numpy(), probabilities.numpy(), [None] * len(digits)

    return predict


def load_predictor(model: str) -> Predictor:
    """A URI (models:/, runs:/, s3://, ...) goes to MLflow; anything else is a checkpoint path."""
    scheme, separator, _ = model.partition(":/")
    is_uri = bool(separator) and len(scheme) > 1 and scheme.replace("+", "").isalnum()  # C:/ is a drive
    return registry_predictor(model) if is_uri else checkpoint_predictor(model)


def save_inputs(directory: Path, names: list[str], fields: np.ndarray) -> None:
    """Write each 28x28 input, upscaled, as <stem>.png (stdin as stdin.png; clashes get -2, -3...)."""
    directory.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    for name, field in zip(names, fields, strict=True):
        stem = "stdin" if name == "-" else Path(name).stem
        candidate, n = stem, 1
        while candidate in used:
            n += 1
            candidate = f"{stem}-{n}"
        used.add(candidate)
        picture = Image.fromarray(field).resize((SIZE * SHOW_SCALE,) * 2, Image.Resampling.NEAREST)
        picture.save(directory / f"{candidate}.png")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mnist_cnn.predict", description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="PNG/JPEG file, or - for stdin")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"registry URI or model.pt path ({DEFAULT_MODEL})")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--show-input", type=Path, metavar="DIR", help="write the 28x28 inputs the model saw")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.images.count("-") > 1:
        raise UserError("'-' (stdin) can be given only once")
    # Every picture is read before the (slow) model load: an unreadable file costs nothing. A blank
    # one is not an error but an answer (refused), and the other pictures are still read.
    fields: dict[str, np.ndarray] = {}
    answers: dict[str, tuple[int | None, float | None, str | None]] = {}
    for name in args.images:
        try:
            fields[name] = to_mnist(read_image(name), name)
        except NoInk:
            answers[name] = (None, None, refusal.BLANK)
    if args.show_input is not None:
        try:
            save_inputs(args.show_input, list(fields), np.stack(list(fields.values())) if fields else np.zeros(0))
        except OSError as error:
            raise UserError(f"--show-input {args.show_input}: cannot write ({error.strerror})") from None
    if fields:
        predictor = load_predictor(args.model)
        digits, probabilities, reasons = predictor(np.stack(list(fields.values())))
        for name, digit, probability, reason in zip(fields, digits, probabilities, reasons, strict=True):
            answers[name] = (None, None, reason) if reason else (int(digit), round(float(probability), 6), None)
    for name in args.images:
        digit, probability, reason = answers[name]
        if args.json:
            print(json.dumps({"file": name, "digit": digit, "probability": probability, "reason": reason}))
        elif reason:
            print(f"{name}: refused: {reason}")
        else:
            print(f"{name}: {digit} ({probability:.1%})")


def cli() -> None:
    """The `mnist-cnn-predict` console script: the same as `python -m mnist_cnn.predict`."""
    run_stage(main)


if __name__ == "__main__":
    cli()
