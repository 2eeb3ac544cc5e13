"""Predict: which digit is in each picture, with the model from the registry or a checkpoint.

IMAGE is a PNG/JPEG of any size and either polarity, or `-` for stdin, prepared as MNIST was
(core.picture). A picture that is not a digit is refused (`refused: <reason>`; in JSON `"digit":
null` and a `reason`); the others are still answered. --model is a registry URI (from
MLFLOW_TRACKING_URI or this checkout's store) or a models/model.pt path, with models/refusal.pt beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from mnist_cnn.cli import UserError, run_stage
from mnist_cnn.core import refusal
from mnist_cnn.core.model import load_checkpoint, normalize_fields
from mnist_cnn.core.picture import SIZE, NoInk, read_image, to_mnist
from mnist_cnn.files import load_tensors
from mnist_cnn.paths import REFUSAL_STATS

DEFAULT_MODEL = "models:/mnist-cnn@champion"
SHOW_SCALE = 10

Predictor = Callable[[np.ndarray], refusal.Answers]  # uint8 fields (N, 28, 28) -> per-image answers


def registry_predictor(uri: str) -> Predictor:
    """The served model from the MLflow store that the stages use (read-only here)."""
    import mlflow  # slow to import; only this path needs it
    from mlflow.exceptions import MlflowException

    from mnist_cnn.tracking import store

    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        tracking_uri, _ = store.local_store()
        database = store.store_root() / "mlruns" / "mlflow.db"
        if not database.exists():
            raise UserError(f"{uri}: no MLflow store at {database} (run `dvc repro`, or pass --model models/model.pt)")
    mlflow.set_tracking_uri(tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(uri)
    except MlflowException as error:
        raise UserError(f"{uri}: {error.message.splitlines()[0]}") from None
    except OSError as error:
        raise UserError(f"{uri}: cannot load ({error})") from None
    except Exception as error:  # the model's own files (a damaged download): one line, not a traceback
        why = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        fix = "the registered copy is damaged: register it again with `dvc repro`"
        raise UserError(f"{uri}: cannot load the model's files ({why}): {fix}") from None
    return lambda fields: from_served(model.predict(fields))


def from_served(records: list[dict]) -> refusal.Answers:
    """The served model's records (mnist_cnn.serving.served) as (digits, probabilities, reasons)."""
    digits = np.array([record["digit"] for record in records], dtype=np.int64)
    probabilities = np.array([record["probability"] for record in records], dtype=np.float32)
    return digits, probabilities, [record["reason"] for record in records]


def checkpoint_predictor(path: str) -> Predictor:
    """The train stage's checkpoint (weights only, no pickled code), with evaluate's refusal statistics
    from beside it; without them (a checkpoint not yet evaluated) answers are not checked."""
    net = load_checkpoint(path)
    stats_path = Path(path).parent / REFUSAL_STATS.name
    if stats_path.is_file():
        stats = load_tensors(stats_path)
        return lambda fields: refusal.answer(net, stats, normalize_fields(fields))
    print(f"warning: no {stats_path} (run evaluate): pictures that are not digits are not refused", file=sys.stderr)

    def predict(fields: np.ndarray) -> refusal.Answers:
        probabilities, digits = refusal.features_and_log_probs(net, normalize_fields(fields))[1].exp().max(dim=1)
        return digits.numpy(), probabilities.numpy(), [None] * len(digits)

    return predict


def load_predictor(model: str) -> Predictor:
    """A URI (models:/, runs:/, s3://, ...) goes to MLflow; anything else is a checkpoint path."""
    scheme, separator, _ = model.partition(":/")
    is_uri = bool(separator) and len(scheme) > 1 and scheme.replace("+", "").isalnum()  # C:/ is a drive
    return registry_predictor(model) if is_uri else checkpoint_predictor(model)


def save_inputs(directory: Path, fields: dict[str, np.ndarray]) -> None:
    """Write each 28x28 input, upscaled, as <stem>.png (stdin as stdin.png; clashes get -2, -3...)."""
    directory.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    for name, field in fields.items():
        stem = "stdin" if name == "-" else Path(name).stem
        candidate, n = stem, 1
        while candidate in used:
            n += 1
            candidate = f"{stem}-{n}"
        used.add(candidate)
        picture = Image.fromarray(field).resize((SIZE * SHOW_SCALE,) * 2, Image.Resampling.NEAREST)
        picture.save(directory / f"{candidate}.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mnist-cnn-predict", description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="PNG/JPEG file, or - for stdin")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"registry URI or model.pt path ({DEFAULT_MODEL})")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--show-input", type=Path, metavar="DIR", help="write the 28x28 inputs the model saw")
    args = parser.parse_args(argv)
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
            save_inputs(args.show_input, fields)
        except OSError as error:
            raise UserError(f"--show-input {args.show_input}: cannot write ({error.strerror})") from None
    if fields:
        digits, probabilities, reasons = load_predictor(args.model)(np.stack(list(fields.values())))
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
    """The `mnist-cnn-predict` console script (also `python -m mnist_cnn.serving.predict`)."""
    run_stage(main)


if __name__ == "__main__":
    cli()
