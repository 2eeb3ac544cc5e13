"""The robustness stage: bad params, and its metrics in the pipeline, MLflow and `dvc exp show`."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import yaml

from helpers import REPO, run
from mnist_cnn import robustness
from mnist_cnn.config import CORRUPTIONS, run_stage


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


def test_the_stage_runs_in_the_pipeline_and_reaches_mlflow_and_dvc(pipeline: Path) -> None:
    metrics = json.loads((pipeline / "metrics" / "robustness.json").read_text())
    names = yaml.safe_load((pipeline / "params.yaml").read_text())["robustness"]["corruptions"]
    assert {f"robust_{n}" for n in names} <= set(metrics)
    mean = sum(metrics[f"robust_{n}"] for n in names) / len(names)
    assert metrics["robust_mean_accuracy"] == pytest.approx(mean, abs=1e-5)
    assert metrics["robust_degradation"] == pytest.approx(metrics["robust_clean"] - mean, abs=1e-5)
    for curve in ("rotation", "shift", "scale"):
        assert (pipeline / "plots" / f"robustness_{curve}.csv").read_text().count("\n") > 2
    assert (pipeline / "robustness" / "examples.png").stat().st_size > 0

    # Every pipeline run (repro and the --temp augment=false one) logged its robust_ metrics.
    mlflow.set_tracking_uri(f"sqlite:///{pipeline / 'mlruns' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["mnist-cnn"], output_format="list")
    assert len(runs) >= 2 and all("robust_mean_accuracy" in r.data.metrics for r in runs)
    assert all("robust_rotation_ccw20" in r.data.metrics and "robust_shift_x_4" in r.data.metrics for r in runs)

    shown = json.loads(run(["dvc", "exp", "show", "--json"], pipeline).stdout)
    found = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "data" in node.get("metrics/robustness.json", {}):  # not in the commit before the first repro
                found.append(node["metrics/robustness.json"]["data"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(shown)
    assert len(found) >= 2 and all("robust_mean_accuracy" in d for d in found)
