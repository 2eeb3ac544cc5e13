"""Stage train: the report's CNN, Adam, NLLLoss, with on-device augmentation.

params (seed, augment*, data.subset, model, train) + data/processed/ -> models/model.pt,
models/mlflow_run.json (the run that trained the model), metrics/train.json, plots/train_history.csv.
The whole training set lives on the device as uint8; each batch is indexed, augmented and normalised
there, so there is no DataLoader (mnist_cnn.core.training).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass

import mlflow
import torch
from tqdm import tqdm

from mnist_cnn.cli import UserError, run_stage
from mnist_cnn.config import Params, load_params, parallel_problem
from mnist_cnn.core import distributed
from mnist_cnn.core.model import Net, accuracy, predict_log_probs
from mnist_cnn.core.runtime import pick_device
from mnist_cnn.core.train_step import mean_nll
from mnist_cnn.core.training import build, steps_per_epoch, train_epoch
from mnist_cnn.data.mnist import load_processed
from mnist_cnn.files import save_tensors, write_csv, write_json
from mnist_cnn.paths import MODEL_PATH, TRAIN_HISTORY, TRAIN_METRICS
from mnist_cnn.tracking import lineage, store


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    test_loss: float
    test_accuracy: float
    seconds: float  # training time of the epoch, without the test-set evaluation


def measure_test_set(model: Net, images: torch.Tensor, labels: torch.Tensor, batch: int) -> tuple[float, float]:
    log_probs = predict_log_probs(model, images, batch)
    return mean_nll(log_probs, labels).item(), accuracy(log_probs, labels)


def fit(params: Params) -> list[EpochResult]:
    """Train for params.train.epochs. Rank 0 (the only process without torchrun) evaluates
    after each epoch, logs to the active MLflow run and writes the outputs; other ranks only train."""
    device = pick_device(params.train.device)
    train_x, train_y = load_processed("train", params.data.subset)
    test_x, test_y = load_processed("test")
    if distributed.rank() == 0:  # the run's training data, with DVC's hash as its digest
        lineage.log_input(lineage.dataset(params, "train", train_x.numpy(), train_y.numpy()), context="training")
    train_x, train_y = train_x.to(device), train_y.to(device)
    test_x, test_y = test_x.to(device), test_y.to(device)
    step = build(params, train_x, train_y)
    lead = step.rank == 0
    batch_size = params.train.batch_size
    steps = steps_per_epoch(len(train_x), batch_size, step.world)
    on = f"{device} x {step.world} processes" if step.world > 1 else str(device)
    if lead:
        print(f"train: {len(train_x)} images, {params.train.epochs} epochs on {on}, augment={params.augment}")

    history: list[EpochResult] = []
    for epoch in range(1, params.train.epochs + 1):
        started = time.perf_counter()
        show_bar = lead and sys.stderr.isatty()
        with tqdm(total=steps, desc=f"epoch {epoch}", unit="batch", disable=not show_bar, leave=False) as bar:
            train_loss = train_epoch(step, len(train_x), batch_size, bar, epoch)
        train_seconds = time.perf_counter() - started
        if not lead:
            continue
        test_loss, test_accuracy = measure_test_set(step.net, test_x, test_y, params.train.eval_batch_size)
        history.append(EpochResult(epoch, train_loss, test_loss, test_accuracy, train_seconds))
        speed = len(train_x) / train_seconds
        print(
            f"epoch {epoch}: train_loss={train_loss:.4f} test_loss={test_loss:.4f} "
            f"test_accuracy={test_accuracy:.2%} (trained in {train_seconds:.1f} s, {speed:,.0f} img/s)",
            flush=True,
        )
        lr = float(step.optimizer.param_groups[0]["lr"])  # the rate the next step will use
        measured = {"train_loss": train_loss, "test_loss": test_loss, "test_accuracy": test_accuracy, "lr": lr}
        mlflow.log_metrics({store.EPOCH_PREFIX + k: v for k, v in measured.items()}, step=epoch)
        write_csv(TRAIN_HISTORY, [asdict(r) for r in history])

    if lead:
        save_tensors(MODEL_PATH, {"state_dict": step.net.state_dict(), "arch": step.net.arch})
    return history


def check_parallel(params: Params) -> None:
    """What params cannot know: the process count of a torchrun started by hand (several machines)."""
    world, train = distributed.launched_world_size(), params.train
    if problem := parallel_problem(train.batch_size, train.cuda_graph, world, f"torchrun's {world} processes"):
        raise UserError(problem)


def main() -> None:
    params = load_params()
    check_parallel(params)
    if params.train.nproc > 1 and not distributed.launched():
        distributed.relaunch(params.train.nproc)  # does not return: torchrun runs this module N times
    with distributed.process_group(pick_device(params.train.device).type):
        if distributed.rank() != 0:
            fit(params)
            return
        with store.start_run(params):
            mlflow.log_param("world_size", distributed.world_size())
            history = fit(params)
            train_seconds = sum(r.seconds for r in history)
            # The last epoch's test loss and accuracy are in the run's history (epoch/*) and the CSV; the test
            # metrics DVC shows are evaluate's alone (metrics/eval.json).
            write_json(TRAIN_METRICS, {"train_loss": history[-1].train_loss, "train_seconds": round(train_seconds, 2)})
            mlflow.log_metric("train_seconds", train_seconds)
            mlflow.log_artifact(str(TRAIN_HISTORY), artifact_path="plots")


if __name__ == "__main__":
    run_stage(main)
