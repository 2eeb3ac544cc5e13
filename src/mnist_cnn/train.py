"""Stage 3, train: the report's CNN, Adam, NLLLoss, with on-device augmentation.

Outputs: models/model.pt (weights), models/mlflow_run.json (the run the later
stages reopen), metrics/train.json (last epoch's train_loss, train_seconds), plots/train_history.csv (one
row per epoch). The whole training set lives on the device as uint8; each
batch is indexed, augmented and normalised there, so there is no DataLoader.
"""

from __future__ import annotations

import csv
import io
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

import mlflow
import numpy as np
import torch
from tqdm import tqdm

from mnist_cnn import distributed, lineage, tracking
from mnist_cnn.config import Params, UserError, load_params, run_stage
from mnist_cnn.data import atomic_path, load_processed, save_tensors, write_json
from mnist_cnn.model import Net, predict_log_probs
from mnist_cnn.paths import MODEL_PATH, TRAIN_HISTORY, TRAIN_METRICS
from mnist_cnn.train_step import (
    TrainStep,
    emulated_bf16_warning,
    epoch_order,
    make_optimizer,
    make_scheduler,
    mean_nll,
    tune_cpu_allocator,
)


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    test_loss: float
    test_accuracy: float
    seconds: float  # training time of the epoch, without the test-set evaluation


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device: 'cuda' requested but no CUDA device is available")
    if name == "cuda":
        return torch.device("cuda", distributed.local_rank())  # one GPU per torchrun process
    return torch.device(name)


def seed_everything(seed: int, device: torch.device) -> torch.Generator:
    """Seed Python, NumPy and torch; return the generator for shuffling and augmentation."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def use_deterministic_algorithms() -> None:
    """Only deterministic kernels (cuDNN convolutions, cuBLAS with a fixed workspace): on CUDA,
    bitwise-repeatable runs at some speed cost; on the CPU our ops already are deterministic."""
    # cuBLAS reads this when it is first initialised, so it must be set before any CUDA matmul.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def train_epoch(step: TrainStep, n: int, batch_size: int, progress: tqdm | None = None, epoch: int = 1) -> float:
    """One pass over the shuffled training set; returns the mean training loss.

    Raises UserError naming the epoch and step if the loss became NaN or infinite.
    """
    step.model.train()
    step.start_epoch()
    # Under DDP every rank draws the same permutation and trains on its shard of it,
    # batch_size / world images per step (see distributed.py).
    order = distributed.shard(epoch_order(n, step.device, step.shuffle_generator), step.rank, step.world)
    local_batch = batch_size // step.world
    for start in range(0, len(order), local_batch):
        step(order[start : start + local_batch])
        if progress is not None:
            progress.update(1)
    # The epoch's host-device syncs: this and the loss.
    bad_step = int(distributed.all_reduce(step.first_bad_step, "max").item())
    if bad_step >= 0:
        steps = steps_per_epoch(n, batch_size, step.world)
        raise UserError(
            f"training diverged: the loss is NaN or infinite at epoch {epoch}, step {bad_step} of {steps}"
            " (try a smaller train.lr)"
        )
    return distributed.all_reduce(step.loss_sum).item() / (len(order) * step.world)


def steps_per_epoch(n: int, batch_size: int, world: int) -> int:
    per_rank = n // world if world > 1 else n  # see distributed.shard
    return -(-per_rank // (batch_size // world))


def build(params: Params, images: torch.Tensor, labels: torch.Tensor) -> TrainStep:
    """The report's model and optimizer, wrapped in the step the train stage (and bench) runs."""
    device = images.device
    rank, world = distributed.rank(), distributed.world_size()
    bf16 = params.train.precision == "bf16"
    if device.type == "cpu":
        tune_cpu_allocator()
        warning = emulated_bf16_warning() if bf16 else None
        if warning and rank == 0:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
    generator = seed_everything(params.seed, device)
    shuffle_generator = None
    if world > 1:  # the same shuffle everywhere, a different augmentation stream per rank
        shuffle_generator = generator
        generator = torch.Generator(device=device)
        generator.manual_seed(params.seed + rank)
    if params.train.deterministic:
        use_deterministic_algorithms()
    model = Net(params.model.batchnorm, params.model.dropout, params.model.depth).to(device)
    optimizer = make_optimizer(model, params.train.lr, params.train.weight_decay, device, params.train.cuda_graph, bf16)
    steps = steps_per_epoch(len(images), params.train.batch_size, world)
    scheduler = make_scheduler(optimizer, params.train.lr_schedule, params.train.epochs, steps)
    return TrainStep(
        model,
        optimizer,
        images,
        labels,
        augment=params.augment,
        bf16=bf16,
        batch_size=params.train.batch_size // world,
        generator=generator,
        cuda_graph=params.train.cuda_graph,
        scheduler=scheduler,
        shuffle_generator=shuffle_generator,
        rank=rank,
        world=world,
        augment_scale=params.augment_scale,
        augment_thickness=params.augment_thickness,
    )


def measure_test_set(model: Net, images: torch.Tensor, labels: torch.Tensor, batch: int) -> tuple[float, float]:
    log_probs = predict_log_probs(model, images, batch)
    loss = mean_nll(log_probs, labels).item()
    accuracy = (log_probs.argmax(1) == labels).float().mean().item()
    return loss, accuracy


def write_history(rows: list[EpochResult]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(asdict(rows[0])))
    writer.writeheader()
    writer.writerows(asdict(r) for r in rows)
    with atomic_path(TRAIN_HISTORY) as tmp:
        tmp.write_text(buffer.getvalue())


def fit(params: Params) -> list[EpochResult]:
    """Train for params.train.epochs. Rank 0 (the only process without torchrun) evaluates
    after each epoch, logs to the active MLflow run and writes the outputs; other ranks only train."""
    device = pick_device(params.train.device)
    train_x, train_y = load_processed("train", params.data.subset)
    test_x, test_y = load_processed("test")
    if distributed.rank() == 0:  # the run's training data, with DVC's hash as its digest
        lineage.log_input(lineage.dataset(params, "train", train_x.numpy(), train_y.numpy()), context="training")
    train_x, train_y = train_x.to(device), train_y.to(device)
    test_x, test_y = test_x.to(device), test_y.to(device)
    step = build(params, train_x, train_y)
    lead = step.rank == 0
    batch_size = params.train.batch_size
    steps = steps_per_epoch(len(train_x), batch_size, step.world)
    on = f"{device} x {step.world} processes" if step.world > 1 else str(device)
    if lead:
        print(f"train: {len(train_x)} images, {params.train.epochs} epochs on {on}, augment={params.augment}")

    history: list[EpochResult] = []
    for epoch in range(1, params.train.epochs + 1):
        started = time.perf_counter()
        show_bar = lead and sys.stderr.isatty()
        with tqdm(total=steps, desc=f"epoch {epoch}", unit="batch", disable=not show_bar, leave=False) as bar:
            train_loss = train_epoch(step, len(train_x), batch_size, bar, epoch)
        train_seconds = time.perf_counter() - started
        if not lead:
            continue
        test_loss, accuracy = measure_test_set(step.net, test_x, test_y, params.train.eval_batch_size)
        result = EpochResult(epoch, train_loss, test_loss, accuracy, train_seconds)
        history.append(result)
        speed = len(train_x) / train_seconds
        print(
            f"epoch {epoch}: train_loss={train_loss:.4f} test_loss={test_loss:.4f} "
            f"test_accuracy={accuracy:.2%} (trained in {train_seconds:.1f} s, {speed:,.0f} img/s)",
            flush=True,
        )
        mlflow.log_metrics(
            {
                "train_loss": train_loss,
                "test_loss": test_loss,
                "test_accuracy": accuracy,
                "epoch_seconds": result.seconds,
                "lr": float(step.optimizer.param_groups[0]["lr"]),  # the rate the next step will use
            },
            step=epoch,
        )
        write_history(history)

    if lead:
        save_tensors(MODEL_PATH, {"state_dict": step.net.state_dict(), "arch": step.net.arch})
    return history


def check_parallel(params: Params) -> None:
    """What params cannot know: the process count of a torchrun started by hand (several machines).

    The rules between train.nproc and other keys are params' own (config.TrainParams).
    """
    world, batch = distributed.launched_world_size(), params.train.batch_size
    if params.train.cuda_graph and world > 1:
        raise UserError(f"train.cuda_graph cannot be combined with torchrun's {world} processes (DDP)")
    if batch % world:
        raise UserError(f"train.batch_size ({batch}) must be divisible by torchrun's {world} processes")


def main() -> None:
    params = load_params()
    check_parallel(params)
    if params.train.nproc > 1 and not distributed.launched():
        distributed.relaunch(params.train.nproc)  # does not return: torchrun runs this module N times
    with distributed.process_group(pick_device(params.train.device).type):
        if distributed.rank() != 0:
            fit(params)
            return
        with tracking.start_run(params):
            mlflow.log_param("world_size", distributed.world_size())
            history = fit(params)
            last = history[-1]
            train_seconds = sum(r.seconds for r in history)
            write_json(
                TRAIN_METRICS,
                {
                    # test_* of the last epoch are in the MLflow run and the history; the test
                    # metrics DVC shows are evaluate's alone (metrics/eval.json).
                    "train_loss": last.train_loss,
                    "train_seconds": round(train_seconds, 2),
                },
            )
            mlflow.log_metric("train_seconds", train_seconds)
            mlflow.log_artifact(str(TRAIN_HISTORY), artifact_path="plots")


if __name__ == "__main__":
    run_stage(main)
