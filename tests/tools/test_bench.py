"""The benchmark runs both loops and ends with well-formed JSON (no speed thresholds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, stage_error, tool_env, write_params, write_synthetic_mnist
from mnist_cnn.stages import download, preprocess
from mnist_cnn.tools import bench

BENCH_ARGS = ["--device", "cpu", "--subset", "1024", "--workers", "1", "--repeats", "1"]


# The README's preset, with fewer epochs than the bench runs passes (a one-cycle schedule
# refuses steps beyond its plan, so the bench must plan for its own passes).
PRESET = {
    "model__batchnorm": True,
    "model__dropout": 0.1,
    "model__depth": 3,
    "train__lr_schedule": "onecycle",
    "train__lr": 0.01,
    "train__epochs": 1,
}


# A real process: the reference loop's DataLoader workers and the bench's thread and allocator
# settings must not be left in the test process. The preset, because it covers more of the bench
# than the report's model (a third block, BatchNorm, a schedule that plans its own passes).
@pytest.mark.slow
def test_bench_prints_table_and_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = write_synthetic_mnist(tmp_path / "src", n_train=1100, n_test=100)
    write_params(tmp_path, data, **PRESET)
    monkeypatch.chdir(tmp_path)
    download.main()
    preprocess.main()
    result = subprocess.run(
        [sys.executable, "-m", "mnist_cnn.tools.bench", *BENCH_ARGS],
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("loop")
    for row in lines[1:3]:  # reference, project: the median, then the rate of each pass (1)
        assert len(row.split("   ")[-1].split()) == 1, row
    report = json.loads(lines[-1])
    for key in ("device", "reference_img_per_s", "project_img_per_s", "ratio", "peak_rss_mb"):
        assert key in report
    assert report["device"] == "cpu" and report["repeats"] == 1
    assert report["reference_img_per_s"] > 0 and report["project_img_per_s"] > 0
    # The ratio is of the unrounded rates; the printed rates are rounded to 0.1 img/s.
    assert report["ratio"] == pytest.approx(report["project_img_per_s"] / report["reference_img_per_s"], abs=0.011)


@pytest.mark.parametrize(("args", "option"), [(["--subset", "10"], "--subset"), (["--repeats", "0"], "--repeats")])
def test_bench_rejects_a_tiny_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args: list[str], option: str
) -> None:
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    assert stage_error(lambda: bench.main(args), capsys).startswith(f"error: {option} ")
