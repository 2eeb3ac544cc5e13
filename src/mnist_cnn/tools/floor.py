"""Save the no-op floor model (tools.floor_model) to a folder, for `python -m mnist_cnn.serving.server -m DIR`."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from mnist_cnn.cli import UserError, run_stage


def save(folder: Path) -> None:
    import mlflow

    from mnist_cnn.registry.publish import SIGNATURE

    if folder.exists() and any(folder.iterdir()):
        raise UserError(f"{folder}: not empty")
    warnings.filterwarnings("ignore", category=UserWarning, module="mlflow")  # the signature is given
    mlflow.pyfunc.save_model(str(folder), python_model=str(Path(__file__).with_name("floor_model.py")),
                             signature=SIGNATURE, pip_requirements=[])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mnist_cnn.tools.floor", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    save(parser.parse_args(argv).folder)


if __name__ == "__main__":
    run_stage(main)
