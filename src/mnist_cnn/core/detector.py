"""The not-a-digit detector: small networks, separate from the classifier, that score how unlike a
digit a 28x28 field is. Trained once per dataset (the detector stage, core.detector_training) and shared
by every classifier: the refusal (core.refusal) fits its threshold beside the classifier's distances.
Several members trained alike from different seeds are averaged: one network's score on a picture far
from its training data depends much on its seed; their mean much less.

The forward pass is a function of a dict of weight tensors, so the weights travel inside the refusal
statistics (models/refusal.pt) and the scoring server's threads share them without any module state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mnist_cnn.core.model import CPU_BATCH

PREFIX = "detector."  # its weights' names inside the refusal statistics
MEMBER = "m{}."  # each member's weights' names inside the detector's: m0.conv1.weight, m1.conv1.weight, ...
Tensors = dict[str, torch.Tensor]


def outputs(weights: Tensors, x: torch.Tensor) -> torch.Tensor:
    """The 11 outputs (N, 11) of normalised fields (N, 1, 28, 28): three conv blocks, two linear layers."""
    for i in (1, 2, 3):
        x = F.conv2d(x, weights[f"conv{i}.weight"], weights[f"conv{i}.bias"], padding=1)
        x = F.max_pool2d(F.relu(x), 2)
    x = F.relu(F.linear(x.flatten(1), weights["fc1.weight"], weights["fc1.bias"]))
    return F.linear(x, weights["fc2.weight"], weights["fc2.bias"])


def scores(weights: Tensors, x: torch.Tensor) -> torch.Tensor:
    """How unlike a digit each normalised field (N, 1, 28, 28) is: the log-odds of "not a digit" (N,),
    averaged over the members."""
    return torch.stack([not_digit_logit(outputs(member, x)) for member in members(weights)]).mean(0)


def members(weights: Tensors) -> list[Tensors]:
    """The members' weights, each by its own names; weights without member names are one member."""
    found, i = [], 0
    while any(k.startswith(MEMBER.format(i)) for k in weights):
        prefix = MEMBER.format(i)
        found.append({k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)})
        i += 1
    return found or [weights]


def joined(each: list[Tensors]) -> Tensors:
    """The members' weights as one dict (members() splits it again)."""
    return {MEMBER.format(i) + k: v for i, weights in enumerate(each) for k, v in weights.items()}


def not_digit_logit(out: torch.Tensor) -> torch.Tensor:
    """The log-odds of "not a digit" from the 11 outputs (N, 11): the ten digits, then not a digit."""
    return out[:, 10] - torch.logsumexp(out[:, :10], dim=1)


class Detector(nn.Module):
    """The trainable form of outputs(): conv 1->w, w->2w, 2w->2w (3x3, ReLU, max-pool 2), fc 2w*3*3->64->11.
    Eleven classes, the ten digits and "not a digit", not two: to tell a digit from a near miss it must
    learn each digit's shape, not only what digits share."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width * 3 * 3, 64)
        self.fc2 = nn.Linear(64, 11)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return outputs(dict(self.named_parameters()), x)


@torch.inference_mode()
def score_all(weights: Tensors, x: torch.Tensor, batch_size: int = CPU_BATCH) -> torch.Tensor:
    """scores() of many normalised fields, in batches."""
    return torch.cat([scores(weights, x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
