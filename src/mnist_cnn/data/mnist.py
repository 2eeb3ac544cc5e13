"""MNIST files on disk: the published checksums, the IDX format, the processed tensors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from mnist_cnn.cli import UserError
from mnist_cnn.files import load_tensors
from mnist_cnn.paths import PROCESSED_DIR

SPLITS = {"train": "train", "test": "t10k"}

IMAGE_SIZE = 28


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file of unsigned bytes; raise UserError on anything malformed."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror})") from None
    if len(data) < 4:
        raise UserError(f"{path}: truncated IDX file ({len(data)} bytes, no header)")
    zero, dtype_code, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or dtype_code != 0x08 or ndim not in (1, 3):
        magic = int.from_bytes(data[:4], "big")
        raise UserError(f"{path}: not an unsigned-byte IDX file of 1 or 3 dims (magic 0x{magic:08x})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(shape)
    if len(data) != expected:
        raise UserError(f"{path}: size {len(data)} bytes, header {shape} says {expected}")
    try:
        return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)
    except ValueError as error:
        raise UserError(f"{path}: IDX dimensions {shape} unusable ({error})") from None


def load_split(raw_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) of one split, checked for consistency."""
    prefix = SPLITS[split]
    images = read_idx(raw_dir / f"{prefix}-images-idx3-ubyte")
    labels = read_idx(raw_dir / f"{prefix}-labels-idx1-ubyte")
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise UserError(f"{split} images: expected shape (N, 28, 28), got {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise UserError(f"{split}: {len(images)} images but labels of shape {labels.shape}")
    if len(labels) and labels.max() > 9:
        raise UserError(f"{split} labels: values must be 0-9, found {int(labels.max())}")
    return images, labels


def load_processed(split: str, subset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 1, 28, 28) and int64 labels (N,) of a processed split."""
    tensors = load_tensors(PROCESSED_DIR / f"{split}.pt")
    end = subset or None  # 0: all
    return tensors["images"][:end].unsqueeze(1), tensors["labels"][:end]
