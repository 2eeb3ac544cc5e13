"""Where and how the model runs (src/mnist_cnn/core/runtime.py): the device, and the precision policy
(bf16 only where the CPU computes it natively; emulated bf16 is refused)."""

from __future__ import annotations

import platform

import pytest
import torch

from mnist_cnn.cli import UserError
from mnist_cnn.core.runtime import pick_device, use_bf16


def test_pick_device() -> None:
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match=r"train\.device"):
            pick_device("cuda")


def test_auto_picks_bf16_only_where_native_and_emulated_bf16_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    for native in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda native=native: native)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
        assert use_bf16("auto", cpu, "train.precision") is native
        assert use_bf16("fp32", cpu, "train.precision") is False
        if native:
            assert use_bf16("bf16", cpu, "train.precision") is True
        else:
            with pytest.raises(UserError, match=r"^robustness.precision bf16: this CPU \(.+\) has no native bfloat16"):
                use_bf16("bf16", cpu, "robustness.precision")
    # ATen limited to AVX2 (as ATEN_CPU_CAPABILITY=avx2 does) emulates bf16 even on a CPU that has it.
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert use_bf16("auto", cpu, "train.precision") is False
    with pytest.raises(UserError, match=r"use train.precision: auto \(bf16 where native\) or fp32$"):
        use_bf16("bf16", cpu, "train.precision")


def test_other_cpus_are_not_second_guessed(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU this check does not know (not x86), bf16 asked for is bf16 given."""
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert use_bf16("bf16", torch.device("cpu"), "train.precision") is True
    assert use_bf16("auto", torch.device("cpu"), "train.precision") is False
