"""One optimisation step on a batch of training-set indices, eager or as a CUDA graph.

The training set stays on the device as uint8; a step gathers, augments (one affine grid + sample for the
batch), normalises, runs forward, NLLLoss, backward and Adam, and adds the loss to a sum on the device, so
the host never waits inside an epoch. With `train.cuda_graph` on CUDA the step is captured once and
replayed; the epoch's last, shorter batch runs eagerly through the same model and optimizer."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from mnist_cnn.core.augment import Extras, geometric, photometric
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
        consistency: float = 0.0,
    ) -> None:
        self.net = model  # the bare network: evaluate and save this one
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.rank, self.world = rank, world
        self.images, self.labels = images, labels
        self.augment, self.bf16, self.batch_size = augment, bf16, batch_size
        self.extras = extras or Extras()
        self.consistency = consistency if augment else 0.0
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
            x = geometric(x, self.generator, self.extras)
            if self.consistency:  # AugMix: the geometric view itself and two photometric views, one batch
                x = torch.cat(
                    [x, photometric(x, self.generator, self.extras), photometric(x, self.generator, self.extras)]
                )
            else:
                x = photometric(x, self.generator, self.extras)
        x = standardize(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # cache_enabled=False: a graph must recast the weights on every replay, not reuse stale copies.
        autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False) if self.bf16 else nullcontext()
        )
        with autocast:
            log_probs = self.model(x)
        # The loss recorded is the classification loss alone, comparable with and without consistency.
        loss = mean_nll(log_probs[: index.numel()], self.labels[index])
        total = loss + self.consistency * jensen_shannon(log_probs.float().chunk(3)) if self.consistency else loss
        self.optimizer.zero_grad(set_to_none=not self.use_graph)  # graphs need stable grad buffers
        total.backward()
        self.optimizer.step()
        loss = loss.detach().float()
        self.loss_sum += loss * index.numel()
        # Remember the epoch's first step with a NaN or infinite loss, without a host sync.
        self.steps += 1
        bad = ~torch.isfinite(total.detach()) & (self.first_bad_step < 0)
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


def jensen_shannon(log_probs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The Jensen-Shannon divergence among the predictions of several views of the same images (each
    (N, C) log-probabilities), mean over the batch: AugMix's consistency loss (Hendrycks et al. 2020),
    which pulls the photometric views' predictions towards each other and the clean view's."""
    mixture = torch.stack([p.exp() for p in log_probs]).mean(0).clamp(1e-7, 1).log()
    return sum(F.kl_div(mixture, p, reduction="batchmean", log_target=True) for p in log_probs) / len(log_probs)


def mean_nll(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """NLLLoss, mean over the batch. CUDA's NLLLoss raises under deterministic algorithms (which
    train.deterministic turns on); then the same mean is a gather, which has a deterministic kernel."""
    if torch.are_deterministic_algorithms_enabled():
        return -log_probs.float().gather(1, labels[:, None]).mean()
    return F.nll_loss(log_probs, labels)
