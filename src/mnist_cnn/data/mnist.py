"""MNIST files on disk: the IDX files (torchvision's reader) and the processed tensors."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor

from mnist_cnn.cli import UserError
from mnist_cnn.files import load_tensors
from mnist_cnn.paths import PROCESSED_DIR

SPLITS = {"train": "train", "test": "t10k"}


def read_idx(path: Path) -> torch.Tensor:
    """An IDX file of unsigned bytes as a uint8 tensor; UserError on anything malformed."""
    try:
        array = read_sn3_pascalvincent_tensor(str(path))
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror})") from None
    except (AssertionError, KeyError, RuntimeError, TypeError, ValueError):  # torchvision checks with assert
        array = None
    if array is None or array.dtype != torch.uint8:
        raise UserError(f"{path}: not an IDX file of unsigned bytes, or cut short")
    return array


def load_split(raw_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 28, 28) uint8 and int64 labels (N,) of one split, checked for consistency."""
    prefix = SPLITS[split]
    images = read_idx(raw_dir / f"{prefix}-images-idx3-ubyte")
    labels = read_idx(raw_dir / f"{prefix}-labels-idx1-ubyte").long()
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise UserError(f"{split} images: expected shape (N, 28, 28), got {tuple(images.shape)}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise UserError(f"{split}: {len(images)} images but labels of shape {tuple(labels.shape)}")
    if labels.max() > 9:
        raise UserError(f"{split} labels: values must be 0-9, found {int(labels.max())}")
    return images, labels


def load_processed(split: str, subset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 1, 28, 28) and int64 labels (N,) of a processed split."""
    tensors = load_tensors(PROCESSED_DIR / f"{split}.pt")
    end = subset or None  # 0: all
    return tensors["images"][:end].unsqueeze(1), tensors["labels"][:end]
