"""Not a digit: calibrated probabilities, and a refusal for pictures unlike any training digit.

Two statistics are fitted on the TRAINING set (never the test set) after training:

- a temperature T: the network's probabilities are over-confident; softmax(logits / T), with T
  fitted by minimising the NLL, makes a stated 90% right about 90% of the time (ECE);
- a feature-space distance: the penultimate layer's 128 features of the training images give
  one mean per class and a shared covariance (Ledoit-Wolf shrinkage: ReLU features are often
  exactly 0, so the plain covariance is near singular). A picture whose features are far, in
  Mahalanobis distance, from every class mean is refused. Softmax confidence cannot do this: a
  picture of noise lies far from all the training data, where the logits grow without bound
  and the softmax is most confident (a 64x64 noise picture read as a 0 at 97.7%).

Both are fitted on the training images as they were seen in training, rotated and shifted by the
training augmentation (a fixed seed): clean training images are the network's easiest pictures,
so a threshold or a temperature fitted on them would refuse, and over-trust, unseen digits.
The refusal threshold is the DISTANCE_QUANTILE of those images' distances.

A picture with (almost) no ink is refused before the network sees it: "blank". So is one whose
ink covers more, or less, of the 28x28 field than INK_QUANTILES of those training images allow:
predict's preprocessing turns noise and solid shapes into filled blobs, and on the report's
network their features are no farther from the digits than real digits are, so the distance
alone does not refuse them.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from sklearn.covariance import LedoitWolf

from mnist_cnn.augment import random_affine
from mnist_cnn.model import MNIST_MEAN, MNIST_STD, Net, normalize

DISTANCE_QUANTILE = 0.995  # of the augmented training images' distances: they are refused at this rate
INK_QUANTILES = (0.001, 0.999)  # of the augmented training images' ink coverage: the range that is answered
CALIBRATION_IMAGES = 20_000  # augmented training images for the temperature and the threshold
MIN_CONTRAST = 32 / 255  # an input whose pixels span less than this is blank (predict.MIN_CONTRAST)
ECE_BINS = 15
# Per image: digit (-1 when refused), calibrated probability (0 when refused), reason (None when answered).
Answers = tuple[np.ndarray, np.ndarray, list[str | None]]
BLANK = "blank (no ink found: the picture is nearly uniform)"


@torch.inference_mode()
def features_and_log_probs(net: Net, x: torch.Tensor, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate features (N, 128), log-probabilities (N, 10)) of normalised images, one pass each batch.
    No hooks or other state on the net: the scoring server calls this from concurrent threads on one net."""
    net.eval()
    features, log_probs = [], []
    for i in range(0, len(x), batch_size):
        hidden = net.penultimate(x[i : i + batch_size])
        features.append(hidden)
        log_probs.append(net.head(hidden))
    return torch.cat(features).float(), torch.cat(log_probs).float()


def distances(features: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mahalanobis distance (N,) of each feature vector to its nearest class mean."""
    diff = features[:, None, :] - stats["means"][None]  # (N, 10, 128)
    squared = torch.einsum("ncd,de,nce->nc", diff, stats["precision"], diff)
    return squared.min(dim=1).values.clamp_min(0).sqrt()


def fit_temperature(log_probs: torch.Tensor, labels: torch.Tensor) -> float:
    """The T that minimises the NLL of softmax(log_probs / T) (log-probs differ from logits by a
    per-row constant, which the softmax ignores)."""

    def nll(log_t: float) -> float:
        return torch.nn.functional.cross_entropy(log_probs / np.exp(log_t), labels).item()

    return float(np.exp(minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded").x))


def fit(net: Net, images: torch.Tensor, labels: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """The refusal statistics of `net` from the training set: uint8 images (N, 1, 28, 28), labels (N,)."""
    x = normalize(images)
    features, _ = features_and_log_probs(net, x)
    means = torch.stack([features[labels == c].mean(0) for c in range(10)])
    centred = (features - means[labels]).double().numpy()
    precision = torch.from_numpy(LedoitWolf().fit(centred).precision_).float()

    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(images), generator=generator)[:CALIBRATION_IMAGES]
    # The training augmentation works on [0, 1] pixels with zero fill, as train_step applies it.
    seen = random_affine(images[pick].float() / 255.0, generator)
    seen_features, seen_log_probs = features_and_log_probs(net, (seen - MNIST_MEAN) / MNIST_STD)
    stats = {"means": means, "precision": precision}
    threshold = torch.quantile(distances(seen_features, stats), DISTANCE_QUANTILE)
    ink_range = torch.quantile(ink_coverage(seen), torch.tensor(INK_QUANTILES))
    temperature = fit_temperature(seen_log_probs, labels[pick])
    return {**stats, "threshold": threshold, "ink_range": ink_range, "temperature": torch.tensor(temperature)}


def ink_coverage(pixels: torch.Tensor) -> torch.Tensor:
    """The fraction of each (N, 1, 28, 28) picture's pixels brighter than half the ink, pixels in [0, 1]."""
    return (pixels > 0.5).flatten(1).float().mean(1)


def answer(net: Net, stats: dict[str, torch.Tensor], x: torch.Tensor) -> Answers:
    """(digits (N,), calibrated probabilities (N,), reasons) for normalised images (N, 1, 28, 28);
    a refused image has digit -1, probability 0 and a reason, the others reason None."""
    features, log_probs = features_and_log_probs(net, x)
    return decide(stats, x, features, log_probs)


def decide(stats: dict[str, torch.Tensor], x: torch.Tensor, features: torch.Tensor, log_probs: torch.Tensor) -> Answers:
    """answer() for a forward pass already made."""
    probabilities, digits = torch.softmax(log_probs / stats["temperature"], dim=1).max(dim=1)
    distance = distances(features, stats)
    span = (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3))) * MNIST_STD
    coverage = ink_coverage(x * MNIST_STD + MNIST_MEAN)
    low, high = stats["ink_range"].tolist() if "ink_range" in stats else (0.0, 1.0)
    reasons: list[str | None] = []
    for s, c, d in zip(span.tolist(), coverage.tolist(), distance.tolist(), strict=True):
        if s < MIN_CONTRAST:
            reasons.append(BLANK)
        elif not low <= c <= high:
            reasons.append(f"not a digit (ink covers {c:.0%} of the field; training digits {low:.0%}-{high:.0%})")
        elif d > stats["threshold"]:
            reasons.append(f"not a digit (unlike every training digit: distance {d:.0f} > {stats['threshold']:.0f})")
        else:
            reasons.append(None)
    refused = torch.tensor([r is not None for r in reasons], dtype=torch.bool)
    digits = torch.where(refused, -1, digits).numpy()
    probabilities = torch.where(refused, 0.0, probabilities).numpy()
    return digits, probabilities, reasons


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


def report(net: Net, stats: dict[str, torch.Tensor], images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
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


def refused_fraction(net: Net, stats: dict[str, torch.Tensor], fields: np.ndarray) -> float:
    """The fraction of uint8 28x28 pictures (already through predict.to_mnist) that are refused."""
    digits, _, _ = answer(net, stats, normalize(torch.from_numpy(fields).unsqueeze(1)))
    return float((digits < 0).mean())
