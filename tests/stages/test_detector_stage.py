"""The detector stage: one detector from data/processed and params.yaml's detector section (the
default), with the training images it held out; none while the refusal does not use it
(evaluate.detector_share 0); a share that holds out nothing is one line of error and no file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import stage_error, write_params, write_synthetic_mnist
from mnist_cnn.core import detector as network
from mnist_cnn.files import load_tensors
from mnist_cnn.paths import DETECTOR
from mnist_cnn.stages import detector, download, preprocess


def test_the_stage_trains_one_detector_and_keeps_its_held_out_digits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], in_process: None
) -> None:
    data = write_synthetic_mnist(tmp_path / "src", n_train=300, n_test=50)
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, data, evaluate__detector_share=0.0)  # the refusal does not use one: none is trained
    download.main()
    preprocess.main()
    detector.main()
    assert load_tensors(DETECTOR) == {}
    assert "detector: off (evaluate.detector_share is 0), not trained" in capsys.readouterr().out

    write_params(tmp_path, data, detector__steps=5, detector__negatives=40, detector__width=4)  # the default: on
    detector.main()
    saved = load_tensors(DETECTOR)
    held_out = saved.pop("held_out")
    assert len(held_out) == 100 and len(set(held_out.tolist())) == 100 and held_out.max() < 300  # a third
    each = network.members(saved)  # params.yaml's four members, trained from seeds 0, 1, 2 and 3
    assert len(each) == 4 and each[0]["conv1.weight"].shape == (4, 1, 3, 3) and each[3]["fc2.weight"].shape == (11, 64)
    assert all(not torch.equal(each[0]["conv1.weight"], other["conv1.weight"]) for other in each[1:])
    assert network.score_all(saved, torch.zeros(3, 1, 28, 28)).shape == (3,)
    assert "detector: 4 trained on 200 digits, 100 held out for the refusal's thresholds" in capsys.readouterr().out

    DETECTOR.unlink()
    write_params(tmp_path, data, detector__held_out=0.001)
    error = stage_error(detector.main, capsys)
    assert error == "error: detector.held_out (0.001) of 300 training images holds out 0"
    assert not DETECTOR.exists()
