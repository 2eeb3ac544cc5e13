"""Test accuracy and epoch times of the train stage's own loop: plain vs fast path, over seeds 0-2.

Issue 3's accuracy target: the fast path (bf16 + CUDA graph) within 0.1 point of the plain fp32 eager
loop, mean of 3 seeds at 5 epochs. No MLflow, no DVC: build() and train_epoch() are what the train
stage runs. With `--device cpu` it compares fp32 with bf16 (the CPU's fast path); `--subset 2000 --epochs 1`
checks the script quickly.
"""

import argparse
import json
import statistics
import time

import torch

from mnist_cnn.config import load_params
from mnist_cnn.data import load_processed
from mnist_cnn.train import build, measure_test_set, train_epoch

CONFIGS = [("plain fp32 eager", "fp32", False), ("fast bf16 graph", "bf16", True), ("fp32 graph", "fp32", True)]
CPU_CONFIGS = [("plain fp32 eager", "fp32", False), ("fast bf16 (no graph on a CPU)", "bf16", False)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--subset", type=int, default=0, help="training images (0 = all 60,000)")
    parser.add_argument("--epochs", type=int, default=0, help="0 = train.epochs of params.yaml")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    base = load_params()
    epochs = args.epochs or base.train.epochs
    device = torch.device(args.device)
    images, labels = (t.to(device) for t in load_processed("train", args.subset))
    test_images, test_labels = (t.to(device) for t in load_processed("test"))
    eval_batch = 10_000 if device.type == "cuda" else 1_000  # 10,000 images at once take GBs on a CPU
    configs = CONFIGS if device.type == "cuda" else CPU_CONFIGS  # graphs need CUDA
    rows = []
    for name, precision, graph in configs:
        for seed in range(args.seeds):
            train = base.train.model_copy(update={"precision": precision, "cuda_graph": graph, "epochs": epochs})
            step = build(base.model_copy(update={"seed": seed, "train": train}), images, labels)
            times = []
            for _ in range(epochs):
                sync(device)
                start = time.perf_counter()
                loss = train_epoch(step, len(images), train.batch_size)
                sync(device)
                times.append(time.perf_counter() - start)
            test_loss, accuracy = measure_test_set(step.model, test_images, test_labels, eval_batch)
            rows.append(
                {
                    "config": name,
                    "seed": seed,
                    "acc": round(accuracy * 100, 2),
                    "test_loss": round(test_loss, 4),
                    "train_loss": round(loss, 4),
                    "epoch_s": [round(t, 3) for t in times],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    for name, _, _ in configs:
        mine = [r for r in rows if r["config"] == name]
        accs = [r["acc"] for r in mine]
        best = min(min(r["epoch_s"][1:] or r["epoch_s"]) for r in mine)  # epoch 1 includes the capture
        print(f"{name:<30} mean acc {statistics.mean(accs):.3f}%  seeds {accs}  best epoch {best:.3f} s")


if __name__ == "__main__":
    main()
