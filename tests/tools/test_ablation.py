"""tools/ablation.py: the summary over a real MLflow store holding sweeps (parent runs, as tools.sweep
opens them) whose child runs, made through MLflow's API as the pipeline makes them, have known results."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from scipy import stats

from mnist_cnn.cli import UserError
from mnist_cnn.tools import ablation, sweep


def open_sweep(experiment_id: str, knob: str = "augment=true,false", seeds: str = "0,1,2") -> str:
    """A sweep's parent run, as tools.sweep creates it (its experiments then run as its children)."""
    with sweep.start_parent(experiment_id, knob, sweep.sweep_params(knob, seeds, []), []) as run:
        return run.info.run_id


def curve_csvs(rotation: float, shift: float) -> dict[str, str]:
    """The robustness stage's plots/robustness_*.csv (its columns) with the given accuracies at the
    headline sizes and 0.99 elsewhere."""
    rows = [f"{d},{rotation if abs(d) == 20 else 0.99},0.01" for d in (-20, 0, 20)]
    shifts = [f"{k},{shift if k == 4 else 0.99},0.01,0.99,0.01,0.98,0.01" for k in (0, 4)]
    return {
        "robustness_rotation.csv": "\n".join(["degrees,accuracy,se", *rows]) + "\n",
        "robustness_shift.csv": "\n".join(["pixels,x,x_se,y,y_se,diagonal,diagonal_se", *shifts]) + "\n",
        "robustness_scale.csv": "factor,accuracy,se\n0.8,0.9,0.01\n1.0,0.99,0.01\n",
    }


def log_run(
    experiment_id: str,
    parent: str | None,
    params: dict[str, object],
    accuracies: list[float],
    confused_4_9: int | None = None,
    robust: dict[str, float] | None = None,
    curves: dict[str, str] | None = None,
) -> str:
    """One pipeline run: per-epoch curves, and optionally the confusion table, robust_* metrics and
    the robustness curves' CSV artifacts."""
    with mlflow.start_run(experiment_id=experiment_id, parent_run_id=parent) as run:
        mlflow.log_params(params)
        for epoch, acc in enumerate(accuracies, 1):
            mlflow.log_metrics({"test_accuracy": acc, "test_loss": 1 - acc, "train_loss": 0.5 / epoch}, step=epoch)
        if confused_4_9 is not None:
            matrix = [[0] * 10 for _ in range(10)]
            matrix[4][9], matrix[9][4] = confused_4_9, 1
            rows = ["true\\predicted," + ",".join(map(str, range(10)))]
            rows += [f"{d}," + ",".join(map(str, row)) for d, row in enumerate(matrix)]
            mlflow.log_text("\n".join(rows) + "\n", "reports/confusion_counts.csv")
        mlflow.log_metrics(robust or {})
        for name, text in (curves or {}).items():
            mlflow.log_text(text, f"plots/{name}")
        return run.info.run_id


def test_groups_means_and_paired_difference(mlflow_store: str, tmp_path: Path) -> None:
    # Final accuracies: on = 0.99, 0.99, 0.99; off = 0.98, 0.97, 0.96 -> differences 0.01, 0.02, 0.03.
    parent = open_sweep(mlflow_store)
    for seed, off in enumerate([0.98, 0.97, 0.96]):
        log_run(mlflow_store, parent, {"augment": True, "seed": seed, "train.lr": 0.001}, [0.97, 0.99], 2)
        log_run(mlflow_store, parent, {"augment": False, "seed": seed, "train.lr": 0.001}, [0.97, off], 5)
    with mlflow.start_run(experiment_id=mlflow_store, parent_run_id=parent) as failed:
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
    assert not (tmp_path / "out" / "ablation_robustness.png").exists()  # no run has robustness curves

    summary = mlflow.search_runs([mlflow_store], "tags.`mnist_cnn.kind` = 'ablation-summary'", output_format="list")
    assert len(summary) == 1
    assert summary[0].data.metrics["augment_diff_mean"] == pytest.approx(0.02)
    assert summary[0].data.tags["mlflow.parentRunId"] == parent  # filed under its sweep

    # A second summary ignores the first one's run; --knob names the side measured and its baseline
    # as params.yaml spells them (false matches MLflow's "False").
    ablation.main(["--out", str(tmp_path / "out2"), "--knob", "augment=false,true"])
    text = (tmp_path / "out2" / "ablation.md").read_text()
    assert "## augment=False (3 runs)" in text and "**augment=false - augment=true**" in text
    assert "-2.000 points, 95% CI [-4.484, +0.484]" in text


def test_each_sweeps_summary_reads_only_its_own_children(mlflow_store: str, tmp_path: Path) -> None:
    first = open_sweep(mlflow_store)
    for seed in range(3):
        log_run(mlflow_store, first, {"augment": True, "seed": seed}, [0.98 + 0.005 * seed])
        log_run(mlflow_store, first, {"augment": False, "seed": seed}, [0.97 + 0.002 * seed])
    ablation.main(["--out", str(tmp_path / "alone")])
    alone = (tmp_path / "alone" / "ablation.md").read_text()

    # An unrelated run with the same params (a plain dvc repro), then a second sweep of another knob.
    log_run(mlflow_store, None, {"augment": True, "seed": 0}, [0.5])
    second = open_sweep(mlflow_store, "model.input_norm=background,none", "0,1")
    for seed in range(2):
        for norm, acc in (("background", 0.99), ("none", 0.95)):
            log_run(mlflow_store, second, {"augment": True, "model.input_norm": norm, "seed": seed}, [acc])

    # The latest sweep by default, with its own knob, into ablation/input_norm/ (the key's last part).
    ablation.main([])
    text = (tmp_path / "ablation" / "input_norm" / "ablation.md").read_text()
    assert "## model.input_norm=background (2 runs)" in text and "## model.input_norm=none (2 runs)" in text
    assert "augment=" not in text  # the same in every run of this sweep: not a group
    assert "**model.input_norm=background - model.input_norm=none**" in text and "+4.000 points" in text

    # The first sweep by its id: the same tables as when it was alone in the store, in ablation/.
    ablation.main(["--parent", first])
    assert (tmp_path / "ablation" / "ablation.md").read_text() == alone
    summaries = mlflow.search_runs([mlflow_store], "tags.`mnist_cnn.kind` = 'ablation-summary'", output_format="list")
    assert sorted(s.data.tags["mlflow.parentRunId"] for s in summaries) == sorted([first, first, second])
    assert {s.data.params["runs"] for s in summaries} == {"6", "4"}


def test_paired_robustness_differences_and_the_worst_vs_best_table(mlflow_store: str, tmp_path: Path) -> None:
    parent = open_sweep(mlflow_store)
    on_rot, off_rot = [0.90, 0.92, 0.91], [0.60, 0.65, 0.55]
    for seed in range(3):
        for augment, rot in ((True, on_rot[seed]), (False, off_rot[seed])):
            shift = 0.5 + 0.1 * augment + 0.01 * seed
            robust = {"robust_rotation_20": rot, "robust_shift_4": shift, "robust_fog": 0.8 - 0.01 * seed}
            curves = curve_csvs(rotation=rot, shift=shift)
            log_run(mlflow_store, parent, {"augment": augment, "seed": seed}, [0.99], robust=robust, curves=curves)

    ablation.main(["--out", str(tmp_path / "out")])
    text = (tmp_path / "out" / "ablation.md").read_text()
    expected = stats.ttest_rel(on_rot, off_rot)
    ci = expected.confidence_interval()
    for name in ("robust_rotation_20", "robust_rotation_cw20", "robust_rotation_ccw20"):  # metric, then the CSV's
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        assert f"[{100 * ci.low:+.2f}, {100 * ci.high:+.2f}]" in row and f"{expected.pvalue:.2g}" in row
    assert "| robust_fog | 79.00 ± 1.00 | 79.00 ± 1.00 | +0.00 |" in text  # no difference, no spread
    assert "| robust_shift_x_4 | 61.00 ± 1.00 | 51.00 ± 1.00 | +10.00 |" in text  # the CSV's x column
    assert "| robust_shift_diagonal_4 | 98.00 ± 0.00 | 98.00 ± 0.00 | +0.00 |" in text
    assert "| robust_scale_0.8 | 90.00 ± 0.00 |" in text
    rows = [line.split(" |")[0] for line in text.splitlines() if line.startswith("| robust_")]
    assert rows.index("| robust_shift_4") < rows.index("| robust_rotation_cw20") < rows.index("| robust_rotation_ccw0")
    assert rows.index("| robust_rotation_ccw20") < rows.index("| robust_shift_x_0") < rows.index("| robust_scale_0.8")
    assert "| rotation ±20 degrees | 90.00 (n=3) | 65.00 (n=3) | yes |" in text
    assert "| shift 4 pixels | 60.00 (n=3) | 52.00 (n=3) | yes |" in text
    assert (tmp_path / "out" / "ablation_robustness.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("knob", ["augment", "augment=true,", "=a,b", "augment=a,b,c"])
def test_a_knob_needs_a_key_and_two_values(knob: str) -> None:  # refused before any store is opened
    with pytest.raises(UserError, match="--knob: expected KEY=A,B"):
        ablation.main(["--knob", knob])


def test_no_sweep_or_no_finished_children_is_a_user_error(mlflow_store: str) -> None:
    log_run(mlflow_store, None, {"augment": True, "seed": 0}, [0.99])  # not a sweep's
    with pytest.raises(UserError, match=r"no sweep in the store \(run one first: make ablation\)"):
        ablation.main([])
    with pytest.raises(UserError, match="--parent: no run 'f00' in the store"):
        ablation.main(["--parent", "f00"])
    open_sweep(mlflow_store)
    with pytest.raises(UserError, match="no finished runs match"):
        ablation.main([])
    with pytest.raises(UserError, match="no finished runs match"):
        ablation.main(["--exp-name", "nowhere"])
