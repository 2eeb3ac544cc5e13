"""The stage tests' data: a small synthetic MNIST, and a directory after the download and preprocess
stages (no git, no DVC). These tests are about what the stages do and leave behind, not accuracy."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from helpers import write_params, write_synthetic_mnist
from mnist_cnn.stages import download, preprocess


@pytest.fixture(scope="module")
def small_mnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_mnist(tmp_path_factory.mktemp("small-mnist"), n_train=400, n_test=100)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, small_mnist: Path) -> Path:
    root = tmp_path_factory.mktemp("prepared")
    write_params(root, small_mnist)
    with contextlib.chdir(root):
        download.main()
        preprocess.main()
    return root
