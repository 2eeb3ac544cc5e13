"""The champion gate's rule (src/mnist_cnn/registry/gate.py) as a pure fold over versions with the metrics
of real runs: the groups of conditions, their margins (params register.*), unknown groups, subsets, a trained
model's later version. No MLflow store."""

from __future__ import annotations

import math

import pytest
from mlflow.entities.model_registry import ModelVersion, ModelVersionTag

from helpers import make_params
from mnist_cnn.registry import gate

# v1: the report's model (`make repro`, augment on, seed 42), the workspace's metrics/eval.json and
# metrics/robustness.json (the same figures as its run in the store, test 0.9903, MNIST-C mean 0.70356).
REPORT = {
    "test_accuracy": 0.9903, "ood_accuracy": 0.8686700055648303,
    "robust_rotation_20": 0.96475, "robust_shift_4": 0.937333, "robust_shear": 0.9827, "robust_scale": 0.945,
    "robust_rotate": 0.9527, "robust_translate": 0.9716,
    "robust_shot_noise": 0.9486, "robust_impulse_noise": 0.441, "robust_glass_blur": 0.7352,
    "robust_motion_blur": 0.9573, "robust_brightness": 0.1087, "robust_stripe": 0.4043, "robust_fog": 0.2157,
    "robust_spatter": 0.965, "robust_dotted_line": 0.8869, "robust_zigzag": 0.6299, "robust_canny_edges": 0.4088,
}  # fmt: skip
# v2: the augment-off model (`dvc exp run -S augment=false`): the augment-off means over seeds 0-4 of the
# ablation (ablation/ablation.md; ood_accuracy from the same runs, docs/robustness.md). MNIST-C mean 0.8459.
AUGMENT_OFF = {
    "test_accuracy": 0.9875, "ood_accuracy": 0.8771,
    "robust_rotation_20": 0.9368, "robust_shift_4": 0.4277, "robust_shear": 0.9672, "robust_scale": 0.9012,
    "robust_rotate": 0.9129, "robust_translate": 0.4579,
    "robust_shot_noise": 0.9416, "robust_impulse_noise": 0.7051, "robust_glass_blur": 0.9303,
    "robust_motion_blur": 0.9100, "robust_brightness": 0.8338, "robust_stripe": 0.9088, "robust_fog": 0.7405,
    "robust_spatter": 0.9667, "robust_dotted_line": 0.9405, "robust_zigzag": 0.8204, "robust_canny_edges": 0.7515,
}  # fmt: skip
# v3: the report's model with `model.input_norm: range`, one run (seed 42, its run `input-norm-range` in
# the store): every metric its own, none taken from v1. MNIST-C mean 0.8006.
INPUT_NORM = {
    "test_accuracy": 0.991, "ood_accuracy": 0.9087367835281024,
    "robust_rotation_20": 0.96575, "robust_shift_4": 0.9386666666666666, "robust_shear": 0.9824,
    "robust_scale": 0.9536, "robust_rotate": 0.955, "robust_translate": 0.9705,
    "robust_shot_noise": 0.9569, "robust_impulse_noise": 0.5572, "robust_glass_blur": 0.7763,
    "robust_motion_blur": 0.9712, "robust_brightness": 0.9873, "robust_stripe": 0.461, "robust_fog": 0.4481,
    "robust_spatter": 0.9689, "robust_dotted_line": 0.8934, "robust_zigzag": 0.6593, "robust_canny_edges": 0.4674,
}  # fmt: skip
# v1 with its refusal rates (metrics/eval.json of the same run): the refused shares of each kind of generated
# non-digit (200 pictures a kind), of test digits and of other writers' digits.
WITH_REFUSAL = REPORT | {
    "refused_noise": 1.0, "refused_blank": 0.99, "refused_shapes": 1.0, "refused_letters": 0.63,
    "refused_symbols": 0.675, "test_refused": 0.0065, "ood_refused": 0.0072,
}  # fmt: skip
CURVE_POINTS = ("robust_rotation_20", "robust_shift_4")  # the robustness stage's, beside MNIST-C's 15 corruptions
MNIST_C = [m for m in gate.GROUPS["geometric"] + gate.GROUPS["photometric"] if m not in CURVE_POINTS]
MARGINS = gate.margins(make_params().register)  # params.yaml's


def versions(*metrics: dict[str, float]) -> list[gate.Candidate]:
    return [gate.Candidate(str(number), values) for number, values in enumerate(metrics, 1)]


def mnist_c_mean(metrics: dict[str, float]) -> float:
    return sum(metrics[m] for m in MNIST_C) / len(MNIST_C)


def test_every_corruption_scored_is_in_a_group_and_margins_scale_with_margin_z() -> None:
    # Each MNIST-C corruption the robustness stage scores is in one group, beside the two curve points.
    assert {f"robust_{c}" for c in make_params().robustness.corruptions} == set(MNIST_C)
    assert set(CURVE_POINTS) < set(gate.GROUPS["geometric"])
    wider = make_params(register__margin_z=3.0).register
    assert gate.margins(wider)["ood"] == pytest.approx(1.5 * MARGINS["ood"], abs=1e-4)


def test_the_augment_off_model_does_not_take_the_report_models_place() -> None:
    """`make repro`, then `dvc exp run -S augment=false`: the augment-off model has the higher MNIST-C
    mean (one mean over all of robustness would prefer it) but reads a 4-pixel shift at 43%."""
    assert mnist_c_mean(AUGMENT_OFF) > mnist_c_mean(REPORT) + 0.1
    choice = gate.fold(versions(REPORT, AUGMENT_OFF), MARGINS)
    assert choice.champion == "1", choice
    assert choice.decisions["2"].startswith("kept: geometric 0.7673 < 0.9590 - "), choice.decisions["2"]
    assert choice.decisions["2"].endswith("of version 1")

    # The other order: the report's model is better on geometric but worse on photometric, so it is
    # not promoted either; the first of two models that each win on a group of conditions stays.
    choice = gate.fold(versions(AUGMENT_OFF, REPORT), MARGINS)
    assert choice.champion == "1", choice
    assert choice.decisions["2"].startswith("kept: photometric 0.6092 < 0.8590 - "), choice.decisions["2"]


def test_a_preset_better_on_photometric_and_ood_takes_the_place_after_the_augment_off_model_was_kept() -> None:
    choice = gate.fold(versions(REPORT, AUGMENT_OFF, INPUT_NORM), MARGINS)
    assert choice.champion == "3", choice
    assert choice.decisions["2"].startswith("kept: geometric"), choice.decisions
    promoted = choice.decisions["3"]
    assert promoted.startswith("promoted: photometric 0.7406 > 0.6092 + "), promoted
    assert promoted.endswith("of version 1, none worse beyond its margin (refusal, answered unknown, not compared)")
    # OOD +4.0 points is within its margin: not the reason, and not a reason to keep it either.
    assert "ood" not in promoted and INPUT_NORM["ood_accuracy"] - REPORT["ood_accuracy"] < MARGINS["ood"]


def test_a_group_with_a_missing_metric_is_unknown_and_not_compared() -> None:
    without_translate = {m: v for m, v in AUGMENT_OFF.items() if m != "robust_translate"}
    promoted, reason = gate.gate(without_translate, REPORT, "1", MARGINS)
    assert gate.scores(without_translate).keys() == {"clean", "photometric", "ood"}  # no refusal rates either
    assert promoted and reason.startswith("promoted: photometric"), reason
    assert reason.endswith("(geometric, refusal, answered unknown, not compared)"), reason
    # Unknown on either side: the champion's missing metric hides the group as well.
    only_clean = {"test_accuracy": REPORT["test_accuracy"] + 2 * MARGINS["clean"]}
    promoted, reason = gate.gate(only_clean, REPORT, "1", MARGINS)
    assert promoted and reason.startswith("promoted: clean"), reason
    assert reason.endswith("(geometric, photometric, ood, refusal, answered unknown, not compared)"), reason


def test_the_refusal_is_compared_on_both_sides_non_digits_refused_and_digits_answered() -> None:
    """A model that reads MNIST better but refuses fewer letters, or refuses more digits, is not promoted:
    a trade between the refusal's two sides (or with clean accuracy) is not a win."""
    scores = gate.scores(WITH_REFUSAL)
    assert scores["refusal"] == pytest.approx((1.0 + 0.99 + 1.0 + 0.63 + 0.675) / 5)
    assert scores["answered"] == pytest.approx(1 - (0.0065 + 0.0072) / 2)  # a refused digit lowers the score
    sharper = {"test_accuracy": WITH_REFUSAL["test_accuracy"] + 2 * MARGINS["clean"]}
    # Letters and symbols refused at 20%: the group's mean falls by (0.43 + 0.475) / 5, beyond its margin.
    fewer = WITH_REFUSAL | sharper | {"refused_letters": 0.2, "refused_symbols": 0.2}
    assert scores["refusal"] - gate.scores(fewer)["refusal"] > MARGINS["refusal"]
    promoted, reason = gate.gate(fewer, WITH_REFUSAL, "1", MARGINS)
    assert not promoted and reason.startswith("kept: refusal "), reason
    # The other way round, the same difference is a reason to promote.
    promoted, reason = gate.gate(WITH_REFUSAL, fewer | {"test_accuracy": WITH_REFUSAL["test_accuracy"]}, "1", MARGINS)
    assert promoted and reason.startswith("promoted: refusal "), reason
    # Half of other writers' digits refused: answered falls by 0.25, beyond its margin.
    more_digits = WITH_REFUSAL | sharper | {"ood_refused": 0.5072}
    promoted, reason = gate.gate(more_digits, WITH_REFUSAL, "1", MARGINS)
    assert not promoted and reason.startswith("kept: answered "), reason
    # Within the margins: noise, neither a reason to keep nor to promote.
    within = WITH_REFUSAL | {"test_refused": 0.0, "refused_letters": 0.63 + 2 * MARGINS["refusal"]}
    assert gate.gate(within, WITH_REFUSAL, "1", MARGINS)[1].startswith("kept: none better")


def version(number: str, run_id: str, **tags: str) -> ModelVersion:
    return ModelVersion("m", number, 0, run_id=run_id, tags=[ModelVersionTag(k, v) for k, v in tags.items()])


def test_the_gate_reads_a_versions_metrics_from_its_run_and_an_unreadable_one_is_unknown() -> None:
    """A version carries test_accuracy (which makes it a candidate); every other gate metric is its run's."""
    runs = {
        "a": gate.RunRecord(REPORT, "a"),
        "b": gate.RunRecord(AUGMENT_OFF | {"robust_shift_4": math.nan}, "b"),
        "c": gate.RunRecord({"test_accuracy": 0.5}, "c"),
    }
    listing = [
        version("1", "a", test_accuracy=repr(REPORT["test_accuracy"])),
        version("2", "b", test_accuracy=repr(AUGMENT_OFF["test_accuracy"])),
        version("3", "c"),  # not (yet) tagged: never a candidate, whatever its run holds
        version("4", "gone", test_accuracy="0.9"),  # its run deleted: only the tag's clean accuracy is known
    ]
    report, off, lost = gate.candidates(listing, runs)
    assert report.metrics == REPORT
    refusal = {*gate.GROUPS["refusal"], *gate.GROUPS["answered"]}  # AUGMENT_OFF has no refusal rates
    assert set(off.metrics) == set(gate.GATE_METRICS) - {"robust_shift_4"} - refusal
    assert lost.metrics == {"test_accuracy": 0.9}
    choice = gate.choose(listing[:3], runs, MARGINS)
    assert choice.champion == "2" and "(geometric, refusal, answered unknown, not compared)" in choice.decisions["2"]
    assert "3" not in choice.decisions


def test_a_trained_models_latest_version_takes_the_place_of_its_first() -> None:
    """A later execution with train cached (an evaluation change) registers the same trained model again from
    its own run, whose train_run_id names the training run: that version replaces the first in the fold."""
    better = {m: min(1.0, v + 0.05) for m, v in REPORT.items()}
    runs = {
        "train-1": gate.RunRecord(REPORT, "train-1"),
        "train-2": gate.RunRecord(REPORT, "train-2"),
        "eval-1": gate.RunRecord(better, "train-1"),
    }
    tag = {"test_accuracy": "0.99"}
    listing = [version("1", "train-1", **tag), version("2", "train-2", **tag), version("3", "eval-1", **tag)]
    choice = gate.choose(listing, runs, MARGINS)
    assert choice.decisions["1"] == "superseded by version 3 of the same trained model (run train-1)"
    # Version 3 is compared in version 1's place: first, so version 2 is measured against it.
    assert choice.decisions["3"] == "promoted: first eligible version" and choice.champion == "3"
    assert choice.decisions["2"].startswith("kept: ")


def test_a_rerun_of_the_same_setting_within_the_margins_is_not_promoted() -> None:
    """Each group moved by 0.9 margins in the rerun's favour: noise, so the champion stays."""
    up = {g: -1 if g == "answered" else 1 for g in gate.GROUPS}  # a refused share of digits: lower is better
    rerun = {m: v + 0.9 * up[g] * MARGINS[g] for g, ms in gate.GROUPS.items() for m in ms for v in [WITH_REFUSAL[m]]}
    choice = gate.fold(versions(WITH_REFUSAL, rerun), MARGINS)
    assert choice.champion == "1"
    assert choice.decisions["2"].startswith("kept: none better than version 1 beyond its margin (clean "), choice


def test_a_subset_model_is_never_champion() -> None:
    better = {m: min(1.0, v + 0.2) for m, v in REPORT.items()}
    choice = gate.fold([gate.Candidate("1", better, subset=600), gate.Candidate("2", REPORT)], MARGINS)
    assert choice.champion == "2"
    assert choice.decisions == {"1": "kept: trained on a subset of 600 images", "2": "promoted: first eligible version"}
    assert gate.fold([gate.Candidate("1", better, subset=600)], MARGINS).champion is None
