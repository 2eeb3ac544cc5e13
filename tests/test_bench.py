"""The benchmark runs both loops and ends with well-formed JSON (no speed thresholds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import REPO, tool_env, write_synthetic_mnist


def test_bench_prints_table_and_json(tmp_path: Path) -> None:
    data = write_synthetic_mnist(tmp_path / "src", n_train=2200, n_test=100)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(mirrors=[], npm_package="", source_dir=str(data), verify_sha256=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = tool_env()
    for stage in ("download", "preprocess"):
        subprocess.run([sys.executable, "-m", f"mnist_cnn.{stage}"], cwd=tmp_path, env=env, check=True)
    result = subprocess.run(
        [sys.executable, "-m", "mnist_cnn.bench", "--device", "cpu", "--subset", "2048", "--workers", "1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("loop")
    report = json.loads(lines[-1])
    for key in ("device", "reference_img_per_s", "project_img_per_s", "ratio", "peak_rss_mb"):
        assert key in report
    assert report["device"] == "cpu"
    assert report["reference_img_per_s"] > 0 and report["project_img_per_s"] > 0
    assert report["ratio"] == round(report["project_img_per_s"] / report["reference_img_per_s"], 2)


def test_bench_rejects_a_tiny_subset(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    result = subprocess.run(
        [sys.executable, "-m", "mnist_cnn.bench", "--subset", "10"],
        cwd=tmp_path,
        env=tool_env(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: --subset")
