"""How well a model's stated confidence and its refusal behave on labelled digits: the expected calibration
error before and after the refusal's temperature, and the share of digits refused."""

from __future__ import annotations

import numpy as np
import torch

from mnist_cnn.core.model import Net, normalize
from mnist_cnn.core.refusal import Tensors, decide, features_and_log_probs

ECE_BINS = 15


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Top-label ECE: the confidence-weighted gap between stated confidence and accuracy, in equal-width bins."""
    confidence, predicted = probabilities.max(1), probabilities.argmax(1)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    gap = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            gap += members.mean() * abs((predicted[members] == labels[members]).mean() - confidence[members].mean())
    return float(gap)


def report(net: Net, stats: Tensors, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """ECE before/after the temperature and the false-refusal rate on labelled uint8 images (N, 1, 28, 28)."""
    x = normalize(images)
    features, log_probs = features_and_log_probs(net, x)
    truth = labels.numpy()
    digits, _, _ = decide(stats, x, features, log_probs)
    return {
        "ece_uncalibrated": expected_calibration_error(log_probs.exp().numpy(), truth),
        "ece": expected_calibration_error(torch.softmax(log_probs / stats["temperature"], 1).numpy(), truth),
        "refused": float((digits < 0).mean()),
    }
