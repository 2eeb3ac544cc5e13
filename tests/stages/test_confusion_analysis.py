"""The confusion report: most confused pairs, predictions file, figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mnist_cnn.stages.confusion_analysis import (
    most_confused,
    per_class_report,
    plot_confusion,
    plot_curves,
    plot_gallery,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_most_confused_orders_off_diagonal_cells() -> None:
    matrix = np.diag([100] * 10)
    matrix[9, 4] = 7  # 9 taken for 4
    matrix[4, 9] = 3
    matrix[7, 1] = 5
    pairs = most_confused(matrix, top=10)
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [(9, 4, 7), (7, 1, 5), (4, 9, 3)]
    assert pairs[0]["share_of_true_class"] == round(7 / 107, 5)


def test_no_confusions_gives_no_pairs() -> None:
    assert most_confused(np.diag([5] * 10), top=5) == []


def test_figures_are_pngs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 10, 50)
    predicted = np.where(rng.random(50) < 0.8, truth, (truth + 1) % 10)
    images = rng.integers(0, 255, (50, 28, 28)).astype(np.uint8)
    history = tmp_path / "history.csv"
    history.write_text("epoch,train_loss,test_loss,test_accuracy,seconds\n1,0.3,0.1,0.97,1.0\n2,0.1,0.05,0.98,1.0\n")
    matrix = np.bincount(truth * 10 + predicted, minlength=100).reshape(10, 10)
    plot_confusion(matrix, tmp_path / "confusion.png")
    plot_gallery(images, truth, predicted, tmp_path / "gallery.png")
    plot_curves(history, tmp_path / "curves.png")
    for name in ("confusion.png", "gallery.png", "curves.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert not list(tmp_path.glob("*.tmp"))


# --- per-class metrics, in the shape reports/classification_report.json stores -------


def test_perfect_predictions() -> None:
    labels = np.arange(100) % 10
    report = per_class_report(labels, labels)
    assert all(report[str(d)]["f1-score"] == 1.0 for d in range(10))
    assert report["macro avg"]["precision"] == 1.0


def test_one_confusion_lowers_the_right_classes() -> None:
    labels = np.array([4] * 10 + [9] * 10)
    predicted = labels.copy()
    predicted[0] = 9  # one 4 taken for a 9
    report = per_class_report(labels, predicted)
    assert report["4"]["recall"] == 0.9
    assert report["4"]["precision"] == 1.0
    assert report["9"]["precision"] == round(10 / 11, 6)
    assert report["0"]["support"] == 0.0  # absent classes are reported, not dropped
