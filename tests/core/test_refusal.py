"""Not a digit (src/mnist_cnn/serving/refusal.py, and predict's use of it): refused noise and blank pages,
answered digits, deterministic statistics, calibration helpers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from helpers import make_params, render_digits, trained_one_epoch
from mnist_cnn.core import refusal
from mnist_cnn.core.model import Net
from mnist_cnn.core.picture import to_mnist
from mnist_cnn.files import save_tensors
from mnist_cnn.paths import REFUSAL_STATS
from mnist_cnn.serving.predict import main

BUDGET = make_params().evaluate  # params.yaml's refusal budget and calibration sizes


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Net, torch.Tensor, torch.Tensor]:
    """A model trained for 1 epoch on 3,000 font-rendered digits, and its training set."""
    torch.manual_seed(0)
    images, labels = render_digits(3000, seed=0)
    images, labels = torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long()
    return trained_one_epoch(images, labels), images, labels


@pytest.fixture(scope="module")
def model_dir(trained: tuple[Net, torch.Tensor, torch.Tensor], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model.pt with evaluate's refusal.pt beside it, as `dvc repro` leaves them in models/."""
    net, images, labels = trained
    folder = tmp_path_factory.mktemp("models")
    save_tensors(folder / "model.pt", {"state_dict": net.state_dict(), "arch": net.arch})
    # MNIST is already what predict's preprocessing makes of a picture (the ink's box fitted into 20x20,
    # centred); these font digits are not, so they are fitted as predict would prepare them.
    prepared = np.stack([to_mnist(Image.fromarray(image.squeeze(0).numpy())) for image in images])
    stats = refusal.fit(net, torch.from_numpy(prepared).unsqueeze(1), labels, seed=42, budget=BUDGET)
    save_tensors(folder / REFUSAL_STATS.name, stats)
    return folder


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
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    refused = not_digits(tmp_path)
    digits = {d: typed_digit(d, tmp_path) for d in (2, 3, 7)}
    files = [str(refused["noise"]), str(digits[2]), str(refused["blank"]), str(digits[3]), str(refused["faint"])]
    files += [str(refused["grey-noise"]), str(digits[7])]
    main(["--model", str(model_dir / "model.pt"), "--json", *files])  # one blank picture does not stop the others
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
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    refused = not_digits(tmp_path)
    seven = typed_digit(7, tmp_path)
    main(["--model", str(model_dir / "model.pt"), str(refused["noise"]), str(refused["blank"]), str(seven)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{refused['noise']}: refused: not a digit (")
    assert lines[1] == f"{refused['blank']}: refused: {refusal.BLANK}"
    assert lines[2].startswith(f"{seven}: 7 (") and lines[2].endswith("%)")


def test_refusal_statistics_are_deterministic(trained: tuple[Net, torch.Tensor, torch.Tensor]) -> None:
    net, images, labels = trained
    first = refusal.fit(net, images[:600], labels[:600], seed=3, budget=BUDGET)
    again = refusal.fit(net, images[:600], labels[:600], seed=3, budget=BUDGET)
    layers = {f"{k}_{part}" for k in ("conv", "logits") for part in ("means", "precision", "threshold")}
    assert set(first) == layers | {"ink_range", "temperature"}
    for key in first:
        assert torch.equal(first[key], again[key]), key
    assert first["conv_means"].shape == (10, 64) and first["conv_precision"].shape == (64, 64)
    assert first["logits_means"].shape == (10, 10) and first["logits_precision"].shape == (10, 10)
    assert first["conv_threshold"] > 0 and first["logits_threshold"] > 0 and first["temperature"] > 0


def test_the_thresholds_cut_the_same_tail_of_each_score_and_refuse_the_rate_together() -> None:
    generator = torch.Generator().manual_seed(0)
    near, far = torch.rand(10_000, generator=generator), 1000 * torch.rand(10_000, generator=generator)
    small, large = refusal.union_thresholds([near, far], 0.02)
    # Two independent scores: each cuts about 1% (1 - 0.99^2 = 0.02), whatever its scale.
    assert (near > small).float().mean().item() == pytest.approx(0.01, abs=0.001)
    assert (far > large).float().mean().item() == pytest.approx(0.01, abs=0.001)
    assert ((near > small) | (far > large)).float().mean().item() == pytest.approx(0.02, abs=0.0002)
    # The same score twice: the union is the score, so each threshold cuts the full 2%.
    same = refusal.union_thresholds([near, near.clone()], 0.02)
    assert (near > same[0]).float().mean().item() == pytest.approx(0.02, abs=0.0002)


def test_a_solid_shape_is_refused(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    square, disc = Image.new("L", (100, 100), 255), Image.new("L", (120, 90), 230)
    ImageDraw.Draw(square).rectangle((20, 25, 80, 85), fill=0)
    ImageDraw.Draw(disc).ellipse((15, 10, 100, 80), fill=40)
    square.save(tmp_path / "square.png")
    disc.save(tmp_path / "disc.png")
    main(["--model", str(model_dir / "model.pt"), "--json", str(tmp_path / "square.png"), str(tmp_path / "disc.png")])
    for line in capsys.readouterr().out.splitlines():
        answer = json.loads(line)
        assert answer["digit"] is None and answer["reason"].startswith("not a digit"), answer


def test_answers_are_right_when_threads_share_the_net() -> None:
    """The scoring server answers concurrent requests in threads that share one net."""
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(0)
    net = Net().eval()
    images = torch.randint(0, 256, (200, 1, 28, 28), dtype=torch.uint8)
    stats = refusal.fit(net, images, torch.arange(200) % 10, seed=0, budget=BUDGET)
    batches = [torch.randn(n, 1, 28, 28) for n in (1, 16, 3, 8) * 5]
    alone = [refusal.answer(net, stats, x)[0] for x in batches]
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(lambda x: refusal.answer(net, stats, x)[0], batches))
    for a, b in zip(alone, together, strict=True):
        np.testing.assert_array_equal(a, b)
