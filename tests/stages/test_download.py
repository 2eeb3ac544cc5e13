"""The download stage's writes: a full disk or a file in the way is one error line, and nothing is
left half-written. (Where the files come from is tested in tests/data/test_sources.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import copy_prepared, error_with_a_file_in_the_way, file_size_limit, stage_error, write_params
from mnist_cnn.stages import download


def test_full_disk_while_downloading_is_one_error_line(
    small_mnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, in_process
) -> None:
    write_params(tmp_path, small_mnist)
    monkeypatch.chdir(tmp_path)
    with file_size_limit(64 * 1024):
        line = stage_error(download.main, capsys)
    assert line.startswith("error: cannot write data/raw/"), line
    assert line.endswith("File too large"), line
    assert list((tmp_path / "data" / "raw").iterdir()) == []  # no partial file, no staging directory


def test_a_file_where_data_raw_should_be_is_one_error_line(prepared, small_mnist, tmp_path, capsys, in_process) -> None:
    work = copy_prepared(prepared, tmp_path / "work", small_mnist)
    line = error_with_a_file_in_the_way(download.main, work, "data/raw", capsys)
    assert line.startswith("error: cannot write data/raw: "), line
