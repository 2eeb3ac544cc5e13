"""Not a digit: calibrated probabilities, and a refusal for pictures unlike any training digit.

Fitted on the TRAINING set (never the test set) after training: a temperature T (softmax(logits / T)
minimises the NLL), and two Mahalanobis distances to the nearest class mean (shared Ledoit-Wolf covariance):
"conv", the last conv block's feature maps (64 x model.width) averaged over the picture, and "logits".
Softmax confidence cannot refuse: far from the training data a ReLU network's logits grow without bound. T
and the thresholds come from training images as training saw them (augmented, a fixed seed). A picture with
(almost) no ink is "blank", one with too little or too much ink (params evaluate.ink_quantiles) not a digit.
With the not-a-digit detector (core.detector, shared by every classifier), its weights join the statistics,
and its threshold and the distances' are fitted together on training digits the detector has not fitted. The
budget, the calibration sizes and the detector's share are params (`evaluate:` in params.yaml);
docs/refusal.md.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from sklearn.covariance import LedoitWolf

from mnist_cnn.config import EvaluateParams
from mnist_cnn.core import detector as not_digit
from mnist_cnn.core.augment import Extras, photometric, random_affine
from mnist_cnn.core.model import CPU_BATCH, MNIST_STD, Net, normalize, normalize_fields, standardize, unstandardize

MIN_CONTRAST = 32 / 255  # an input whose pixels span less than this is blank (picture.MIN_CONTRAST)
LAYERS = ("conv", "logits")  # the distances, in the order their reasons are given
# Per image: digit (-1 when refused), calibrated probability (0 when refused), reason (None when answered).
Answers = tuple[np.ndarray, np.ndarray, list[str | None]]
BLANK = "blank (no ink found: the picture is nearly uniform)"
Tensors = dict[str, torch.Tensor]  # by name: a layer's features, or the refusal statistics


@torch.inference_mode()
def features_and_log_probs(net: Net, x: torch.Tensor, batch_size: int = CPU_BATCH) -> tuple[Tensors, torch.Tensor]:
    """({"conv": (N, 64 x width) averaged feature maps, "logits": (N, 10)}, log-probabilities (N, 10)) of
    normalised images, from one forward pass per batch. No hooks or other state on the net: the
    scoring server calls this from concurrent threads on one net."""
    net.eval()
    conv, logits = [], []
    for i in range(0, len(x), batch_size):
        maps = net.feature_maps(x[i : i + batch_size])
        conv.append(maps.mean((2, 3)))
        logits.append(net.classify(maps))
    all_logits = torch.cat(logits).float()
    return {"conv": torch.cat(conv).float(), "logits": all_logits}, torch.log_softmax(all_logits, dim=1)


def all_distances(features: Tensors, stats: Tensors) -> Tensors:
    """Per layer, the Mahalanobis distance (N,) of each feature vector to its nearest class mean."""
    out = {}
    for k in LAYERS:
        diff = features[k][:, None, :] - stats[f"{k}_means"][None]  # (N, 10, D)
        squared = torch.einsum("ncd,de,nce->nc", diff, stats[f"{k}_precision"], diff)
        out[k] = squared.min(dim=1).values.clamp_min(0).sqrt()
    return out


def class_statistics(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(one mean per class (10, D), the shrunk precision of the features about their class mean (D, D))."""
    means = torch.stack([features[labels == c].mean(0) for c in range(10)])
    centred = (features - means[labels]).double().numpy()
    return means, torch.from_numpy(LedoitWolf().fit(centred).precision_).float()


def union_thresholds(scores: list[torch.Tensor], rate: float, shares: list[float] | None = None) -> list[torch.Tensor]:
    """One threshold per score, each above the fraction p * share of its scores (share 1 unless given),
    with p chosen (by bisection) so that an image above any threshold is one of `rate` of the images."""
    shares = shares or [1.0] * len(scores)
    low, high = 0.0, rate / max(shares)  # then the largest share alone refuses at least `rate`
    for _ in range(30):
        p = (low + high) / 2
        refused = torch.stack([s > torch.quantile(s, 1 - p * k) for s, k in zip(scores, shares, strict=True)]).any(0)
        low, high = (p, high) if refused.float().mean() <= rate else (low, p)
    return [torch.quantile(s, 1 - low * k) for s, k in zip(scores, shares, strict=True)]


def fit_temperature(log_probs: torch.Tensor, labels: torch.Tensor) -> float:
    """The T that minimises the NLL of softmax(log_probs / T) (log-probs differ from logits by a
    per-row constant, which the softmax ignores)."""

    def nll(log_t: float) -> float:
        return torch.nn.functional.cross_entropy(log_probs / np.exp(log_t), labels).item()

    return float(np.exp(minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded").x))


def fit(
    net: Net,
    images: torch.Tensor,
    labels: torch.Tensor,
    seed: int,
    budget: EvaluateParams,
    detector: Tensors | None = None,
    extras: Extras | None = None,
) -> Tensors:
    """The refusal statistics of `net` from the training set: uint8 images (N, 1, 28, 28), labels (N,); `budget`
    says how many images calibrate, what share of them are refused and which ink range is answered. With the
    detector stage's output (its weights and `held_out`, the training images it has not fitted) and a
    detector_share above 0, the detector joins the refusal and the calibration images are those it held out.
    `extras`: the model's own training augmentation (params.yaml's augment_*); its photometric pieces reach the
    distances' calibration images (none by default: the report's model)."""
    if budget.detector_share == 0 or not detector:  # off (the detector stage then trains none)
        detector = None
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(images), generator=generator)[: budget.calibration_images]
    if detector is not None:
        pick = detector["held_out"][: budget.calibration_images]
    # A third of the training set pins down 10 means and a 64x64 covariance (at width 1) at a third of the cost.
    features, _ = features_and_log_probs(net, normalize(images[pick]))
    stats: Tensors = {}
    for layer in LAYERS:
        stats[f"{layer}_means"], stats[f"{layer}_precision"] = class_statistics(features[layer], labels[pick])

    # The training augmentation works on [0, 1] pixels with zero fill, as train_step applies it.
    seen = random_affine(images[pick].float() / 255.0, generator)
    seen_features, seen_log_probs = features_and_log_probs(net, standardize(seen))
    # A network trained to read blurred, noisy or blotted digits (the model's `extras`) maps them far from its
    # clean digits' means: the distances' thresholds come from the same images with those looks added too.
    looked = photometric(seen, generator, extras or Extras())
    if looked is not seen:
        seen_features, _ = features_and_log_probs(net, standardize(looked))
    scores, shares = list(all_distances(seen_features, stats).values()), [1.0] * len(LAYERS)
    if detector is not None:
        weights = {k: v for k, v in detector.items() if k != "held_out"}
        stats |= {not_digit.PREFIX + k: v for k, v in weights.items()}
        scores.append(not_digit.score_all(weights, standardize(seen)))
        shares.append(budget.detector_share)
    thresholds = union_thresholds(scores, budget.refused_training, shares)
    if detector is not None:
        stats["detector_threshold"] = thresholds.pop()
    stats |= {f"{k}_threshold": t for k, t in zip(LAYERS, thresholds, strict=True)}
    stats["ink_range"] = torch.quantile(ink_coverage(seen), torch.tensor(budget.ink_quantiles))
    stats["temperature"] = torch.tensor(fit_temperature(seen_log_probs, labels[pick]))
    return stats


def ink_coverage(pixels: torch.Tensor) -> torch.Tensor:
    """The fraction of each (N, 1, 28, 28) picture's pixels brighter than half the ink, pixels in [0, 1]."""
    return (pixels > 0.5).flatten(1).float().mean(1)


def answer(net: Net, stats: Tensors, x: torch.Tensor) -> Answers:
    """(digits (N,), calibrated probabilities (N,), reasons) for normalised images (N, 1, 28, 28);
    a refused image has digit -1, probability 0 and a reason, the others reason None."""
    return decide(stats, x, *features_and_log_probs(net, x))


def decide(stats: Tensors, x: torch.Tensor, features: Tensors, log_probs: torch.Tensor) -> Answers:
    """answer() for a forward pass already made."""
    probabilities, digits = torch.softmax(log_probs / stats["temperature"], dim=1).max(dim=1)
    distance = torch.stack(list(all_distances(features, stats).values()), 1).tolist()
    thresholds = [stats[f"{k}_threshold"].item() for k in LAYERS]
    span = (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3))) * MNIST_STD
    coverage = ink_coverage(unstandardize(x))
    low, high = stats["ink_range"].tolist()
    unlike = detector_scores(stats, x)
    limit = stats["detector_threshold"].item() if "detector_threshold" in stats else float("inf")
    reasons: list[str | None] = []
    for s, c, d, u in zip(span.tolist(), coverage.tolist(), distance, unlike.tolist(), strict=True):
        far = [f"{k} distance {v:.0f} > {t:.0f}" for k, v, t in zip(LAYERS, d, thresholds, strict=True) if v > t]
        if s < MIN_CONTRAST:
            reasons.append(BLANK)
        elif not low <= c <= high:
            reasons.append(f"not a digit (ink covers {c:.0%} of the field; training digits {low:.0%}-{high:.0%})")
        elif u > limit:
            reasons.append(f"not a digit (the not-a-digit detector scores it {u:.1f} > {limit:.1f})")
        elif far:
            reasons.append(f"not a digit (unlike every training digit: {', '.join(far)})")
        else:
            reasons.append(None)
    refused = torch.tensor([r is not None for r in reasons], dtype=torch.bool)
    return torch.where(refused, -1, digits).numpy(), torch.where(refused, 0.0, probabilities).numpy(), reasons


def detector_scores(stats: Tensors, x: torch.Tensor) -> torch.Tensor:
    """The not-a-digit detector's scores (N,) of normalised images, -inf for all without a detector."""
    weights = {k.removeprefix(not_digit.PREFIX): v for k, v in stats.items() if k.startswith(not_digit.PREFIX)}
    return not_digit.score_all(weights, x) if weights else torch.full((len(x),), -float("inf"))


def refused_fraction(net: Net, stats: Tensors, fields: np.ndarray) -> float:
    """The fraction of uint8 28x28 pictures (already through picture.to_mnist) that are refused."""
    return float((answer(net, stats, normalize_fields(fields))[0] < 0).mean())
