"""The robustness stage: bad params, and its metrics in the pipeline, MLflow and `dvc exp show`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helpers import REPO
from mnist_cnn.cli import run_stage
from mnist_cnn.config import CORRUPTIONS
from mnist_cnn.stages import robustness


def test_an_unknown_corruption_is_one_error_line_listing_the_valid_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["robustness"]["corruptions"] = ["fog", "snowstorm"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_stage(robustness.main)
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:")
    assert "snowstorm" in err and all(name in err for name in CORRUPTIONS)
    assert not (tmp_path / "metrics").exists()
