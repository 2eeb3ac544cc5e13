"""MNIST files on disk: the IDX format, the processed tensors, atomic writes."""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mnist_cnn.config import UserError
from mnist_cnn.paths import PROCESSED_DIR

# name -> SHA-256 of the uncompressed file (the files LeCun published).
MNIST_FILES: dict[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
SPLITS = {"train": "train", "test": "t10k"}

IMAGE_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
LABEL_MAGIC = 0x00000801  # unsigned byte, 1 dimension
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


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as IDX (used for tests and synthetic data)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with atomic_path(path) as tmp:
        tmp.write_bytes(header + array.tobytes())


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp's 0600 is too private


def cannot_write(path: Path, error: OSError, refused: str | None = None) -> UserError:
    """The one-line error for an output that cannot be written (a full or read-only disk, a file
    where a directory should be): names the output, and the path the OS refused if another one."""
    where = f" ({refused})" if refused is not None and Path(refused) != path else ""
    return UserError(f"cannot write {path}: {error.strerror or error}{where}")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it over `path` only on success.

    An OSError creating the directory, writing the temp file or renaming it becomes a UserError
    naming `path` (see cannot_write): the stage stops with one line, not a traceback.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise cannot_write(path, error, error.filename) from None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise cannot_write(path, error) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            yield tmp
        except OSError as error:  # writing the temp file: a full disk, a quota
            raise cannot_write(path, error) from None
        os.chmod(tmp, _FILE_MODE)
        try:
            os.replace(tmp, path)
        except OSError as error:  # e.g. a directory where the file should be
            raise cannot_write(path, error) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    # Serialised in memory, then written by Python: a failed write (full disk) is then an OSError
    # that atomic_path reports, not torch's "[enforce fail at inline_container.cc] unexpected pos".
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a dict of tensors; weights_only=True refuses pickled code."""
    if not path.exists():
        raise UserError(f"{path}: missing (run the earlier stages first: dvc repro)")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_processed(split: str, subset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 1, 28, 28) and int64 labels (N,) of a processed split."""
    tensors = load_tensors(PROCESSED_DIR / f"{split}.pt")
    images, labels = tensors["images"].unsqueeze(1), tensors["labels"]
    if subset:
        images, labels = images[:subset], labels[:subset]
    return images, labels
