"""The ablation summary's robustness part, over a real MLflow store with runs of known results."""

from __future__ import annotations

from pathlib import Path

import mlflow
from scipy import stats

from mnist_cnn.tools import ablation


def test_paired_robustness_differences_and_the_worst_vs_best_table(mlflow_store: str, tmp_path: Path) -> None:
    on_rot, off_rot = [0.90, 0.92, 0.91], [0.60, 0.65, 0.55]
    for seed in range(3):
        for augment, rot in ((True, on_rot[seed]), (False, off_rot[seed])):
            with mlflow.start_run(experiment_id=mlflow_store):
                mlflow.log_params({"augment": augment, "seed": seed})
                mlflow.log_metrics({"test_accuracy": 0.99, "test_loss": 0.03, "train_loss": 0.02}, step=1)
                mlflow.log_metrics({
                    "robust_rotation_20": rot, "robust_rotation_cw20": rot, "robust_rotation_ccw20": rot,
                    "robust_shift_4": 0.5 + 0.1 * augment + 0.01 * seed, "robust_shift_x_4": 0.5,
                    "robust_fog": 0.8 - 0.01 * seed,
                })  # fmt: skip

    ablation.main(["--out", str(tmp_path / "out")])
    text = (tmp_path / "out" / "ablation.md").read_text()
    expected = stats.ttest_rel(on_rot, off_rot)
    ci = expected.confidence_interval()
    row = next(line for line in text.splitlines() if line.startswith("| robust_rotation_20 |"))
    assert f"[{100 * ci.low:+.2f}, {100 * ci.high:+.2f}]" in row and f"{expected.pvalue:.2g}" in row
    assert "| robust_fog | 79.00 ± 1.00 | 79.00 ± 1.00 | +0.00 |" in text  # no difference, no spread
    assert "| rotation ±20 degrees | 90.00 (n=3) | 65.00 (n=3) | yes |" in text
    assert "| shift 4 pixels | 60.00 (n=3) | 52.00 (n=3) | yes |" in text
    assert (tmp_path / "out" / "ablation_robustness.png").read_bytes().startswith(b"\x89PNG")
