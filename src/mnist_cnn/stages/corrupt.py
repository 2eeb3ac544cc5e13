"""Stage corrupt: params robustness (all but precision) + data/processed/ -> data/corrupted.pt, the
test images the robustness stage scores, made once per dataset and robustness params (an experiment
that changes only the model reuses them from DVC's cache): uint8 (N, 28, 28) images under "rotation
20", "shift_x 4", "scale 0.8", ... (curve_samples test images) and under each MNIST-C corruption's
name (corruption_samples images), with the samples' test-set indices ("curve_pick", "corruption_pick").
"""

from __future__ import annotations

import time

import torch

from mnist_cnn.cli import run_stage
from mnist_cnn.config import load_params
from mnist_cnn.data.mnist import load_processed
from mnist_cnn.evaluation import corruptions
from mnist_cnn.files import save_tensors
from mnist_cnn.paths import CORRUPTED


def fixed_subset(n_total: int, n: int) -> torch.Tensor:
    """The same n test images for every model and run (a seeded permutation, not the first n:
    MNIST's test set puts its easier half first)."""
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(0))[: min(n, n_total)]


def main() -> None:
    start, r = time.perf_counter(), load_params().robustness
    images = load_processed("test")[0].squeeze(1)
    sets = {"curve_pick": fixed_subset(len(images), r.curve_samples)}
    sets["corruption_pick"] = fixed_subset(len(images), r.corruption_samples)
    points = [("rotation", a) for a in corruptions.both_ways(r.angles)]
    points += [(f"shift_{d}", k) for k in r.shifts for d in corruptions.SHIFT_DIRECTIONS]
    points += [("scale", s) for s in r.scales]
    for curve, size in points:
        sets[f"{curve} {size:g}"] = corruptions.curve_point(curve, size, images[sets["curve_pick"]])
    for name in r.corruptions:
        sets[name] = corruptions.corrupt(name, images[sets["corruption_pick"]])
    save_tensors(CORRUPTED, sets)
    print(
        f"corrupt: {len(points)} curve points x {len(sets['curve_pick'])} images, {len(r.corruptions)} corruptions"
        f" x {len(sets['corruption_pick'])} images, {time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    run_stage(main)
