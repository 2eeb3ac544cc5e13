"""The preprocess stage: tensors and statistics; nothing half-replaced on bad input, a full disk or a
file in the way."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import (
    REPO,
    copy_prepared,
    error_with_a_file_in_the_way,
    file_size_limit,
    stage_error,
    write_idx,
    write_params,
    write_synthetic_mnist,
)
from mnist_cnn.cli import run_stage
from mnist_cnn.stages import preprocess


def test_writes_tensors_and_stats_and_keeps_them_on_bad_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    raw = write_synthetic_mnist(tmp_path / "data" / "raw", n_train=120, n_test=40)
    monkeypatch.chdir(tmp_path)
    run_stage(preprocess.main)
    assert capsys.readouterr().out.startswith("preprocess: 120 train / 40 test images")
    processed = tmp_path / "data" / "processed"
    train = torch.load(processed / "train.pt", weights_only=True)
    assert train["images"].dtype == torch.uint8 and train["images"].shape == (120, 28, 28)
    assert train["labels"].dtype == torch.int64
    stats = json.loads((processed / "stats.json").read_text())
    assert (stats["train_count"], stats["test_count"]) == (120, 40)
    assert abs(stats["mean"] - train["images"].double().mean().item() / 255) < 1e-12
    before = {p.name: p.read_bytes() for p in processed.iterdir()}

    # New, different training images but test labels out of range: nothing may be replaced.
    write_idx(raw / "train-images-idx3-ubyte", np.zeros((120, 28, 28), dtype=np.uint8))
    write_idx(raw / "t10k-labels-idx1-ubyte", np.full(40, 11, dtype=np.uint8))
    assert stage_error(preprocess.main, capsys) == "error: test labels: values must be 0-9, found 11"
    assert {p.name: p.read_bytes() for p in processed.iterdir()} == before


def test_full_disk_while_preprocessing_is_one_error_line(
    prepared: Path, small_mnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, in_process
) -> None:
    work = tmp_path / "work"
    shutil.copytree(prepared / "data" / "raw", work / "data" / "raw")
    write_params(work, small_mnist)
    monkeypatch.chdir(work)
    with file_size_limit(64 * 1024):  # train.pt is ~320 kB
        line = stage_error(preprocess.main, capsys)
    assert line == "error: cannot write data/processed/train.pt: File too large", line
    assert list((work / "data" / "processed").iterdir()) == []  # no partial file, no temp file


def test_a_file_where_data_processed_should_be_is_one_error_line(
    prepared, small_mnist, tmp_path, capsys, in_process
) -> None:
    work = copy_prepared(prepared, tmp_path / "work", small_mnist)
    line = error_with_a_file_in_the_way(preprocess.main, work, "data/processed", capsys)
    assert line.startswith("error: cannot write data/processed/train.pt: "), line
