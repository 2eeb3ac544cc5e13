"""predict against careless input: damaged model files, pictures past the pixel cap, huge pictures
under it, empty stdin. Each ends in one `error:` line (exit 2) or an answer, never a traceback or a
library's warning text."""

from __future__ import annotations

import io
import struct
import sys
import tracemalloc
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from mnist_cnn.cli import run_stage
from mnist_cnn.core import picture
from mnist_cnn.core.model import Net
from mnist_cnn.core.picture import read_image, to_mnist
from mnist_cnn.serving.predict import main


def one_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """predict's main as the console script runs it: exit 2 and exactly one line, `error: ...`."""
    with pytest.raises(SystemExit) as exit_info:
        run_stage(lambda: main(argv))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """An (untrained) model.pt, the train stage's format, and a digit picture beside it."""
    net = Net()
    torch.save({"state_dict": net.state_dict(), "arch": net.arch}, tmp_path / "model.pt")
    digit = Image.new("L", (120, 120), 255)
    ImageDraw.Draw(digit).line([(60, 10), (60, 110)], fill=0, width=10)
    digit.save(tmp_path / "one.png")
    return tmp_path


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_refusal_file_is_one_line_naming_it_and_the_fix(
    model_dir: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    buffer = io.BytesIO()
    torch.save({"temperature": torch.tensor(1.0), "conv_means": torch.zeros(10, 64)}, buffer)
    whole = buffer.getvalue()
    content = {"truncated": whole[: len(whole) // 2], "garbage": b"\x00junk" * 100, "empty": b""}[damage]
    (model_dir / "refusal.pt").write_bytes(content)
    err = one_error(["--model", str(model_dir / "model.pt"), str(model_dir / "one.png")], capsys)
    assert "refusal.pt" in err and "dvc checkout --force" in err and "dvc repro" in err, err


def test_a_truncated_model_file_names_the_fix(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = model_dir / "model.pt"
    model.write_bytes(model.read_bytes()[:5000])
    err = one_error(["--model", str(model), str(model_dir / "one.png")], capsys)
    assert "model.pt" in err and "dvc checkout --force" in err and "dvc repro" in err, err


def test_empty_stdin_is_named_as_such(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    err = one_error(["--model", str(model_dir / "model.pt"), "-"], capsys)
    assert "stdin is empty" in err and "BytesIO" not in err, err


def test_stdin_that_is_not_a_picture_does_not_show_python_objects(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"hello, not a picture")))
    err = one_error(["--model", str(model_dir / "model.pt"), "-"], capsys)
    assert err.startswith("error: -: ") and "object at 0x" not in err, err


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height greyscale pixels and whose data is one empty row:
    what a picture bomb looks like before it is decoded (a few dozen bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [12_000, 30_000])
def test_a_picture_past_the_pixel_cap_is_refused_without_warnings(
    tmp_path: Path, side: int, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(side, side))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        err = one_error(["--model", str(tmp_path / "unused.pt"), str(path)], capsys)
    assert not caught, [str(w.message) for w in caught]
    assert f"{side}x{side}" in err and f"{picture.MAX_PIXELS:,}" in err, err
    assert "DecompressionBomb" not in err


def test_a_large_picture_under_the_cap_is_read_small_and_without_a_float_copy(tmp_path: Path) -> None:
    side = 5_000  # 25M pixels: under the cap; a float32 copy would be 100 MB
    big = Image.new("L", (side, side), 255)
    ImageDraw.Draw(big).line([(2500, 500), (2500, 4500)], fill=0, width=300)
    path = tmp_path / "big.png"
    big.save(path)
    del big
    tracemalloc.start()
    try:
        image = read_image(str(path))
        field = to_mnist(image)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert max(image.size) <= picture.MAX_SIDE
    assert peak < 40 * 2**20, peak  # numpy's arrays are traced: no full-size float copy
    rows, cols = np.nonzero(field > 127)
    assert rows.max() - rows.min() + 1 >= 19 and cols.max() - cols.min() + 1 <= 6  # still a tall thin one
