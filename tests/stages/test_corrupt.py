"""The corrupt stage: every curve point and corruption of params.yaml, once, on fixed test images;
the robustness stage refuses a file that predates its params."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import stage_error, write_params, write_synthetic_mnist
from mnist_cnn.core.model import Net
from mnist_cnn.data.mnist import load_processed
from mnist_cnn.evaluation import corruptions
from mnist_cnn.files import load_tensors
from mnist_cnn.paths import CORRUPTED
from mnist_cnn.stages import corrupt, download, preprocess, robustness


def test_the_sets_are_the_corruptions_of_fixed_test_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], in_process: None
) -> None:
    data = write_synthetic_mnist(tmp_path / "src", n_train=100, n_test=120)
    write_params(tmp_path, data, robustness__curve_samples=50, robustness__corruption_samples=80)
    monkeypatch.chdir(tmp_path)
    download.main()
    preprocess.main()
    corrupt.main()
    sets = load_tensors(CORRUPTED)
    images = load_processed("test")[0].squeeze(1)

    curve, pick = sets["curve_pick"], sets["corruption_pick"]
    assert len(curve) == 50 and len(pick) == 80 and len(set(pick.tolist())) == 80
    assert torch.equal(curve, pick[:50])  # one seeded permutation, cut at two lengths
    assert not torch.equal(pick, torch.arange(80))  # not the test set's first images
    # params of write_params: angles [0, 20], shifts [0, 4], scales [0.8, 1.0], four corruptions.
    expected = {"rotation -20", "rotation 0", "rotation 20", "scale 0.8", "scale 1"}
    expected |= {f"shift_{d} {k}" for d in ("x", "y", "diagonal") for k in (0, 4)}
    names = {"shot_noise", "rotate", "translate", "fog"}
    assert set(sets) == expected | names | {"curve_pick", "corruption_pick"}
    assert torch.equal(sets["rotation 20"], corruptions.moved(images[curve], degrees=20.0))
    assert torch.equal(sets["rotation 0"], images[curve]) and torch.equal(sets["shift_y 0"], images[curve])
    for name in names:
        assert sets[name].dtype == torch.uint8 and sets[name].shape == (80, 28, 28)
        assert torch.equal(sets[name], corruptions.corrupt(name, images[pick]))
    assert "\ncorrupt: 11 curve points x 50 images, 4 corruptions x 80 images, " in capsys.readouterr().out

    # params.yaml now asks for an angle the file has no images for: one line, no metrics.
    write_params(tmp_path, data, robustness__angles=[0, 35])
    (tmp_path / "models").mkdir()
    net = Net()
    torch.save({"arch": net.arch, "state_dict": net.state_dict()}, tmp_path / "models" / "model.pt")
    error = stage_error(robustness.main, capsys)
    assert "data/corrupted.pt has no images for 'rotation -35'" in error and "dvc repro corrupt" in error
    assert not (tmp_path / "metrics" / "robustness.json").exists()
