"""Stage 4, evaluate: test metrics, the "not a digit" statistics, and the model in the registry.

Outputs: metrics/eval.json (flat: test_accuracy, test_loss, macro_f1, ood_accuracy (other
writers' digits through predict's preprocessing, see ood.py), ece, test_refused),
plots/confusion.csv (one row per test image, for DVC's confusion template; the
confusion-analysis stage turns it into the per-class report) and models/refusal.pt (the
"not a digit" statistics, fitted on the training set: mnist_cnn.refusal).
Logs the test set as the run's evaluation dataset, the metrics linked to it, dvc.lock, the
refusal rates on generated non-digits, and the model (network + refusal statistics as a python
model, mnist_cnn.served, with signature and input example) to the pipeline's MLflow run, and
registers it as `mnist-cnn`, one version per trained model. The robustness stage, which
measures the rest of what the champion gate needs, then moves the aliases (registry.promote).
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
from sklearn.metrics import accuracy_score, f1_score

import mnist_cnn
from mnist_cnn import lineage, nondigits, refusal, served, tracking
from mnist_cnn.config import load_params, run_stage
from mnist_cnn.data import atomic_path, load_processed, save_tensors, write_json
from mnist_cnn.model import load_checkpoint, predict_log_probs
from mnist_cnn.ood import ood_accuracy
from mnist_cnn.paths import CONFUSION_CSV, DVC_LOCK, EVAL_METRICS, MODEL_PATH, REFUSAL_STATS
from mnist_cnn.served import ServedModel

NON_DIGITS = 200  # generated pictures of each kind (nondigits.KINDS)


def refusal_rates(model: torch.nn.Module, stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """The refused fraction of each kind of generated non-digit, through predict's preprocessing."""
    rates = {}
    for kind in nondigits.KINDS:
        fields, blank = nondigits.prepared(kind, NON_DIGITS)
        refused = blank + (refusal.refused_fraction(model, stats, fields) * len(fields) if len(fields) else 0)
        rates[f"refused_{kind}"] = refused / NON_DIGITS
    return rates


def register_model(
    model: torch.nn.Module, stats: dict[str, torch.Tensor], example: np.ndarray, run_id: str
) -> tuple[str, str | None]:
    """Log the model to the run and register it, unless this run already has a version.
    Returns (registered version, MLflow 3 logged-model id)."""
    client = mlflow.MlflowClient()
    existing = client.search_model_versions(f"name='{tracking.REGISTERED_MODEL}' and run_id='{run_id}'")
    if existing:  # evaluate rerun on the same run: the model it logged then
        outputs = client.get_run(run_id).outputs
        return existing[0].version, next((o.model_id for o in outputs.model_outputs), None) if outputs else None
    model = model.cpu()
    output = pd.DataFrame(served.answers(model, stats, example))  # the records' columns, for the signature
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
            # log_model copies the run's metrics of its step to the model; at step -1 there are none,
            # so the model carries the test metrics linked below, not the system or per-epoch ones.
            step=-1,
        )
    return str(info.registered_model_version), info.model_id


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
        "macro_f1": float(f1_score(truth, predicted, labels=range(10), average="macro", zero_division=0)),
        "ood_accuracy": ood_accuracy(model),  # other writers' digits, through predict's preprocessing
        "ece": calibration["ece"],  # of the temperature-calibrated probabilities predict reports
        "test_refused": calibration["refused"],  # test digits refused as "not a digit"
    }
    write_json(EVAL_METRICS, metrics)
    with atomic_path(CONFUSION_CSV) as tmp:
        tmp.write_text("actual,predicted\n" + "".join(f"{t},{p}\n" for t, p in zip(truth, predicted, strict=True)))

    with tracking.reopen_run() as run:
        test_set = lineage.dataset(params, "test", images.numpy(), truth)
        lineage.log_input(test_set, context="evaluation")
        mlflow.log_metrics({**calibration, "temperature": stats["temperature"].item(), **refusal_rates(model, stats)})
        mlflow.log_artifact(str(EVAL_METRICS), artifact_path="metrics")
        if DVC_LOCK.exists():  # the hashes of the data, code and params this run was made from
            mlflow.log_artifact(str(DVC_LOCK))
        example = images[:4, 0].numpy()  # uint8 pixels (4, 28, 28): what the served model takes
        version, model_id = register_model(model, stats, example, run.info.run_id)
        eval_metrics = {"eval_accuracy": metrics["test_accuracy"], "eval_loss": metrics["test_loss"]}
        eval_metrics["eval_macro_f1"] = metrics["macro_f1"]
        mlflow.log_metric("ood_accuracy", metrics["ood_accuracy"])
        per_class_f1 = f1_score(truth, predicted, labels=range(10), average=None, zero_division=0)
        eval_metrics |= {f"eval_f1_{digit}": float(f1) for digit, f1 in enumerate(per_class_f1)}
        # On the run and on the logged model, each linked to the test set (MLflow 3's metric lineage).
        mlflow.log_metrics(eval_metrics, dataset=test_set, model_id=model_id)
    print(
        f"evaluate: test accuracy {metrics['test_accuracy']:.2%}, loss {metrics['test_loss']:.4f}, "
        f"ood accuracy {metrics['ood_accuracy']:.2%}, "
        f"ECE {calibration['ece_uncalibrated']:.4f} -> {calibration['ece']:.4f} (temperature), "
        f"{calibration['refused']:.2%} of test digits refused; "
        f"registered {tracking.REGISTERED_MODEL} version {version}"
    )


if __name__ == "__main__":
    run_stage(main)
