"""Where and how the model runs: the device, the precision policy (bf16 only where it is native), the CPU
allocator tuning and the CPU's name. Shared by training, the evaluation stages, the benchmark."""

from __future__ import annotations

import ctypes
import platform
from pathlib import Path

import torch

from mnist_cnn.cli import UserError
from mnist_cnn.core import distributed


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device: 'cuda' requested but no CUDA device is available")
    if name == "cuda":
        return torch.device("cuda", distributed.local_rank())  # one GPU per torchrun process
    return torch.device(name)


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
    only where it is native; bf16 where it would be emulated (many times slower: docs/speed.md) is an error."""
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
