"""Calibration (src/mnist_cnn/evaluation/calibration.py): the ECE of known cases, and the refusal's
temperature undoing a network's overconfidence as the ECE measures it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mnist_cnn.core import refusal
from mnist_cnn.evaluation.calibration import expected_calibration_error


def test_temperature_undoes_overconfidence() -> None:
    """Labels drawn from softmax(z) are calibrated for z; a network stating softmax(3 z) needs T = 3."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(20_000, 10, generator=generator) * 2
    labels = torch.multinomial(torch.softmax(logits, 1), 1, generator=generator).squeeze(1)
    overconfident = torch.log_softmax(3 * logits, 1)
    assert refusal.fit_temperature(overconfident, labels) == pytest.approx(3, rel=0.05)
    truth = labels.numpy()
    before = expected_calibration_error(overconfident.exp().numpy(), truth)
    after = expected_calibration_error(torch.softmax(overconfident / 3, 1).numpy(), truth)
    assert after < 0.02 < 0.1 < before


def test_ece_of_known_cases() -> None:
    labels = np.array([0, 0, 0, 0])
    sure = np.eye(10)[[0, 0, 0, 1]]  # 100% confident, right 3 times out of 4
    assert expected_calibration_error(sure, labels) == pytest.approx(0.25)
    stated = np.full((4, 10), 0.05)
    stated[[0, 1, 2, 3], [0, 0, 0, 1]] = 0.55  # 55% sure each time, right 3 times out of 4
    assert expected_calibration_error(stated, labels) == pytest.approx(0.20)
