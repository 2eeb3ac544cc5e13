"""predict (src/mnist_cnn/serving/predict.py): MNIST-style preprocessing, errors, and the CLI on drawn digits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps
from scipy import ndimage

from helpers import tool_env
from mnist_cnn.cli import UserError, run_stage
from mnist_cnn.core.picture import read_image, to_mnist
from mnist_cnn.serving.predict import main

CENTRE = 13.5  # centre of a 28x28 field in pixel-index coordinates


def draw_zero(size: tuple[int, int] = (300, 200), box: tuple[int, int, int, int] = (30, 20, 110, 170)) -> Image.Image:
    """A large dark '0' drawn with line segments, far off-centre on white paper."""
    image = Image.new("L", size, 255)
    x0, y0, x1, y1 = box
    t = np.linspace(0, 2 * np.pi, 60)
    points = [((x0 + x1) / 2 + (x1 - x0) / 2 * np.cos(a), (y0 + y1) / 2 + (y1 - y0) / 2 * np.sin(a)) for a in t]
    ImageDraw.Draw(image).line(points, fill=0, width=12, joint="curve")
    return image


def draw_seven(size: tuple[int, int] = (400, 300)) -> Image.Image:
    image = Image.new("L", size, 230)  # greyish paper, grey pencil
    ImageDraw.Draw(image).line([(250, 40), (370, 40), (290, 280)], fill=90, width=9, joint="curve")
    return image


def ink_box(field: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(field)
    return rows.min(), rows.max(), cols.min(), cols.max()


def test_dark_on_light_off_centre_digit_becomes_mnist_like() -> None:
    field = to_mnist(draw_zero())
    assert field.shape == (28, 28)
    assert field.dtype == np.uint8
    assert field[0].max() == field[-1].max() == field[:, 0].max() == field[:, -1].max() == 0  # dark background
    assert field.max() == 255  # bright ink
    top, bottom, left, right = ink_box(field)
    assert min(top, left) >= 4 and max(bottom, right) <= 23  # within the central 20x20
    assert bottom - top + 1 in (19, 20, 21)  # the taller side fills the 20 px box
    com_y, com_x = ndimage.center_of_mass(field.astype(np.float64))
    assert abs(com_y - CENTRE) <= 1 and abs(com_x - CENTRE) <= 1
    assert field[14, 14] == 0  # the hole of the zero survives


def test_asymmetric_digit_on_grey_paper_is_centred_by_mass_and_full_strength() -> None:
    field = to_mnist(draw_seven())
    top, bottom, left, right = ink_box(field)
    assert max(bottom - top, right - left) + 1 in (19, 20, 21)
    com_y, com_x = ndimage.center_of_mass(field.astype(np.float64))
    assert abs(com_y - CENTRE) <= 1 and abs(com_x - CENTRE) <= 1
    assert field.max() == 255  # faint pencil on grey paper is stretched to MNIST's contrast
    assert field[0].max() == 0


@pytest.mark.parametrize("pen", [2, 6])
def test_thin_pen_on_a_large_picture_keeps_an_mnist_stroke(pen: int) -> None:
    picture = Image.new("L", (800, 600), 255)
    ImageDraw.Draw(picture).line([(300, 50), (600, 50), (400, 550)], fill=0, width=pen)
    field = to_mnist(picture)
    # Scaled down 25x, the pen would be a faint trace of ~15 bright pixels; MNIST's 7s have 55-135.
    assert (field > 127).sum() >= 50
    stroke = 2 * np.percentile(ndimage.distance_transform_edt(field > 127)[field > 127], 95)
    assert stroke >= 2


def test_light_on_dark_is_not_inverted() -> None:
    dark_on_light = draw_zero()
    light_on_dark = ImageOps.invert(dark_on_light)
    field = to_mnist(light_on_dark)
    assert field[0].max() == 0 and field.max() == 255
    np.testing.assert_array_equal(field, to_mnist(dark_on_light))  # same picture whichever the polarity


@pytest.mark.parametrize("fill", [255, 0, 128])
def test_uniform_image_has_no_ink(fill: int) -> None:
    with pytest.raises(UserError, match="no ink"):
        to_mnist(Image.new("L", (120, 80), fill), "blank.png")


def test_faint_noise_is_not_ink() -> None:
    noise = np.random.default_rng(0).integers(240, 256, size=(64, 64), dtype=np.uint8)
    with pytest.raises(UserError, match=r"noise\.png: no ink"):
        to_mnist(Image.fromarray(noise), "noise.png")


def test_transparent_png_is_read_as_ink_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (200, 200), (0, 0, 0, 0))  # transparent black: would read as all-black
    ImageDraw.Draw(rgba).line([(100, 20), (100, 180)], fill=(0, 0, 0, 255), width=14)
    rgba.save(tmp_path / "one.png")
    field = to_mnist(read_image(str(tmp_path / "one.png")))
    assert field.max() == 255 and field[0].max() == 0
    top, bottom, left, right = ink_box(field)
    assert bottom - top + 1 >= 19 and right - left + 1 <= 6  # a tall thin stroke


def test_cli_errors_are_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    good = tmp_path / "zero.png"
    draw_zero().save(good)
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


def test_human_output(mnist_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "zero.png"
    draw_zero().save(path)
    main(["--model", str(mnist_model), str(path)])
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{path}: ") and line.endswith("%)"), line
