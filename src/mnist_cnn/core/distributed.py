"""Data-parallel training with torch.distributed, launched by torchrun.

`train.nproc: N` makes the train stage start itself again under `torchrun --standalone --nproc-per-node N`
(one machine); on several machines run torchrun yourself (docs/operations.md). `train.batch_size` stays
the global batch: each of the W processes takes batch_size / W images of its shard per step and DDP
averages the gradients, so an epoch has the same optimizer steps and `train.lr` means what it means for
one process. Only rank 0 evaluates, logs to MLflow and writes the stage's outputs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist


def launched() -> bool:
    """True inside a process started by torchrun (or any launcher that sets WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ


def launched_world_size() -> int:
    """The process count torchrun announced (1 when not launched), known before the group is joined."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def relaunch(nproc: int, module: str = "mnist_cnn.stages.train") -> None:
    """Replace this process with torchrun running `nproc` copies of the module on this machine."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", module]
    print(f"train: {' '.join(cmd[1:])}", flush=True)
    os.execv(sys.executable, cmd)


@contextmanager
def process_group(device_type: str) -> Iterator[None]:
    """Join torchrun's process group (gloo on CPU, nccl on CUDA) for the block; nothing when not launched."""
    if launched_world_size() == 1:
        yield
        return
    if device_type == "cuda":
        torch.cuda.set_device(local_rank())
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def shard(order: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's part of an epoch's permutation (the same on every rank): every world-th index.

    The remainder (fewer than `world` images, different ones each epoch) is left out, so every
    rank runs the same number of steps; DDP's collective gradient averaging needs that.
    """
    if world == 1:
        return order
    return order[rank::world][: len(order) // world]


def all_reduce(value: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place over all ranks (sum or max); unchanged in a single process."""
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return value
