"""Stage evaluate: how good the trained model is, and when it should say "not a digit".

params seed, train.eval_batch_size, evaluate + data/processed/ + models/model.pt + models/detector.pt ->
metrics/eval.json, plots/confusion.csv (one row per test image) and models/refusal.pt (the "not a digit"
statistics, fitted on the training set with params evaluate.*, with the detector's weights). The refusal
rates (test digits, other writers' digits, each kind of generated non-digit) go into eval.json and the
execution's MLflow run.
"""

from __future__ import annotations

from dataclasses import fields

import mlflow
import torch.nn.functional as F
from sklearn.metrics import f1_score

from mnist_cnn.cli import run_stage
from mnist_cnn.config import load_params
from mnist_cnn.core import refusal
from mnist_cnn.core.augment import Extras
from mnist_cnn.core.model import accuracy, load_checkpoint, predict_log_probs
from mnist_cnn.core.runtime import tune_cpu_allocator
from mnist_cnn.data.mnist import load_processed
from mnist_cnn.evaluation import nondigits
from mnist_cnn.evaluation.calibration import report
from mnist_cnn.evaluation.ood import load_ood_set, ood_accuracy
from mnist_cnn.files import load_tensors, save_tensors, write_csv, write_json
from mnist_cnn.paths import CONFUSION_CSV, DETECTOR, EVAL_METRICS, MODEL_PATH, REFUSAL_STATS
from mnist_cnn.tracking import lineage, store


def main() -> None:
    params = load_params()
    tune_cpu_allocator()  # freed activations stay in the heap (core.runtime)
    images, labels = load_processed("test")
    model = load_checkpoint(str(MODEL_PATH))
    log_probs = predict_log_probs(model, images, params.train.eval_batch_size)
    predicted, truth = log_probs.argmax(1).numpy(), labels.numpy()

    # The refusal statistics come from the training set (never the test set) and the final weights.
    # The model's own augmentation: a network trained on blurred, noisy digits must not refuse them.
    extras = Extras(**{extra.name: getattr(params, f"augment_{extra.name}") for extra in fields(Extras)})
    stats = refusal.fit(model, *load_processed("train"), params.seed, params.evaluate, load_tensors(DETECTOR), extras)
    save_tensors(REFUSAL_STATS, stats)
    calibration = report(model, stats, images, labels)
    rates = nondigits.refusal_rates(model, stats)

    metrics = {
        "test_accuracy": accuracy(log_probs, labels),
        "test_loss": F.nll_loss(log_probs, labels).item(),
        "macro_f1": float(f1_score(truth, predicted, labels=range(10), average="macro", zero_division=0)),
        "ood_accuracy": ood_accuracy(model),  # other writers' digits, through predict's preprocessing
        "ece": calibration["ece"],  # of the temperature-calibrated probabilities predict reports
        "test_refused": calibration["refused"],  # test digits refused as "not a digit"
        "ood_refused": refusal.refused_fraction(model, stats, load_ood_set()[0]),  # other writers' digits refused
        **rates,  # refused_noise, refused_blank, ...: generated non-digits of each kind refused
    }
    write_json(EVAL_METRICS, metrics)
    write_csv(CONFUSION_CSV, [{"actual": t, "predicted": p} for t, p in zip(truth, predicted, strict=True)])

    with store.execution_run(params):
        lineage.log_input(lineage.dataset(params, "test", images.numpy(), truth), context="evaluation")
        # test_accuracy is logged by register, with the logged model it measures.
        store.log_new({k: v for k, v in store.run_metrics(metrics).items() if k != "test_accuracy"})
        mlflow.log_artifact(str(EVAL_METRICS), artifact_path="metrics")
    print(
        f"evaluate: test accuracy {metrics['test_accuracy']:.2%}, loss {metrics['test_loss']:.4f}, "
        f"ood accuracy {metrics['ood_accuracy']:.2%}, "
        f"ECE {calibration['ece_uncalibrated']:.4f} -> {calibration['ece']:.4f} (temperature), "
        f"{calibration['refused']:.2%} of test digits refused, {metrics['ood_refused']:.2%} of other writers'; "
        + ", ".join(f"{k.removeprefix('refused_')} {v:.0%}" for k, v in rates.items())
        + " refused"
    )


if __name__ == "__main__":
    run_stage(main)
