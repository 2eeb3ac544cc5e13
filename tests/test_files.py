"""Atomic writes (src/mnist_cnn/files.py): a failed write leaves the earlier file, and no temp file, behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mnist_cnn.cli import UserError
from mnist_cnn.files import atomic_path, read_int_columns, save_tensors, write_json

# --- atomic writes --------------------------------------------------------------


def test_atomic_path_replaces_on_success(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent  # same file system: the rename is atomic
        assert tmp != target
        tmp.write_text("new")
        assert target.read_text() == "old"  # not visible until the block succeeds
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_path_on_exception_keeps_old_file_and_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half-written")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_atomic_path_on_exception_creates_nothing(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "new.pt"
    with pytest.raises(KeyError), atomic_path(target):
        raise KeyError("x")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # the parent may be created, but holds no temp file


def test_atomic_path_when_the_body_deletes_the_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "x"
    target.write_text("keep")
    with pytest.raises(UserError, match=r"cannot write .*x: No such file or directory"), atomic_path(target) as tmp:
        tmp.unlink()
    assert target.read_text() == "keep"


def test_save_tensors_failure_keeps_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "train.pt"
    save_tensors(target, {"a": torch.tensor([1])})
    before = target.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - torch's pickling error type varies between versions
        save_tensors(target, {"a": lambda: None})  # type: ignore[dict-item]
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["train.pt"]


def test_write_json(tmp_path: Path) -> None:
    write_json(tmp_path / "m.json", {"accuracy": 0.5})
    assert (tmp_path / "m.json").read_text() == '{\n  "accuracy": 0.5\n}\n'


def test_atomic_path_gives_the_usual_file_mode(tmp_path: Path) -> None:
    reference = tmp_path / "plain"
    reference.write_text("x")
    with atomic_path(tmp_path / "atomic") as tmp:
        tmp.write_text("x")
    assert (tmp_path / "atomic").stat().st_mode == reference.stat().st_mode


def test_read_int_columns_by_name(tmp_path: Path) -> None:
    path = tmp_path / "confusion.csv"
    path.write_text("predicted,actual\n9,4\n7,7\n")  # found by the header, in any order
    truth, predicted = read_int_columns(path, "evaluate", "actual", "predicted")
    assert truth.tolist() == [4, 7] and predicted.tolist() == [9, 7]
    for text in ("actual,predicted\n4,nine\n", "actual,guess\n4,9\n", ""):
        path.write_text(text)
        with pytest.raises(UserError, match=r"confusion\.csv: missing or unreadable \(run evaluate first\)"):
            read_int_columns(path, "evaluate", "actual", "predicted")
    with pytest.raises(UserError, match="evaluate"):
        read_int_columns(tmp_path / "missing.csv", "evaluate", "actual")
