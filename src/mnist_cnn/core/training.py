"""The training loop's pieces, shared by the train stage and the benchmark: the seeded generators, the
model, the optimizer and its schedule in a TrainStep, and one epoch over the training set.
"""

from __future__ import annotations

import os
import random
from dataclasses import fields

import numpy as np
import torch
from tqdm import tqdm

from mnist_cnn.cli import UserError
from mnist_cnn.config import Params
from mnist_cnn.core import distributed, runtime
from mnist_cnn.core.augment import Extras
from mnist_cnn.core.model import Net
from mnist_cnn.core.train_step import TrainStep


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
    """One pass over the shuffled training set: the mean training loss, or a UserError naming the epoch
    and step where the loss became NaN or infinite."""
    step.model.train()
    step.start_epoch()
    # Under DDP every rank draws the same permutation and trains on its shard of it,
    # batch_size / world images per step (see distributed.py).
    permutation = torch.randperm(n, device=step.device, generator=step.shuffle_generator)
    order = distributed.shard(permutation, step.rank, step.world)
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
    bf16 = runtime.use_bf16(params.train.precision, device, "train.precision")
    if device.type == "cpu":
        runtime.tune_cpu_allocator()
    generator = seed_everything(params.seed, device)
    shuffle_generator = None
    if world > 1:  # the same shuffle everywhere, a different augmentation stream per rank
        shuffle_generator = generator
        generator = torch.Generator(device=device)
        generator.manual_seed(params.seed + rank)
    if params.train.deterministic:
        use_deterministic_algorithms()
    model = Net(**params.model.model_dump()).to(device)
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
        extras=Extras(**{extra.name: getattr(params, f"augment_{extra.name}") for extra in fields(Extras)}),
        consistency=params.augment_consistency,
    )


def make_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device, cuda_graph: bool, bf16: bool
) -> torch.optim.Adam:
    """Adam as in the report (AdamW when weight_decay > 0): the fused kernel on CUDA (capturable when
    graphed) and on the CPU under bf16. CPU fp32 keeps the multi-tensor Adam: the fused one rounds
    differently in the last bits, and fp32 reproduces the report's runs exactly."""
    kwargs: dict = {"lr": lr}
    if device.type == "cuda":
        kwargs.update(fused=True, capturable=cuda_graph)
        if cuda_graph:  # a graph reads the rate from this tensor, so a schedule can change it between replays
            kwargs["lr"] = torch.tensor(lr, dtype=torch.float32, device=device)  # the fused kernel reads float32
    elif bf16:
        kwargs["fused"] = True
    if weight_decay > 0:
        return torch.optim.AdamW(model.parameters(), weight_decay=weight_decay, **kwargs)
    return torch.optim.Adam(model.parameters(), **kwargs)


STEP_GAMMA = 0.7  # `step`: the rate times 0.7 after every epoch, as in PyTorch's MNIST example


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, epochs: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The learning-rate schedule, stepped after every batch (None for `none`)."""
    total = epochs * steps_per_epoch
    if schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=steps_per_epoch, gamma=STEP_GAMMA)
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if schedule == "onecycle":
        peak = float(optimizer.param_groups[0]["lr"])
        # cycle_momentum=False: a captured graph bakes Adam's betas in, so cycling them
        # would behave differently with and without graphs.
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peak, total_steps=total, cycle_momentum=False)
    return None
