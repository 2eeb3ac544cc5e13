"""The ablation summary over a real MLflow store filled with runs of known results."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from mnist_cnn.cli import UserError
from mnist_cnn.tools import ablation


def log_run(experiment_id: str, augment: bool, seed: int, accuracies: list[float], confused_4_9: int) -> str:
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_params({"augment": augment, "seed": seed, "train.lr": 0.001})
        for epoch, acc in enumerate(accuracies, 1):
            mlflow.log_metrics({"test_accuracy": acc, "test_loss": 1 - acc, "train_loss": 0.5 / epoch}, step=epoch)
        matrix = [[0] * 10 for _ in range(10)]
        matrix[4][9], matrix[9][4] = confused_4_9, 1
        rows = ["true\\predicted," + ",".join(map(str, range(10)))]
        rows += [f"{d}," + ",".join(map(str, row)) for d, row in enumerate(matrix)]
        mlflow.log_text("\n".join(rows) + "\n", "reports/confusion_counts.csv")
        return run.info.run_id


def test_groups_means_and_paired_difference(mlflow_store: str, tmp_path: Path) -> None:
    # Final accuracies: on = 0.99, 0.99, 0.99; off = 0.98, 0.97, 0.96 -> differences 0.01, 0.02, 0.03.
    for seed, off in enumerate([0.98, 0.97, 0.96]):
        log_run(mlflow_store, True, seed, [0.97, 0.99], confused_4_9=2)
        log_run(mlflow_store, False, seed, [0.97, off], confused_4_9=5)
    with mlflow.start_run(experiment_id=mlflow_store) as failed:
        mlflow.log_param("augment", True)
    mlflow.MlflowClient().set_terminated(failed.info.run_id, "FAILED")  # not FINISHED: ignored

    ablation.main(["--out", str(tmp_path / "out")])
    text = (tmp_path / "out" / "ablation.md").read_text()
    assert "## augment=False (3 runs)" in text and "## augment=True (3 runs)" in text
    assert "| 2 | 97.00 ± 1.00 |" in text  # off, epoch 2: mean 0.97, sample std 0.01
    assert "| 2 | 99.00 ± 0.00 | 0.0100 ± 0.0000 | 0.2500 ± 0.0000 |" in text
    # mean 2 points; t(0.975, 2) = 4.303, sem = 1/sqrt(3) points -> half-width 2.484
    assert "+2.000 points, 95% CI [-0.484, +4.484]" in text
    assert "runs [6, 6, 6]" in text and "runs [3, 3, 3]" in text  # 4<->9 confusions, both directions
    assert (tmp_path / "out" / "ablation.png").read_bytes().startswith(b"\x89PNG")

    summary = mlflow.search_runs([mlflow_store], "tags.`mnist_cnn.kind` = 'ablation-summary'", output_format="list")
    assert len(summary) == 1
    assert summary[0].data.metrics["augment_diff_mean"] == pytest.approx(0.02)

    # A second summary ignores the first one's run; --knob names the side measured and its baseline
    # as params.yaml spells them (false matches MLflow's "False").
    ablation.main(["--out", str(tmp_path / "out2"), "--knob", "augment=false,true"])
    text = (tmp_path / "out2" / "ablation.md").read_text()
    assert "## augment=False (3 runs)" in text and "**augment=false - augment=true**" in text
    assert "-2.000 points, 95% CI [-4.484, +0.484]" in text


@pytest.mark.parametrize("knob", ["augment", "augment=true,", "=a,b", "augment=a,b,c"])
def test_a_knob_needs_a_key_and_two_values(knob: str) -> None:  # refused before any store is opened
    with pytest.raises(UserError, match="--knob: expected KEY=A,B"):
        ablation.main(["--knob", knob])


def test_no_runs_is_a_user_error(mlflow_store: str) -> None:
    with pytest.raises(UserError, match="no finished runs"):
        ablation.main([])
