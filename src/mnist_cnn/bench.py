"""Training throughput: the tutorial-style loop of the report against the train stage's loop.

    python -m mnist_cnn.bench [--device cpu|cuda] [--precision fp32|bf16] [--subset N] [--json]

Both loops run in this process, on the same images, device, model, Adam and
batch size, with augmentation as in params.yaml, each after a warm-up:
- reference: torchvision's MNIST dataset, per-image PIL RandomRotation(10) +
  RandomAffine(0, translate=(0.1, 0.1)), ToTensor, Normalize, a DataLoader
  with worker processes (the report's loop);
- project: the train stage's own code (train.build + train.train_epoch).
Prints a table, then one JSON line (the last line) for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from mnist_cnn.config import Params, UserError, load_params, run_stage
from mnist_cnn.data import MNIST_FILES, RAW_DIR, load_processed
from mnist_cnn.model import MNIST_MEAN, MNIST_STD, Net
from mnist_cnn.train import build, pick_device, train_epoch

WARMUP_BATCHES = 30
MIN_SUBSET = 2048


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reference_loop(params: Params, device: torch.device, subset: int, workers: int) -> float:
    """Images per second of the report's loop over `subset` images (after a warm-up)."""
    steps = [transforms.RandomRotation(10), transforms.RandomAffine(0, translate=(0.1, 0.1))] if params.augment else []
    transform = transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))])
    with tempfile.TemporaryDirectory() as root:
        raw = Path(root) / "MNIST" / "raw"  # torchvision's expected layout, linked to data/raw
        raw.mkdir(parents=True)
        for name in MNIST_FILES:
            (raw / name).symlink_to((RAW_DIR / name).resolve())
        dataset = Subset(datasets.MNIST(root, train=True, transform=transform), range(subset))
        loader = DataLoader(
            dataset,
            batch_size=params.train.batch_size,
            shuffle=True,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
        )
        torch.manual_seed(params.seed)
        model = Net().to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=params.train.lr)

        def one_pass(limit: int | None) -> int:
            seen = 0
            for i, (x, y) in enumerate(loader):
                if limit is not None and i >= limit:
                    break
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                loss = F.nll_loss(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                seen += len(y)
            return seen

        one_pass(WARMUP_BATCHES)
        sync(device)
        started = time.perf_counter()
        seen = one_pass(None)
        sync(device)
        return seen / (time.perf_counter() - started)


def project_loop(params: Params, device: torch.device, subset: int) -> float:
    """Images per second of the train stage's loop over `subset` images (after a warm-up epoch)."""
    images, labels = load_processed("train", subset)
    step = build(params, images.to(device), labels.to(device))
    n, batch_size = len(images), params.train.batch_size
    train_epoch(step, n, batch_size)  # warm-up: allocations, cuDNN plans, graph capture
    sync(device)
    started = time.perf_counter()
    train_epoch(step, n, batch_size)
    sync(device)
    return n / (time.perf_counter() - started)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mnist_cnn.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: params.yaml")
    parser.add_argument("--subset", type=int, default=6400, help="training images per timed pass")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="reference DataLoader")
    parser.add_argument("--no-cuda-graph", action="store_true", help="project loop without graph capture")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.subset < MIN_SUBSET:
        raise UserError(f"--subset must be at least {MIN_SUBSET} (warm-up plus a timed pass)")
    params = load_params()
    train = params.train.model_copy(
        update={
            "device": args.device,
            "precision": args.precision or params.train.precision,
            "cuda_graph": params.train.cuda_graph and not args.no_cuda_graph,
        }
    )
    params = params.model_copy(update={"train": train})
    device = pick_device(train.device)
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)

    reference = reference_loop(params, device, args.subset, args.workers)
    project = project_loop(params, device, args.subset)
    result = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "precision": train.precision,
        "cuda_graph": train.cuda_graph and device.type == "cuda",
        "augment": params.augment,
        "batch_size": train.batch_size,
        "subset": args.subset,
        "reference_img_per_s": round(reference, 1),
        "project_img_per_s": round(project, 1),
        "ratio": round(project / reference, 2),
        "project_epoch_s_60k": round(60000 / project, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "torch": torch.__version__,
    }
    if not args.json:
        print(f"{'loop':<44}{'img/s':>12}")
        print(f"{'reference (PIL transforms + DataLoader, ' + str(args.workers) + ' workers)':<44}{reference:>12,.0f}")
        label = f"project (train stage, {train.precision}{', CUDA graph' if result['cuda_graph'] else ''})"
        print(f"{label:<44}{project:>12,.0f}")
        print(f"ratio {result['ratio']}x on {result['device_name']}; peak RSS {result['peak_rss_mb']} MB")
    print(json.dumps(result), flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    run_stage(main)
