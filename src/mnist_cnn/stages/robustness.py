"""Stage robustness: accuracy under rotation, shift, scale and the MNIST-C corruptions (docs/robustness.md).

params robustness, train.device + data/processed/ + data/corrupted.pt + models/model.pt ->
metrics/robustness.json (robust_*: each corruption, their mean, clean - mean, the headline rotation
and shift), plots/robustness_{rotation,shift,scale}.csv (accuracy per size, with its standard
error) and robustness/ (examples.png, curves.png, corruptions.csv), all logged to the execution's MLflow run
(the metrics but robust_clean and robust_degradation; the curves as the CSVs and the figure).
"""

from __future__ import annotations

import math
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlflow
import torch

from mnist_cnn.cli import UserError, run_stage
from mnist_cnn.config import (
    HEADLINE_ROTATION,
    HEADLINE_SHIFT,
    ROBUST_ROTATION,
    ROBUST_SHIFT,
    RobustnessParams,
    load_params,
)
from mnist_cnn.core.model import accuracy, load_checkpoint, predict_log_probs
from mnist_cnn.core.runtime import pick_device, tune_cpu_allocator, use_bf16
from mnist_cnn.data.mnist import load_processed
from mnist_cnn.evaluation import corruptions
from mnist_cnn.files import load_tensors, save_figure, write_csv, write_json
from mnist_cnn.paths import CORRUPTED, MODEL_PATH, ROBUST_CURVES, ROBUST_DIR, ROBUST_METRICS
from mnist_cnn.tracking import store

BATCH = 1000


def scored(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, bf16: bool) -> float:
    """Top-1 accuracy on uint8 images (N, 28, 28)."""
    return accuracy(predict_log_probs(model, images.unsqueeze(1), BATCH, bf16), labels)


def standard_error(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n)


def curves(
    model: torch.nn.Module, sets: dict[str, torch.Tensor], labels: torch.Tensor, r: RobustnessParams, bf16: bool
) -> dict[str, list[dict[str, float]]]:
    """The curves' rows: accuracy and its standard error per size (per direction for shifts)."""

    def point(curve: str, size: float) -> tuple[float, float]:
        acc = scored(model, image_set(sets, f"{curve} {size:g}"), labels, bf16)
        return acc, standard_error(acc, len(labels))

    rows: dict[str, list[dict[str, float]]] = {"rotation": [], "shift": [], "scale": []}
    for a in corruptions.both_ways(r.angles):
        acc, se = point("rotation", a)
        rows["rotation"].append({"degrees": a, "accuracy": acc, "se": se})
    for k in r.shifts:
        row: dict[str, float] = {"pixels": k}
        for direction in corruptions.SHIFT_DIRECTIONS:
            row[direction], row[f"{direction}_se"] = point(f"shift_{direction}", k)
        rows["shift"].append(row)
    for s in r.scales:
        acc, se = point("scale", s)
        rows["scale"].append({"factor": s, "accuracy": acc, "se": se})
    return rows


def image_set(sets: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in sets:
        raise UserError(f"{CORRUPTED} has no images for {key!r}: it predates params.yaml (dvc repro corrupt)")
    return sets[key]


def headline(rows: dict[str, list[dict[str, float]]]) -> dict[str, float]:
    """The augmentation edge's far side: mean over both rotation senses, and over the three shift directions."""
    out = {}
    rot = [r["accuracy"] for r in rows["rotation"] if abs(r["degrees"]) == HEADLINE_ROTATION]
    if rot:
        out[ROBUST_ROTATION] = sum(rot) / len(rot)
    shift = [r for r in rows["shift"] if r["pixels"] == HEADLINE_SHIFT]
    if shift:
        out[ROBUST_SHIFT] = sum(shift[0][d] for d in corruptions.SHIFT_DIRECTIONS) / 3
    return out


def plot_examples(clean: torch.Tensor, sets: dict[str, torch.Tensor], names: list[str], path) -> None:
    """One test digit, clean and under every corruption."""
    panels = [("clean", clean), *((n, image_set(sets, n)[0]) for n in names)]
    rows, cols = math.ceil(len(panels) / 8), 8
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.4, rows * 1.6), squeeze=False)
    for ax, (name, img) in zip(axes.flat, panels, strict=False):
        ax.imshow(img.cpu().numpy(), cmap="gray", vmin=0, vmax=255)
        ax.set_title(name, fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    save_figure(fig, path)


def plot_curves(rows: dict[str, list[dict[str, float]]], path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), sharey=True)
    series = [
        (axes[0], "rotation", "degrees", ["accuracy"], "rotation (degrees, + = counter-clockwise)"),
        (axes[1], "shift", "pixels", list(corruptions.SHIFT_DIRECTIONS), "shift (pixels)"),
        (axes[2], "scale", "factor", ["accuracy"], "scale (zoom factor)"),
    ]
    for ax, curve, x, ys, title in series:
        for y in ys:
            se = "se" if y == "accuracy" else f"{y}_se"
            xs = [r[x] for r in rows[curve]]
            ax.errorbar(xs, [100 * r[y] for r in rows[curve]], [100 * r[se] for r in rows[curve]], marker="o", ms=3,
                        capsize=2, label=y if len(ys) > 1 else None)  # fmt: skip
        ax.set(title=title, xlabel=x)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%), ± 1 standard error")
    axes[1].legend()
    save_figure(fig, path)


def main() -> None:
    start = time.perf_counter()
    params = load_params()
    r = params.robustness
    images, labels = load_processed("test")
    device = pick_device(params.train.device)
    model = load_checkpoint(str(MODEL_PATH), device)
    bf16 = use_bf16(r.precision, device, "robustness.precision")
    # Channels-last weights: oneDNN's faster layout for these convolutions, in fp32 as in bf16;
    # and freed activations kept in the heap, not page-faulted back each batch.
    model = model.to(memory_format=torch.channels_last)
    tune_cpu_allocator()
    sets = {k: v.to(device) for k, v in load_tensors(CORRUPTED).items()}
    images, labels = images.squeeze(1).to(device), labels.to(device)

    clean = scored(model, images, labels, bf16)
    rows = curves(model, sets, labels[sets["curve_pick"]], r, bf16)
    pick = sets["corruption_pick"]
    scores = {n: scored(model, image_set(sets, n), labels[pick], bf16) for n in r.corruptions}
    mean = sum(scores.values()) / len(scores)
    metrics = {
        "robust_clean": clean,
        **{f"robust_{n}": a for n, a in scores.items()},
        "robust_mean_accuracy": mean,
        "robust_degradation": clean - mean,
        **headline(rows),
    }

    write_json(ROBUST_METRICS, {k: round(v, 6) for k, v in metrics.items()})
    for curve, path in ROBUST_CURVES.items():
        write_csv(path, rows[curve], digits=6)
    n = len(pick)
    table = [{"corruption": c, "accuracy": a, "se": standard_error(a, n), "images": n} for c, a in scores.items()]
    write_csv(ROBUST_DIR / "corruptions.csv", table, digits=6)
    plot_examples(images[pick[0]], sets, r.corruptions, ROBUST_DIR / "examples.png")
    plot_curves(rows, ROBUST_DIR / "curves.png")

    with store.execution_run(params):
        # The curves are figures and CSVs (the artifacts below), not one metric per point.
        store.log_new(store.run_metrics(metrics))
        mlflow.set_tag("robustness.bf16", str(bf16))  # a tag: a rerun of this stage alone may change it
        mlflow.log_artifact(str(ROBUST_METRICS), artifact_path="metrics")
        for path in ROBUST_CURVES.values():
            mlflow.log_artifact(str(path), artifact_path="plots")
        mlflow.log_artifacts(str(ROBUST_DIR), artifact_path="robustness")
    print(
        f"robustness: clean {clean:.2%}, MNIST-C mean {mean:.2%} over {len(scores)} corruptions "
        f"({n} images each, SE <= {standard_error(0.5, n):.2%}), {'bf16' if bf16 else 'fp32'}, "
        f"{time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    run_stage(main)
