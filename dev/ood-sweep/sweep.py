"""Train settings in-process and measure clean, OOD and rough robustness accuracy of each.

    PYTHONPATH=src python dev/ood-sweep/sweep.py NAME SEED EPOCHS [key=value ...] >> results.jsonl

Run from a directory with data/processed (the preprocess stage's outputs). key=value
overrides params.yaml (dotted keys, YAML values), e.g. model.batchnorm=true augment_thickness=0.5.
Trains exactly as the train stage does (core.training.build + train_epoch), then prints one JSON
line: test accuracy, ood_accuracy and accuracy on rotated/shifted copies of the test set.
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.nn.functional as F
import yaml

from mnist_cnn.config import validate
from mnist_cnn.core.augment import affine_theta
from mnist_cnn.core.model import predict_log_probs
from mnist_cnn.core.training import build, train_epoch
from mnist_cnn.data.mnist import load_processed
from mnist_cnn.evaluation.ood import ood_accuracy

# Rough robustness: each test image rotated, or shifted diagonally (nearest, zero fill).
TRANSFORMS = {"rot+15": (15.0, 0), "rot-15": (-15.0, 0), "shift4": (0.0, 4)}


def transformed(images: torch.Tensor, degrees: float, shift: int) -> torch.Tensor:
    x = images.float()  # (N, 1, 28, 28)
    n = len(x)
    theta = affine_theta(torch.full((n,), degrees), torch.full((n, 2), float(shift)), 28)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", align_corners=False).round().to(torch.uint8)


def main() -> None:
    name, seed, epochs, *overrides = sys.argv[1:]
    with open("params.yaml") as file:
        raw = yaml.safe_load(file)
    raw["seed"], raw["train"]["epochs"] = int(seed), int(epochs)
    for item in overrides:
        key, value = item.split("=", 1)
        *parents, last = key.split(".")
        node = raw
        for part in parents:
            node = node[part]
        node[last] = yaml.safe_load(value)
    params = validate(raw)
    torch.set_num_threads(1)
    train_x, train_y = load_processed("train", params.data.subset)
    test_x, test_y = load_processed("test")
    step = build(params, train_x, train_y)
    started = time.perf_counter()
    for epoch in range(1, params.train.epochs + 1):
        loss = train_epoch(step, len(train_x), params.train.batch_size, epoch=epoch)
        elapsed = time.perf_counter() - started
        print(f"{name} s{seed} epoch {epoch}: loss {loss:.4f} at {elapsed:.0f} s", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - started
    net = step.net.eval()
    torch.save({"state_dict": net.state_dict(), "arch": net.arch}, f"{name}-s{seed}.pt")
    row = {"name": name, "seed": params.seed, "epochs": params.train.epochs, "overrides": overrides}
    row["clean"] = (predict_log_probs(net, test_x, 1000).argmax(1) == test_y).float().mean().item()
    with torch.no_grad():
        row["ood"] = ood_accuracy(net)
    for label, (degrees, shift) in TRANSFORMS.items():
        moved = transformed(test_x, degrees, shift)
        row[label] = (predict_log_probs(net, moved, 1000).argmax(1) == test_y).float().mean().item()
    row["train_seconds"] = round(seconds, 1)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
