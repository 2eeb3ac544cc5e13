"""Stage download: params data.* -> data/raw/, the four MNIST files, verified by SHA-256 (the
sources, tried in order, are in data.sources; the files land only when all four are good)."""

from __future__ import annotations

import sys

from mnist_cnn.cli import run_stage
from mnist_cnn.config import load_params
from mnist_cnn.data.sources import MNIST_FILES, download
from mnist_cnn.paths import RAW_DIR


def main() -> None:
    params = load_params()
    if not params.data.verify_sha256:
        print("download: WARNING data.verify_sha256 is false: checksums not verified", file=sys.stderr)
    print(f"download: {len(MNIST_FILES)} files in {RAW_DIR}/ from {download(params.data)}")


if __name__ == "__main__":
    run_stage(main)
