"""Training throughput: the tutorial-style loop of the report against the train stage's loop.

Both loops run in this process on the same images, device, network, Adam, batch size and
augmentation, each warmed up and timed over R passes (the median is reported): the reference is
torchvision's MNIST dataset with per-image PIL transforms and a DataLoader with worker processes;
the project's is the train stage's own code. Prints a table, then one JSON line (docs/speed.md).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from mnist_cnn.cli import UserError, run_stage
from mnist_cnn.config import Params, load_params
from mnist_cnn.core.model import MNIST_MEAN, MNIST_STD, Net
from mnist_cnn.core.runtime import pick_device, use_bf16
from mnist_cnn.core.training import build, train_epoch
from mnist_cnn.data.mnist import load_processed
from mnist_cnn.data.sources import MNIST_FILES
from mnist_cnn.paths import RAW_DIR

WARMUP_BATCHES = 16
MIN_SUBSET = 1024


@contextmanager
def reference_loop(params: Params, device: torch.device, subset: int, workers: int) -> Iterator[Callable[[], float]]:
    """The report's loop over `subset` images, warmed up; yields a function that times one pass (images/s)."""
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
        model = Net(**params.model.model_dump()).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=params.train.lr)

        def one_pass(limit: int | None = None) -> int:
            seen = 0
            for x, y in itertools.islice(loader, limit):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                loss = F.nll_loss(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                seen += len(y)
            return seen

        one_pass(WARMUP_BATCHES)
        yield lambda: timed(one_pass, device)


@contextmanager
def project_loop(params: Params, device: torch.device, subset: int) -> Iterator[Callable[[], float]]:
    """The train stage's loop over `subset` images, after a warm-up epoch; yields a function that times one pass."""
    images, labels = load_processed("train", subset)
    step = build(params, images.to(device), labels.to(device))
    n, batch_size = len(images), params.train.batch_size

    def one_pass() -> int:
        train_epoch(step, n, batch_size)
        return n

    one_pass()  # warm-up: allocations, cuDNN plans, graph capture
    yield lambda: timed(one_pass, device)


def timed(one_pass: Callable[[], int], device: torch.device) -> float:
    """Images per second of one pass, from and to an idle GPU."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    started = time.perf_counter()
    seen = one_pass()
    sync()
    return seen / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mnist_cnn.tools.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--precision", choices=["fp32", "bf16", "auto"], default=None, help="default: params.yaml")
    parser.add_argument("--subset", type=int, default=6400, help="training images per timed pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes of each loop (median)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="reference DataLoader")
    parser.add_argument("--no-cuda-graph", action="store_true", help="project loop without graph capture")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    if args.subset < MIN_SUBSET:
        raise UserError(f"--subset must be at least {MIN_SUBSET} (warm-up plus a timed pass)")
    if args.repeats < 1:
        raise UserError("--repeats must be at least 1")
    params = load_params()
    device = pick_device(args.device)
    bf16 = use_bf16(args.precision or params.train.precision, device, "--precision")
    train = params.train.model_copy(
        update={
            "device": args.device,
            "precision": "bf16" if bf16 else "fp32",
            "cuda_graph": params.train.cuda_graph and not args.no_cuda_graph,
            # The project loop runs 1 + repeats epochs; a one-cycle schedule refuses steps beyond its plan.
            "epochs": max(params.train.epochs, 1 + args.repeats),
        }
    )
    params = params.model_copy(update={"train": train})
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)

    # Each rate is the median of several passes (a shared machine's speed drifts). The
    # reference runs first and alone: the project's loop tunes the process-wide allocator
    # (core.runtime.tune_cpu_allocator), which would speed up a tutorial loop run after it.
    rates: dict[str, list[float]] = {}
    with reference_loop(params, device, args.subset, args.workers) as reference_pass:
        rates["reference"] = [reference_pass() for _ in range(args.repeats)]
    del reference_pass  # the last reference to its DataLoader: the worker processes end here
    with project_loop(params, device, args.subset) as project_pass:
        rates["project"] = [project_pass() for _ in range(args.repeats)]
    reference, project = statistics.median(rates["reference"]), statistics.median(rates["project"])
    result = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "precision": train.precision,
        "cuda_graph": train.cuda_graph and device.type == "cuda",
        "augment": params.augment,
        "batch_size": train.batch_size,
        "subset": args.subset,
        "repeats": args.repeats,
        "reference_img_per_s": round(reference, 1),
        "project_img_per_s": round(project, 1),
        "ratio": round(project / reference, 2),
        "project_epoch_s_60k": round(60000 / project, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "torch": torch.__version__,
    }
    if not args.json:
        print(f"{'loop':<50}{'img/s (median)':>16}   passes")
        labels = {
            "reference": f"reference (PIL transforms + DataLoader, {args.workers} workers)",
            "project": f"project (train stage, {train.precision}{', CUDA graph' if result['cuda_graph'] else ''})",
        }
        for loop, label in labels.items():
            passes = " ".join(f"{rate:,.0f}" for rate in rates[loop])
            print(f"{label:<50}{statistics.median(rates[loop]):>16,.0f}   {passes}")
        print(f"ratio {result['ratio']}x on {result['device_name']}; peak RSS {result['peak_rss_mb']} MB")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    run_stage(main)
