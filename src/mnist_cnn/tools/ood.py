"""A checkpoint's accuracy on the out-of-distribution handwriting set (mnist_cnn.evaluation.ood), without
the pipeline: `python -m mnist_cnn.tools.ood [--model models/model.pt]`."""

from __future__ import annotations

import argparse
from pathlib import Path

from mnist_cnn.cli import run_stage
from mnist_cnn.core.model import load_checkpoint
from mnist_cnn.evaluation.ood import load_ood_set, ood_accuracy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mnist_cnn.tools.ood", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/model.pt"), help="a model.pt checkpoint")
    args = parser.parse_args(argv)
    net = load_checkpoint(str(args.model))
    print(f"ood_accuracy {ood_accuracy(net):.4f} ({len(load_ood_set()[1])} digits)")


if __name__ == "__main__":
    run_stage(main)
