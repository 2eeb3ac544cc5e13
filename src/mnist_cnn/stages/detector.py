"""Stage detector: the not-a-digit detector (core.detector), trained once per dataset and shared by every
classifier (it does not depend on the classifier's params, so an experiment on the classifier reuses it).

params detector.*, evaluate.detector_share + data/processed/ -> models/detector.pt: the weights of the
detector's members, and `held_out`, the training images none has fitted, on which evaluate fits the
refusal's thresholds. With evaluate.detector_share 0 the refusal does not use it, and the file is empty:
nothing trains.
"""

from __future__ import annotations

import torch

from mnist_cnn.cli import UserError, run_stage
from mnist_cnn.config import load_params
from mnist_cnn.core import detector as network
from mnist_cnn.core import detector_training as detector
from mnist_cnn.core.runtime import tune_cpu_allocator
from mnist_cnn.data.mnist import load_processed
from mnist_cnn.files import save_tensors
from mnist_cnn.paths import DETECTOR


def main() -> None:
    params = load_params()
    if params.evaluate.detector_share == 0:
        save_tensors(DETECTOR, {})
        print("detector: off (evaluate.detector_share is 0), not trained")
        return
    settings = params.detector
    tune_cpu_allocator()  # freed activations stay in the heap (core.runtime)
    torch.set_num_threads(min(torch.get_num_threads(), settings.threads))
    images, labels = load_processed("train")
    held = round(len(images) * settings.held_out)
    if not 0 < held < len(images):
        raise UserError(f"detector.held_out ({settings.held_out}) of {len(images)} training images holds out {held}")
    fitted, held_out = detector.held_out_split(len(images), held, settings.seed)
    each = [
        detector.train(
            images[fitted],
            labels[fitted],
            steps=settings.steps,
            batch_size=settings.batch_size,
            lr=settings.lr,
            width=settings.width,
            negatives=settings.negatives,
            seed=settings.seed + member,  # the same digits held out, another initialisation and draw
        )
        for member in range(settings.members)
    ]
    save_tensors(DETECTOR, {**network.joined(each), "held_out": held_out})
    print(
        f"detector: {settings.members} trained on {len(fitted)} digits, "
        f"{len(held_out)} held out for the refusal's thresholds"
    )


if __name__ == "__main__":
    run_stage(main)
