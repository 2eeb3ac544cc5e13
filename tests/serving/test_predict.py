"""predict (src/mnist_cnn/serving/predict.py): digits answered and non-digits refused with a reason, in
JSON and in text; one-line errors; a checkpoint with pickled code refused; the CLI on drawn digits with a
model trained on real MNIST. (The picture preparation is tested in tests/core/test_picture.py.)"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from helpers import RunsACommand, stage_error, tool_env
from mnist_cnn.cli import run_stage
from mnist_cnn.core import refusal
from mnist_cnn.core.model import Net
from mnist_cnn.core.picture import MAX_PIXELS, read_image, to_mnist
from mnist_cnn.serving.predict import main


def typed_digit(digit: int, tmp_path: Path) -> Path:
    """A digit as the training set draws it (the same font), but large and dark on white paper."""
    picture = Image.new("L", (160, 120), 255)
    ImageDraw.Draw(picture).text((50, 10), str(digit), fill=0, font=ImageFont.load_default(size=90))
    path = tmp_path / f"digit-{digit}.png"
    picture.save(path)
    return path


def not_digits(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    pictures = {
        "noise": Image.fromarray(rng.integers(0, 256, size=(64, 64), dtype=np.uint8)),
        "grey-noise": Image.fromarray(rng.integers(100, 256, size=(120, 90), dtype=np.uint8)),
        "blank": Image.new("L", (50, 50), 255),
        "faint": Image.fromarray(rng.integers(240, 256, size=(64, 64), dtype=np.uint8)),
    }
    paths = {}
    for name, picture in pictures.items():
        paths[name] = tmp_path / f"{name}.png"
        picture.save(paths[name])
    return paths


def test_predict_refuses_noise_and_blank_and_answers_digits_in_json(
    font_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    refused = not_digits(tmp_path)
    digits = {d: typed_digit(d, tmp_path) for d in (2, 3, 7)}
    files = [str(refused["noise"]), str(digits[2]), str(refused["blank"]), str(digits[3]), str(refused["faint"])]
    files += [str(refused["grey-noise"]), str(digits[7])]
    main(["--model", str(font_model / "model.pt"), "--json", *files])  # one blank picture does not stop the others
    answers = {a["file"]: a for a in map(json.loads, capsys.readouterr().out.splitlines())}
    assert list(answers) == files
    for name in ("noise", "grey-noise"):
        answer = answers[str(refused[name])]
        assert answer["digit"] is None and answer["probability"] is None, answer
        assert answer["reason"].startswith("not a digit"), answer
    for name in ("blank", "faint"):
        assert answers[str(refused[name])] == {
            "file": str(refused[name]),
            "digit": None,
            "probability": None,
            "reason": refusal.BLANK,
        }
    for digit, path in digits.items():
        assert answers[str(path)]["digit"] == digit and answers[str(path)]["reason"] is None, answers[str(path)]
        assert 0.1 <= answers[str(path)]["probability"] <= 1


def test_predict_text_says_refused_with_the_reason(
    font_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    refused = not_digits(tmp_path)
    seven = typed_digit(7, tmp_path)
    main(["--model", str(font_model / "model.pt"), str(refused["noise"]), str(refused["blank"]), str(seven)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{refused['noise']}: refused: not a digit (")
    assert lines[1] == f"{refused['blank']}: refused: {refusal.BLANK}"
    assert lines[2].startswith(f"{seven}: 7 (") and lines[2].endswith("%)")


def test_a_solid_shape_is_refused(font_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    square, disc = Image.new("L", (100, 100), 255), Image.new("L", (120, 90), 230)
    ImageDraw.Draw(square).rectangle((20, 25, 80, 85), fill=0)
    ImageDraw.Draw(disc).ellipse((15, 10, 100, 80), fill=40)
    square.save(tmp_path / "square.png")
    disc.save(tmp_path / "disc.png")
    main(["--model", str(font_model / "model.pt"), "--json", str(tmp_path / "square.png"), str(tmp_path / "disc.png")])
    for line in capsys.readouterr().out.splitlines():
        answer = json.loads(line)
        assert answer["digit"] is None and answer["reason"].startswith("not a digit"), answer


def test_cli_errors_are_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    good = typed_digit(0, tmp_path)
    cases = [
        ([str(not_an_image)], "notes.png: cannot read as an image"),
        ([str(tmp_path / "missing.jpg")], "missing.jpg: cannot read as an image"),
        (["--model", str(tmp_path / "nope.pt"), str(good)], "nope.pt: no such model file"),
        (["--model", str(not_an_image), str(good)], "notes.png: not a model.pt checkpoint"),
        (["-", "-"], "'-' (stdin) can be given only once"),
    ]
    for argv, expected in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_stage(lambda argv=argv: main(argv))
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected in err, err
        assert err.count("\n") == 1


def test_a_checkpoint_with_pickled_code_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, in_process
) -> None:
    """--model PATH is any file the user was given: weights_only loading must refuse code, and say so
    plainly (torch's own message advises retrying with weights_only=False)."""
    marker = tmp_path / "payload-ran"
    torch.save({"state_dict": Net().state_dict(), "extra": RunsACommand(marker)}, tmp_path / "model.pt")
    typed_digit(1, tmp_path)
    monkeypatch.chdir(tmp_path)
    line = stage_error(lambda: main(["--model", "model.pt", "digit-1.png"]), capsys)
    assert line == "error: model.pt: refused to load: it holds pickled objects besides weights"
    assert not marker.exists()


# --- end to end: a model trained briefly on real MNIST, digits drawn unlike MNIST ---


@pytest.fixture(scope="module")
def mnist_model(tmp_path_factory: pytest.TempPathFactory, mnist_net: torch.nn.Module) -> Path:
    """conftest's model trained briefly on real MNIST, as a checkpoint file."""
    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.save({"state_dict": mnist_net.state_dict(), "arch": mnist_net.arch}, path)
    return path


def drawn_digits() -> dict[int, Image.Image]:
    """Digits as a person might draw or type them: big, thick, off-centre, dark on a 200x150 white canvas."""
    pictures: dict[int, Image.Image] = {}
    zero = Image.new("L", (200, 150), 255)
    ImageDraw.Draw(zero).ellipse((20, 15, 85, 135), outline=20, width=11)
    pictures[0] = zero
    one = Image.new("L", (200, 150), 255)
    ImageDraw.Draw(one).line([(130, 30), (150, 12), (150, 140)], fill=0, width=12, joint="curve")
    pictures[1] = one
    seven = Image.new("L", (200, 150), 240)
    ImageDraw.Draw(seven).line([(95, 20), (180, 20), (125, 140)], fill=40, width=13, joint="curve")
    pictures[7] = seven
    font = ImageFont.load_default(size=120)
    for digit, (x, y) in ((3, (110, 5)), (2, (15, 20))):
        picture = Image.new("L", (200, 150), 255)
        ImageDraw.Draw(picture).text((x, y), str(digit), fill=0, font=font)
        pictures[digit] = picture
    return pictures


def test_cli_reads_drawn_digits(mnist_model: Path, tmp_path: Path) -> None:
    files = []
    for digit, picture in drawn_digits().items():
        path = tmp_path / f"drawn-{digit}.{'jpg' if digit == 7 else 'png'}"
        picture.save(path)
        files.append(path)
    stdin_bytes = files[-1].read_bytes()  # the last one also goes in through stdin
    shown = tmp_path / "shown"
    command = [sys.executable, "-m", "mnist_cnn.serving.predict", "--model", str(mnist_model), "--json"]
    command += ["--show-input", str(shown), *map(str, files), "-"]
    result = subprocess.run(
        command, input=stdin_bytes, capture_output=True, env=tool_env(), timeout=120, cwd=tmp_path, check=False
    )
    assert result.returncode == 0, result.stderr.decode()
    answers = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert [a["file"] for a in answers] == [*map(str, files), "-"]
    for answer in answers:
        assert set(answer) == {"file", "digit", "probability", "reason"}
        assert isinstance(answer["digit"], int) and 0 <= answer["digit"] <= 9
        assert 0.1 <= answer["probability"] <= 1.0  # the arg-max of 10 probabilities is at least 0.1
    assert answers[-1] == {**answers[-2], "file": "-"}  # stdin gives the same answer as the file

    truth = [int(path.stem.split("-")[1]) for path in files]
    right = sum(a["digit"] == t for a, t in zip(answers, truth, strict=False))
    print()
    for answer, t in zip(answers, [*truth, truth[-1]], strict=True):
        print(f"  {Path(answer['file']).name} (drawn {t}) -> {answer['digit']} ({answer['probability']:.1%})")
    assert right >= 3, answers

    saved = sorted(p.name for p in shown.iterdir())
    assert saved == sorted([*(p.stem + ".png" for p in files), "stdin.png"])
    with Image.open(shown / f"{files[0].stem}.png") as picture:
        assert picture.size == (280, 280)
        small = np.asarray(picture.resize((28, 28), Image.Resampling.NEAREST))
    np.testing.assert_array_equal(small, to_mnist(read_image(str(files[0]))))


# Careless input: damaged model files, pictures past the pixel cap, empty stdin. Each ends in one
# `error:` line (exit 2), never a traceback or a library's warning text.


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
    assert f"{side}x{side}" in err and f"{MAX_PIXELS:,}" in err, err
    assert "DecompressionBomb" not in err
