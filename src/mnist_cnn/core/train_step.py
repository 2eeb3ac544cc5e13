"""One optimisation step on a batch of training-set indices, eager or as a CUDA graph.

The training set stays on the device as uint8; a step gathers, augments (one affine grid + sample for the
batch), normalises, runs forward, NLLLoss, backward and Adam, and adds the loss to a sum on the device, so
the host never waits inside an epoch. With `train.cuda_graph` on CUDA the step is captured once and
replayed; the epoch's last, shorter batch runs eagerly through the same model and optimizer."""

from __future__ import annotations

import ctypes
import platform
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from mnist_cnn.config import UserError
from mnist_cnn.core.augment import Extras, augment
from mnist_cnn.core.model import standardize

WARMUP_STEPS = 3  # eager steps on a side stream before capture, as CUDA graphs require


class TrainStep:
    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        augment: bool,
        bf16: bool,
        batch_size: int,
        generator: torch.Generator | None,
        cuda_graph: bool,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        shuffle_generator: torch.Generator | None = None,
        rank: int = 0,
        world: int = 1,
        extras: Extras | None = None,
    ) -> None:
        self.net = model  # the bare network: evaluate and save this one
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.rank, self.world = rank, world
        self.images, self.labels = images, labels
        self.augment, self.bf16, self.batch_size = augment, bf16, batch_size
        self.extras = extras or Extras()
        self.device = images.device
        # bf16 is the fast path: channels_last pays on GPUs (tensor-core convolutions) and
        # on CPUs (oneDNN's NHWC convolution and max-pool kernels; docs/speed.md). fp32 keeps
        # NCHW so that the report's model trains bit for bit the same on a given CPU.
        self.channels_last = bf16
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        if world > 1:  # after the layout change: DDP sets up its gradient buckets from the parameters
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        self.use_graph = cuda_graph and self.device.type == "cuda"
        # Inside a CUDA graph the random draws must come from the default CUDA
        # generator (seeded by torch.manual_seed), whose state graphs track.
        self.generator = None if self.use_graph else generator
        # The epoch's permutation; under DDP it must be the same on every rank (the
        # augmentation generator differs per rank), else one generator does both.
        self.shuffle_generator = shuffle_generator or self.generator
        self.loss_sum = torch.zeros((), device=self.device)
        self.steps = torch.zeros((), dtype=torch.long, device=self.device)
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_index = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.eager_steps = 0

    def _step(self, index: torch.Tensor) -> None:
        x = self.images[index].float().div_(255.0)
        if self.augment:
            x = augment(x, self.generator, self.extras)
        x = standardize(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # cache_enabled=False: a graph must recast the weights on every replay, not reuse stale copies.
        autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False) if self.bf16 else nullcontext()
        )
        with autocast:
            log_probs = self.model(x)
        loss = mean_nll(log_probs, self.labels[index])
        self.optimizer.zero_grad(set_to_none=not self.use_graph)  # graphs need stable grad buffers
        loss.backward()
        self.optimizer.step()
        loss = loss.detach().float()
        self.loss_sum += loss * index.numel()
        # Remember the epoch's first step with a NaN or infinite loss, without a host sync.
        self.steps += 1
        bad = ~torch.isfinite(loss) & (self.first_bad_step < 0)
        self.first_bad_step.copy_(torch.where(bad, self.steps, self.first_bad_step))

    def start_epoch(self) -> None:
        self.loss_sum.zero_()  # in place: a captured graph keeps pointing at these tensors
        self.steps.zero_()
        self.first_bad_step.fill_(-1)

    def __call__(self, index: torch.Tensor) -> None:
        self._run(index)
        if self.scheduler is not None:
            self.scheduler.step()  # outside any graph: it writes the new rate into the lr tensor

    def _run(self, index: torch.Tensor) -> None:
        full = index.numel() == self.batch_size
        if not (self.use_graph and full):
            self._step(index)
            return
        if self.graph is not None:
            self.static_index.copy_(index)
            self.graph.replay()
            return
        if self.eager_steps < WARMUP_STEPS:
            # Warm-up steps are real training steps, run on a side stream so that
            # lazily created state (Adam moments, cuDNN plans) exists before capture.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._step(index)
            torch.cuda.current_stream().wait_stream(side)
            self.eager_steps += 1
            return
        graph = torch.cuda.CUDAGraph()
        self.static_index.copy_(index)
        with torch.cuda.graph(graph):
            self._step(self.static_index)
        self.graph = graph  # only a completed capture is ever replayed
        self.graph.replay()  # capture records the step without running it


def mean_nll(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """NLLLoss, mean over the batch. CUDA's NLLLoss raises under deterministic algorithms (which
    train.deterministic turns on); then the same mean is a gather, which has a deterministic kernel."""
    if torch.are_deterministic_algorithms_enabled():
        return -log_probs.float().gather(1, labels[:, None]).mean()
    return F.nll_loss(log_probs, labels)


def tune_cpu_allocator() -> None:
    """Keep freed activation buffers in the heap: each CPU step frees a few multi-MB activations, which
    glibc returns with munmap and page-faults back on the next step (system time). Raising the mmap and
    trim thresholds (mallopt, process-wide) stops that (docs/speed.md has the gain); a no-op without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's maximum
    libc.mallopt(m_trim_threshold, 256 << 20)
    libc.mallopt(m_top_pad, 64 << 20)


def native_bf16(device: torch.device) -> bool:
    """Whether the device computes bfloat16 natively: on CUDA, torch's check; on a CPU, oneDNN with
    AVX512-BF16 or AMX, and ATen dispatching above AVX2 (ATEN_CPU_CAPABILITY=avx2 limits it to that).
    Elsewhere bf16 is emulated and slower than fp32 (docs/speed.md)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    avx512 = torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "AVX2")
    return torch.backends.mkldnn.is_available() and cpu and avx512


def use_bf16(precision: str, device: torch.device, key: str) -> bool:
    """Whether `key` (train.precision, robustness.precision) means bf16 on `device`: auto picks it
    only where it is native; bf16 where it would be emulated (about 12x slower) is an error."""
    if precision == "auto":
        return native_bf16(device)
    x86 = platform.machine().lower() in ("x86_64", "amd64")  # other CPUs: no check here
    if precision == "bf16" and device.type == "cpu" and x86 and not native_bf16(device):
        raise UserError(
            f"{key} bf16: this CPU ({cpu_name()}) has no native bfloat16 (AVX512-BF16 or AMX), and"
            f" emulated it runs many times slower than fp32; use {key}: auto (bf16 where native) or fp32"
        )
    return precision == "bf16"


def cpu_name() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


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
