"""The evaluate stage's refusals: a model file that is not this project's checkpoint is one error line,
runs nothing and leaves no metrics. (Evaluate's outputs are checked end to end in tests/e2e/.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import RunsACommand, copy_prepared, stage_error
from mnist_cnn.core.model import Net
from mnist_cnn.stages import evaluate


def test_evaluate_refuses_a_tampered_model_in_one_line(
    prepared: Path, small_mnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, in_process
) -> None:
    """models/model.pt replaced by a file with pickled code (or by anything else): evaluate must say so
    in one line, run nothing, and leave no metrics behind."""
    work = copy_prepared(prepared, tmp_path / "work", small_mnist)
    marker = tmp_path / "payload-ran"
    (work / "models").mkdir()
    torch.save({"state_dict": Net().state_dict(), "extra": RunsACommand(marker)}, work / "models" / "model.pt")
    monkeypatch.chdir(work)
    line = stage_error(evaluate.main, capsys)
    assert line == "error: models/model.pt: refused to load: it holds pickled objects besides weights"
    assert not marker.exists()
    (work / "models" / "model.pt").write_text("not a checkpoint")
    line = stage_error(evaluate.main, capsys)
    assert line.startswith("error: models/model.pt: not a model.pt checkpoint of this project (not a whole torch.save")
    assert "dvc checkout --force models/model.pt" in line and "dvc repro" in line
    assert not (work / "metrics").exists()
