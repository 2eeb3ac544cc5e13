"""Stage 4, evaluate: test metrics, per-class report, and the model in the registry.

Outputs: metrics/eval.json (accuracy, loss, per-class precision/recall/F1, calibration error,
refused test digits), plots/confusion.csv (one row per test image, for DVC's confusion template)
and models/refusal.pt (the "not a digit" statistics, fitted on the training set: mnist_cnn.refusal).
Logs the metrics, the refusal rates on generated non-digits, and the model (network + refusal
statistics as a python model, mnist_cnn.served, with signature and input example) to the
pipeline's MLflow run and registers it as `mnist-cnn`, one version per trained model, then moves
the registry's aliases (registry.promote).
"""

from __future__ import annotations

import tempfile
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from mlflow.models import infer_signature
from sklearn.metrics import accuracy_score, classification_report

import mnist_cnn
from mnist_cnn import nondigits, refusal, registry, tracking
from mnist_cnn.config import load_params, run_stage
from mnist_cnn.data import atomic_path, load_processed, save_tensors, write_json
from mnist_cnn.model import load_checkpoint, normalize, predict_log_probs
from mnist_cnn.paths import CONFUSION_CSV, EVAL_METRICS, MODEL_PATH, REFUSAL_STATS
from mnist_cnn.served import ServedModel

NON_DIGITS = 200  # generated pictures of each kind (nondigits.KINDS)

CLASSES = [str(d) for d in range(10)]


def per_class_report(labels: np.ndarray, predicted: np.ndarray) -> dict[str, dict[str, float]]:
    report = classification_report(
        labels, predicted, labels=range(10), target_names=CLASSES, output_dict=True, zero_division=0
    )
    return {
        name: {k: round(float(v), 6) for k, v in report[name].items()}
        for name in [*CLASSES, "macro avg", "weighted avg"]
    }


def refusal_rates(model: torch.nn.Module, stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """The refused fraction of each kind of generated non-digit, through predict's preprocessing."""
    rates = {}
    for kind in nondigits.KINDS:
        fields, blank = nondigits.prepared(kind, NON_DIGITS)
        refused = blank + (refusal.refused_fraction(model, stats, fields) * len(fields) if len(fields) else 0)
        rates[f"refused_{kind}"] = refused / NON_DIGITS
    return rates


def register_model(model: torch.nn.Module, stats: dict[str, torch.Tensor], example: np.ndarray, run_id: str) -> str:
    """Log the model to the run and register it, unless this run already has a version."""
    client = mlflow.MlflowClient()
    existing = client.search_model_versions(f"name='{tracking.REGISTERED_MODEL}' and run_id='{run_id}'")
    if existing:
        return existing[0].version
    model = model.cpu()
    digits, probabilities, reasons = refusal.answer(model, stats, torch.from_numpy(example))
    output = pd.DataFrame({"digit": digits, "probability": probabilities, "reason": reasons})
    # The python model's artifacts: the weights and the statistics, as files MLflow copies into the model.
    with tempfile.TemporaryDirectory(prefix="mnist-cnn-model-") as folder:
        checkpoint, statistics = Path(folder) / MODEL_PATH.name, Path(folder) / REFUSAL_STATS.name
        save_tensors(checkpoint, {"state_dict": model.state_dict(), "arch": model.arch})
        save_tensors(statistics, stats)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=ServedModel(),
            artifacts={"checkpoint": str(checkpoint), "refusal": str(statistics)},
            signature=infer_signature(example, output),
            input_example=example,
            # Ship the package with the model so `models:/mnist-cnn/<v>` loads anywhere;
            # explicit requirements skip MLflow's slow dependency inference.
            code_paths=[str(Path(mnist_cnn.__file__).parent)],
            pip_requirements=[
                f"{name}=={metadata.version(name)}"
                for name in ("torch", "mlflow", "numpy", "pandas", "scipy", "scikit-learn")
            ],
            registered_model_name=tracking.REGISTERED_MODEL,
        )
    return str(info.registered_model_version)


def main() -> None:
    params = load_params()
    images, labels = load_processed("test")
    model = load_checkpoint(str(MODEL_PATH))
    log_probs = predict_log_probs(model, images, params.train.eval_batch_size)
    predicted = log_probs.argmax(1).numpy()
    truth = labels.numpy()

    # The refusal statistics come from the training set (never the test set) and the final weights.
    train_images, train_labels = load_processed("train")
    stats = refusal.fit(model, train_images, train_labels, params.seed)
    save_tensors(REFUSAL_STATS, stats)
    calibration = refusal.report(model, stats, images, labels)

    metrics = {
        "test_accuracy": float(accuracy_score(truth, predicted)),
        "test_loss": F.nll_loss(log_probs, labels).item(),
        "ece": calibration["ece"],  # of the temperature-calibrated probabilities predict reports
        "test_refused": calibration["refused"],  # test digits refused as "not a digit"
        "per_class": per_class_report(truth, predicted),
    }
    write_json(EVAL_METRICS, metrics)
    with atomic_path(CONFUSION_CSV) as tmp:
        tmp.write_text("actual,predicted\n" + "".join(f"{t},{p}\n" for t, p in zip(truth, predicted, strict=True)))

    with tracking.reopen_run() as run:
        mlflow.log_metrics({"eval_accuracy": metrics["test_accuracy"], "eval_loss": metrics["test_loss"]})
        mlflow.log_metrics({f"eval_f1_{d}": metrics["per_class"][d]["f1-score"] for d in CLASSES})
        mlflow.log_metrics({**calibration, "temperature": stats["temperature"].item(), **refusal_rates(model, stats)})
        mlflow.log_artifact(str(EVAL_METRICS), artifact_path="metrics")
        example = normalize(images[:4]).numpy()
        version = register_model(model, stats, example, run.info.run_id)
        promotion = registry.promote(mlflow.MlflowClient(), version, metrics["test_accuracy"], params)
    print(
        f"evaluate: test accuracy {metrics['test_accuracy']:.2%}, loss {metrics['test_loss']:.4f}, "
        f"ECE {calibration['ece_uncalibrated']:.4f} -> {calibration['ece']:.4f} (temperature), "
        f"{calibration['refused']:.2%} of test digits refused; "
        f"registered {tracking.REGISTERED_MODEL} version {version}"
    )
    print(promotion.message())


if __name__ == "__main__":
    run_stage(main)
