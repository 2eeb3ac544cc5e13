"""Per-class metrics from scikit-learn, in the shape reports/classification_report.json stores."""

from __future__ import annotations

import numpy as np

from mnist_cnn.confusion_analysis import per_class_report


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
