"""The register stage (src/mnist_cnn/stages/register.py) in-process: what it needs before it writes anything.
The stage itself, against a real store after the real pipeline, is tested end to end (e2e/test_pipeline.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import stage_error, write_params
from mnist_cnn.stages import register


@pytest.mark.usefixtures("in_process")
def test_register_before_the_earlier_stages_is_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_params(tmp_path, tmp_path)
    monkeypatch.chdir(tmp_path)
    assert stage_error(register.main, capsys) == "error: metrics/eval.json: missing or unreadable (run dvc repro first)"
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/eval.json").write_text(json.dumps({"test_accuracy": 0.9}))
    (tmp_path / "metrics/robustness.json").write_text("[1, 2]")  # not the stage's flat mapping
    assert "metrics/robustness.json: missing or unreadable" in stage_error(register.main, capsys)
    (tmp_path / "metrics/robustness.json").write_text(json.dumps({"robust_mean_accuracy": 0.7}))
    assert "models/model.pt: missing or unreadable" in stage_error(register.main, capsys)
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "models").exists()  # nothing written
