"""Every file a stage reads or writes, relative to the repository (the stage's working directory):
one place for them, so that stages share paths without importing each other."""

from __future__ import annotations

from pathlib import Path

RAW_DIR = Path("data/raw")  # download
PROCESSED_DIR = Path("data/processed")  # preprocess: train.pt, test.pt, stats.json

DETECTOR = Path("models/detector.pt")  # detector: the not-a-digit detector, shared by every classifier
MODEL_PATH = Path("models/model.pt")  # train: weights + architecture
RUN_FILE = Path("models/mlflow_run.json")  # train: the MLflow run the later stages reopen
TRAIN_METRICS = Path("metrics/train.json")
TRAIN_HISTORY = Path("plots/train_history.csv")  # one row per epoch

EVAL_METRICS = Path("metrics/eval.json")  # evaluate
CONFUSION_CSV = Path("plots/confusion.csv")  # one row per test image (DVC's confusion template)
REFUSAL_STATS = Path("models/refusal.pt")  # evaluate: the "not a digit" statistics (core.refusal)

CORRUPTED = Path("data/corrupted.pt")  # corrupt: the test images transformed and corrupted, by name
ROBUST_METRICS = Path("metrics/robustness.json")  # robustness: flat robust_* accuracies
ROBUST_CURVES = {c: Path(f"plots/robustness_{c}.csv") for c in ("rotation", "shift", "scale")}  # for `dvc plots`
ROBUST_DIR = Path("robustness")  # the example grid, the curves figure, the per-corruption table

REPORTS_DIR = Path("reports")  # confusion-analysis: figures and tables
CLASSIFICATION_REPORT = REPORTS_DIR / "classification_report.json"  # per-class precision/recall/F1

REGISTERED = Path("models/registered.json")  # register: the version published, and the champion after it

DVC_LOCK = Path("dvc.lock")  # DVC's record of every stage's hashes (lineage reads it; register logs it)
