"""Stage 4, evaluate: test metrics, per-class report, and the model in the registry.

Outputs: metrics/eval.json (accuracy, loss, ood_accuracy (other writers' digits, see
ood.py), per-class precision/recall/F1) and plots/confusion.csv (one row per test
image, for DVC's confusion template).
Logs the metrics and the model (pytorch flavour, with signature and input
example) to the pipeline's MLflow run and registers it as `mnist-cnn`, one
version per trained model, then moves the registry's aliases (registry.promote).
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import torch
import torch.nn.functional as F
from mlflow.models import infer_signature
from sklearn.metrics import accuracy_score, classification_report

import mnist_cnn
from mnist_cnn import registry, tracking
from mnist_cnn.config import load_params, run_stage
from mnist_cnn.data import atomic_path, load_processed, write_json
from mnist_cnn.model import load_checkpoint, normalize, predict_log_probs
from mnist_cnn.ood import ood_accuracy
from mnist_cnn.paths import CONFUSION_CSV, EVAL_METRICS, MODEL_PATH

CLASSES = [str(d) for d in range(10)]


def per_class_report(labels: np.ndarray, predicted: np.ndarray) -> dict[str, dict[str, float]]:
    report = classification_report(
        labels, predicted, labels=range(10), target_names=CLASSES, output_dict=True, zero_division=0
    )
    return {
        name: {k: round(float(v), 6) for k, v in report[name].items()}
        for name in [*CLASSES, "macro avg", "weighted avg"]
    }


def register_model(model: torch.nn.Module, example: np.ndarray, run_id: str) -> str:
    """Log the model to the run and register it, unless this run already has a version."""
    client = mlflow.MlflowClient()
    existing = client.search_model_versions(f"name='{tracking.REGISTERED_MODEL}' and run_id='{run_id}'")
    if existing:
        return existing[0].version
    model = model.cpu()
    with torch.no_grad():
        signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
    info = mlflow.pytorch.log_model(
        model,
        name="model",
        signature=signature,
        input_example=example,
        # Ship the package with the model so `models:/mnist-cnn/<v>` loads anywhere;
        # explicit requirements skip MLflow's slow dependency inference.
        code_paths=[str(Path(mnist_cnn.__file__).parent)],
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}", "numpy"],
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

    metrics = {
        "test_accuracy": float(accuracy_score(truth, predicted)),
        "test_loss": F.nll_loss(log_probs, labels).item(),
        "ood_accuracy": ood_accuracy(model),  # other writers' digits, through predict's preprocessing
        "per_class": per_class_report(truth, predicted),
    }
    write_json(EVAL_METRICS, metrics)
    with atomic_path(CONFUSION_CSV) as tmp:
        tmp.write_text("actual,predicted\n" + "".join(f"{t},{p}\n" for t, p in zip(truth, predicted, strict=True)))

    with tracking.reopen_run() as run:
        mlflow.log_metrics({"eval_accuracy": metrics["test_accuracy"], "eval_loss": metrics["test_loss"]})
        mlflow.log_metric("ood_accuracy", metrics["ood_accuracy"])
        mlflow.log_metrics({f"eval_f1_{d}": metrics["per_class"][d]["f1-score"] for d in CLASSES})
        mlflow.log_artifact(str(EVAL_METRICS), artifact_path="metrics")
        example = normalize(images[:4]).numpy()
        version = register_model(model, example, run.info.run_id)
        promotion = registry.promote(mlflow.MlflowClient(), version, metrics["test_accuracy"], params)
    print(
        f"evaluate: test accuracy {metrics['test_accuracy']:.2%}, loss {metrics['test_loss']:.4f}, "
        f"ood accuracy {metrics['ood_accuracy']:.2%}; "
        f"registered {tracking.REGISTERED_MODEL} version {version}"
    )
    print(promotion.message())


if __name__ == "__main__":
    run_stage(main)
