"""Stage preprocess: IDX files -> data/processed/: train.pt and test.pt ({"images": (N, 28, 28) uint8,
"labels": (N,) int64}) and stats.json (counts, the training set's pixel mean and standard deviation).
"""

from __future__ import annotations

import numpy as np
import torch

from mnist_cnn.cli import run_stage
from mnist_cnn.config import load_params
from mnist_cnn.data.mnist import load_split
from mnist_cnn.files import save_tensors, write_json
from mnist_cnn.paths import PROCESSED_DIR, RAW_DIR


def main() -> None:
    load_params()  # validate before any work, like every stage
    # Read and check both splits before writing anything: a bad test file must not leave a new
    # train.pt beside the previous test.pt.
    splits = {split: load_split(RAW_DIR, split) for split in ("train", "test")}
    stats: dict[str, object] = {}
    for split, (images, labels) in splits.items():
        save_tensors(PROCESSED_DIR / f"{split}.pt", {"images": images, "labels": labels})
        stats[f"{split}_count"] = len(images)
        stats[f"{split}_class_counts"] = torch.bincount(labels, minlength=10).tolist()
        if split == "train":  # the pixels scaled to [0, 1], in float64: exact enough
            pixels = images.numpy().astype(np.float64) / 255.0
            stats["mean"], stats["std"] = float(pixels.mean()), float(pixels.std())
    write_json(PROCESSED_DIR / "stats.json", stats)
    print(
        f"preprocess: {stats['train_count']} train / {stats['test_count']} test images, "
        f"mean {stats['mean']:.4f}, std {stats['std']:.4f}"
    )


if __name__ == "__main__":
    run_stage(main)
