"""The CNN of the reference report, layer for layer."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mnist_cnn.cli import UserError

# The report normalises with the standard MNIST statistics; preprocess measures
# them again on the training set and records them in stats.json.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

# Inference on a CPU runs in small batches, whose conv2 output stays in the cache (docs/speed.md has
# the measurements). The results are the same bytes either way.
CPU_BATCH = 32
INPUT_NORMS = ("none", "range", "background")


class Net(nn.Module):
    """Conv(1->32) ReLU, Conv(32->64) ReLU, MaxPool 2, FC 12544->128 ReLU, FC 128->10, LogSoftmax.

    The report's proposed improvements and more are options, off by default (then the weights are the
    report's model exactly): `batchnorm` after each conv, before its ReLU; `dropout` of the pooled features
    and the 128 hidden units; `depth=3`, a third block Conv(64->64) [BN] ReLU MaxPool 2 (its 64x7x7 features
    are invariant to larger shifts); `input_norm`, each picture's range (and page) normalised in the network.
    Input: normalised float images (N, 1, 28, 28). Output: log-probabilities (N, 10)."""

    def __init__(
        self, batchnorm: bool = False, dropout: float = 0.0, depth: int = 2, input_norm: str = "none", width: int = 1
    ) -> None:
        super().__init__()
        if depth not in (2, 3) or input_norm not in INPUT_NORMS or width < 1:
            wanted = f"depth must be 2 or 3, input_norm one of {INPUT_NORMS} and width >= 1"
            raise ValueError(f"{wanted}, not {depth}, {input_norm}, {width}")
        self.arch = {"batchnorm": batchnorm, "dropout": dropout, "depth": depth}  # saved with the weights
        # Only when set: the report's checkpoint stays byte for byte what it was.
        if input_norm != "none":
            self.arch["input_norm"] = input_norm
        if width != 1:
            self.arch["width"] = width
        c1, c2 = 32 * width, 64 * width
        self.conv1 = nn.Conv2d(1, c1, kernel_size=3, padding=1)
        self.norm1 = nn.BatchNorm2d(c1) if batchnorm else nn.Identity()
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3, padding=1)
        self.norm2 = nn.BatchNorm2d(c2) if batchnorm else nn.Identity()
        # Created only when used: an unused layer would still draw from the RNG and
        # change the report's initial weights. (Created here, before fc1, for the same reason.)
        self.block3 = None
        if depth == 3:
            conv3 = nn.Conv2d(c2, c2, kernel_size=3, padding=1)
            norm3 = nn.BatchNorm2d(c2) if batchnorm else nn.Identity()
            self.block3 = nn.Sequential(conv3, norm3, nn.ReLU(), nn.MaxPool2d(2, 2))
        self.pool = nn.MaxPool2d(2, 2)
        self.drop_features = nn.Dropout(dropout) if dropout else nn.Identity()
        self.fc1 = nn.Linear(c2 * 14 * 14 if depth == 2 else c2 * 7 * 7, 128)
        self.drop_hidden = nn.Dropout(dropout) if dropout else nn.Identity()
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.classify(self.feature_maps(x)), dim=1)

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """The last conv block's feature maps (N, 64 * width, H, W), as fc1 reads them (the refusal's
        features: a method, not a hook, so concurrent server threads can share one net)."""
        if norm := self.arch.get("input_norm"):
            x = stretched(x, background=norm == "background")
        x = torch.relu(self.norm1(self.conv1(x)))
        x = self.pool(torch.relu(self.norm2(self.conv2(x))))
        if self.block3 is not None:
            x = self.block3(x)
        x = self.drop_features(x)
        if x.requires_grad and x.is_contiguous(memory_format=torch.channels_last):
            x.register_hook(_channels_last_grad)
        return x

    def classify(self, maps: torch.Tensor) -> torch.Tensor:
        """Logits (N, 10) from feature_maps()."""
        x = torch.relu(self.fc1(torch.flatten(maps, 1)))
        return self.fc2(self.drop_hidden(x))


def _channels_last_grad(grad: torch.Tensor) -> torch.Tensor:
    # Under bf16 the feature maps are channels_last; flatten reads them in NCHW order,
    # so their gradient comes back NCHW, and max-pool's backward on a channels_last
    # input with an NCHW gradient is much slower than this one copy (docs/speed.md).
    return grad.contiguous(memory_format=torch.channels_last)


def stretched(x: torch.Tensor, background: bool = False) -> torch.Tensor:
    """model.input_norm. range: each image's pixels mapped linearly so that its darkest is black and its
    brightest white: a lifted background (a grey page, MNIST-C's brightness) no longer matters.
    background: first a smooth estimate of the page (a 7x7 minimum, then a 7x7 mean) is subtracted,
    so an uneven page (a shadow, a gradient, MNIST-C's fog) goes too. A 7x7 window is wider than
    any MNIST stroke, so the minimum sees the page between strokes, not the ink."""
    pixels = unstandardize(x)
    if background:
        page = F.avg_pool2d(-F.max_pool2d(-pixels, 7, 1, 3), 7, 1, 3, count_include_pad=False)
        pixels = pixels - page
    low, high = pixels.amin((1, 2, 3), keepdim=True), pixels.amax((1, 2, 3), keepdim=True)
    return standardize((pixels - low) / (high - low).clamp_min(1 / 255))


def standardize(pixels: torch.Tensor) -> torch.Tensor:
    """Float pixels in [0, 1] -> the network's input (the report's normalisation)."""
    return (pixels - MNIST_MEAN) / MNIST_STD


def unstandardize(x: torch.Tensor) -> torch.Tensor:
    """The network's input -> float pixels in [0, 1] (standardize's inverse)."""
    return x * MNIST_STD + MNIST_MEAN


def normalize(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 pixels 0-255 -> the network's input."""
    return standardize(images_uint8.float() / 255.0)


def normalize_fields(fields: np.ndarray) -> torch.Tensor:
    """uint8 28x28 fields (N, 28, 28), as predict's preprocessing makes them and the served model
    takes them -> the network's input (N, 1, 28, 28)."""
    return normalize(torch.from_numpy(np.array(fields, dtype=np.uint8)).unsqueeze(1))  # a copy: fields may be read-only


def load_model(path: str, device: torch.device | str = "cpu") -> Net:
    """Load weights saved by the train stage (weights_only: no pickled code runs)."""
    checkpoint = torch.load(path, map_location=device, weights_only=True)
    model = Net(**checkpoint["arch"])
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device).eval()


def load_checkpoint(path: str, device: torch.device | str = "cpu") -> Net:
    """load_model for files the user hands over (evaluate, predict): one clear error, no traceback."""
    if not Path(path).is_file():
        raise UserError(f"{path}: no such model file (train one with `dvc repro`)")
    fix = f"restore it with `dvc checkout --force {path}`, or rebuild it with `dvc repro`"
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a truncated copy is not one either
        raise UserError(f"{path}: not a model.pt checkpoint of this project (not a whole torch.save archive): {fix}")
    try:
        return load_model(path, device)
    except pickle.UnpicklingError:  # torch's message would suggest weights_only=False: not for an unknown file
        raise UserError(f"{path}: refused to load: it holds pickled objects besides weights") from None
    except (OSError, RuntimeError, EOFError, KeyError, TypeError, ValueError, zipfile.BadZipFile) as error:
        why = str(error).splitlines()[0][:160]
        raise UserError(f"{path}: not a model.pt checkpoint of this project ({why}): {fix}") from None


@torch.inference_mode()
def predict_log_probs(
    model: nn.Module, images_uint8: torch.Tensor, batch_size: int, bf16: bool = False
) -> torch.Tensor:
    """Log-probabilities (N, 10) for uint8 images (N, 1, 28, 28), in batches to bound memory.

    bf16: autocast on channels_last inputs and weights (oneDNN's and cuDNN's fast layout for bf16
    convolutions); only worth it where the device has bf16 natively (runtime.native_bf16).
    """
    model.eval()
    device = next(model.parameters()).device
    layout = torch.channels_last if bf16 else torch.contiguous_format
    if bf16:
        model.to(memory_format=layout)
    chunks, batch_size = [], min(batch_size, CPU_BATCH) if device.type == "cpu" else batch_size
    for i in range(0, len(images_uint8), batch_size):
        x = normalize(images_uint8[i : i + batch_size].to(device)).contiguous(memory_format=layout)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            chunks.append(model(x).float())
    return torch.cat(chunks)


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of scores (N, 10) against labels (N,): the exact fraction right."""
    return int((scores.argmax(1) == labels.to(scores.device)).sum()) / len(labels)
