"""Stage confusion-analysis: what the model gets wrong, as pictures and tables.

plots/confusion.csv + the test images + plots/train_history.csv -> reports/ (logged to the MLflow
run): classification_report.json, confusion_matrix.png, confusion_counts.csv, confused_pairs.json,
misclassified.png and training_curves.png (logged to the execution's run).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import mlflow
import numpy as np
from sklearn.metrics import ConfusionMatrixDisplay, classification_report, confusion_matrix

from mnist_cnn.cli import UserError, run_stage
from mnist_cnn.config import load_params
from mnist_cnn.data.mnist import load_processed
from mnist_cnn.files import read_int_columns, save_figure, write_csv, write_json
from mnist_cnn.paths import CLASSIFICATION_REPORT, CONFUSION_CSV, REPORTS_DIR, TRAIN_HISTORY
from mnist_cnn.tracking import store

TOP_PAIRS = 10
GALLERY = 40
CLASSES = [str(d) for d in range(10)]


def per_class_report(labels: np.ndarray, predicted: np.ndarray) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support of every digit (absent ones too) and their averages."""
    report = classification_report(
        labels, predicted, labels=range(10), target_names=CLASSES, output_dict=True, zero_division=0
    )
    return {
        name: {k: round(float(v), 6) for k, v in report[name].items()}
        for name in [*CLASSES, "macro avg", "weighted avg"]
    }


def most_confused(matrix: np.ndarray, top: int) -> list[dict[str, int | float]]:
    """Off-diagonal cells, largest first: how often `true` was taken for `predicted`."""
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    pairs = []
    for flat_index in np.argsort(off, axis=None)[::-1][:top]:
        true, predicted = np.unravel_index(flat_index, off.shape)
        if off[true, predicted] == 0:
            break
        share = round(float(off[true, predicted] / matrix[true].sum()), 5)
        pairs.append({"true": int(true), "predicted": int(predicted), "count": int(off[true, predicted]),
                      "share_of_true_class": share})  # fmt: skip
    return pairs


def plot_confusion(matrix: np.ndarray, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 6))
    ConfusionMatrixDisplay(matrix, display_labels=range(10)).plot(ax=ax, cmap="Blues", values_format="d", colorbar=True)
    ax.set_title(f"Confusion matrix, test set (accuracy {np.trace(matrix) / matrix.sum():.2%})")
    save_figure(fig, path, dpi=120)


def plot_gallery(images: np.ndarray, truth: np.ndarray, predicted: np.ndarray, path: Path) -> None:
    wrong = np.flatnonzero(truth != predicted)[:GALLERY]
    cols = 10
    rows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.2, rows * 1.45), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, wrong, strict=False):
        ax.imshow(images[index], cmap="gray_r")
        ax.set_title(f"#{index}\n{truth[index]}→{predicted[index]}", fontsize=8, color="crimson")
    fig.suptitle(f"Misclassified test digits (true→predicted), first {len(wrong)} of {int((truth != predicted).sum())}")
    save_figure(fig, path, dpi=120)


def plot_curves(history_path: Path, path: Path) -> None:
    history = np.genfromtxt(history_path, delimiter=",", names=True, ndmin=1)
    epochs = history["epoch"].astype(int)
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(epochs, history["train_loss"], "o-", label="train loss")
    loss_ax.plot(epochs, history["test_loss"], "o-", label="test loss")
    loss_ax.set(xlabel="epoch", ylabel="NLL loss", title="Loss")
    loss_ax.legend()
    acc_ax.plot(epochs, 100 * history["test_accuracy"], "o-", color="green")
    acc_ax.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy")
    for ax in (loss_ax, acc_ax):
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
    save_figure(fig, path, dpi=120)


def main() -> None:
    params = load_params()
    truth, predicted = read_int_columns(CONFUSION_CSV, "the evaluate stage", "actual", "predicted")
    images, _ = load_processed("test")
    if len(images) != len(truth):
        raise UserError(f"{CONFUSION_CSV}: {len(truth)} rows but {len(images)} test images; rerun evaluate")
    matrix = confusion_matrix(truth, predicted, labels=range(10))
    pairs = most_confused(matrix, TOP_PAIRS)

    write_json(CLASSIFICATION_REPORT, per_class_report(truth, predicted))
    plot_confusion(matrix, REPORTS_DIR / "confusion_matrix.png")
    counts = [{"true\\predicted": digit, **dict(enumerate(row))} for digit, row in enumerate(matrix)]
    write_csv(REPORTS_DIR / "confusion_counts.csv", counts)
    write_json(REPORTS_DIR / "confused_pairs.json", {"most_confused": pairs})
    plot_gallery(images.squeeze(1).numpy(), truth, predicted, REPORTS_DIR / "misclassified.png")
    plot_curves(TRAIN_HISTORY, REPORTS_DIR / "training_curves.png")

    with store.execution_run(params):
        mlflow.log_artifacts(str(REPORTS_DIR), artifact_path="reports")
    top = ", ".join(f"{p['true']}→{p['predicted']} ({p['count']})" for p in pairs[:3])
    print(f"confusion-analysis: {int((truth != predicted).sum())} errors; most confused: {top}")


if __name__ == "__main__":
    run_stage(main)
