"""Measure the "not a digit" refusal of a checkpoint on the real data (slow: minutes on 2 cores).

    PYTHONPATH=src python dev/refusal/measure.py --model models/model.pt --data data/processed \
        [--fit [--refused-training 0.01]]

Fits the refusal statistics from the training set (or, without --fit, reads models/refusal.pt
beside the checkpoint), then prints: ECE before/after the temperature on the MNIST test set, the
false-refusal rate on the test set and on the OOD handwriting set (mnist_cnn.evaluation.ood when present,
else an approximation: scikit-learn's load_digits drawn dark on white at 64 px, through predict's
preprocessing), the refusal rate on each kind of generated non-digit (mnist_cnn.nondigits), and on
raw 28x28 uniform noise as the served model could be sent it (no preprocessing), and on each
letter of the letter set.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mnist_cnn.config import load_params
from mnist_cnn.core import refusal
from mnist_cnn.core.model import load_checkpoint, normalize
from mnist_cnn.core.picture import to_mnist
from mnist_cnn.evaluation import calibration, nondigits
from mnist_cnn.files import load_tensors
from mnist_cnn.paths import REFUSAL_STATS


def ood_set() -> tuple[np.ndarray, str]:
    try:
        from mnist_cnn.evaluation import ood

        return ood.load_ood_set()[0], "mnist_cnn.evaluation.ood.load_ood_set()"
    except ImportError:
        from sklearn.datasets import load_digits

        digits = load_digits().images  # (1797, 8, 8), 0-16
        pictures = [
            Image.fromarray(np.uint8(255 - d * 255 / 16)).resize((64, 64), Image.Resampling.BILINEAR) for d in digits
        ]
        return np.stack([to_mnist(p) for p in pictures]), "load_digits at 64 px (approximation)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="models/model.pt")
    parser.add_argument("--data", default="data/processed", type=Path)
    parser.add_argument("--fit", action="store_true", help="fit the statistics instead of reading refusal.pt")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--refused-training",
        type=float,
        default=None,
        help="with --fit: another operating point (the fraction of augmented training digits refused); "
        "default params.yaml's evaluate.refused_training",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    net = load_checkpoint(args.model)
    train, test = load_tensors(args.data / "train.pt"), load_tensors(args.data / "test.pt")
    started = time.perf_counter()
    if args.fit:
        budget = load_params().evaluate
        if args.refused_training is not None:
            budget = budget.model_copy(update={"refused_training": args.refused_training})
        args.refused_training = budget.refused_training
        stats = refusal.fit(net, train["images"].unsqueeze(1), train["labels"], args.seed, budget)
    else:
        stats = load_tensors(Path(args.model).parent / REFUSAL_STATS.name)
    fitted = time.perf_counter() - started
    result = {"fit_seconds": round(fitted, 1), "temperature": stats["temperature"].item()}
    result["refused_training"] = args.refused_training if args.fit else None
    result |= {f"{k}_threshold": stats[f"{k}_threshold"].item() for k in refusal.LAYERS}
    result.update(calibration.report(net, stats, test["images"].unsqueeze(1), test["labels"]))
    fields, source = ood_set()
    result["ood_source"] = source
    result["ood_refused"] = refusal.refused_fraction(net, stats, fields)
    for kind in nondigits.KINDS:
        fields, blank = nondigits.prepared(kind, 1000, seed=1)
        result[f"refused_{kind}"] = (blank + refusal.refused_fraction(net, stats, fields) * len(fields)) / 1000
        if kind == "letters":  # every picture is a letter (no blank ones): each letter's rate, in LETTERS' order
            refused = refusal.answer(net, stats, normalize(torch.from_numpy(fields).unsqueeze(1)))[0] < 0
            letters = np.array([nondigits.LETTERS[i % len(nondigits.LETTERS)] for i in range(len(fields))])
            result["refused_each_letter"] = " ".join(
                f"{c}:{refused[letters == c].mean():.0%}" for c in nondigits.LETTERS
            )
    # What the served model may be sent: raw uniform noise, normalised, with no preprocessing at all.
    raw = torch.randint(0, 256, (1000, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    result["refused_raw_noise"] = refusal.refused_fraction(net, stats, raw.numpy())
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
