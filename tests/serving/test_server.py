"""The server's launcher (serving.server): its refusals, in this process; the server itself runs in
tests/e2e/test_serving.py and test_serving_hostile.py."""

from __future__ import annotations

import pytest

from helpers import stage_error
from mnist_cnn.serving import server


@pytest.mark.parametrize("args", [["--max-body", "0"], ["--batch-rows", "0"], ["--batch-wait-ms", "500"]])
def test_bad_settings_are_one_error_line(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert stage_error(lambda: server.main(args), capsys).startswith("error: --max-body and --batch-rows")


def test_a_champion_that_does_not_exist_is_one_error_line(
    mlflow_store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A fresh store (conftest's mlflow_store, MLflow pointed at it), no model registered in it."""
    error = stage_error(lambda: server.main(["-m", "models:/mnist-cnn@champion", "-p", "1"]), capsys)
    assert error.startswith("error: models:/mnist-cnn@champion: ") and len(error) < 300, error
    assert error.endswith("Registered Model with name=mnist-cnn not found"), error  # MLflow's reason, one line
