"""`make serve`'s server (MLflow's scoring app behind the guard) on the registered model answers the
standard /invocations protocol."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from helpers import REPO
from mnist_cnn.core import refusal
from mnist_cnn.files import load_tensors
from mnist_cnn.tools import loadtest


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@pytest.fixture(scope="module")
def repo(rerun: dict) -> Path:
    """The `rerun` scenarios' repository: its workspace's model is version 2, published again after
    its refusal changed (the `pipeline` worker has enough to do)."""
    return rerun["repo"]


@pytest.fixture(scope="module")
def server(scoring_server: dict) -> str:
    return scoring_server["url"]


def test_served_answers_match_the_model(repo: Path, server: str) -> None:
    test = load_tensors(repo / "data/processed/test.pt")
    pixels = test["images"][:32].numpy()  # uint8 (32, 28, 28), as the served model takes them
    status, body = post(f"{server}/invocations", json.dumps({"inputs": pixels.tolist()}).encode())
    assert status == 200, body
    served = body["predictions"]
    assert len(served) == 32 and set(served[0]) == {"digit", "probability", "reason"}
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(json.loads((repo / "models/registered.json").read_text())["model"])
    assert str(model.metadata.get_input_schema()) == "[Tensor('uint8', (-1, 28, 28))]"
    local = model.predict(pixels)  # the same records in Python
    assert [s["digit"] for s in served] == [r["digit"] for r in local]
    assert [s["reason"] for s in served] == [r["reason"] for r in local]
    np.testing.assert_allclose([s["probability"] for s in served], [r["probability"] for r in local], atol=1e-5)
    accuracy = (np.array([r["digit"] for r in local]) == test["labels"][:32].numpy()).mean()
    assert accuracy > 0.5  # synthetic digits; chance is 0.1 (a refused digit counts as wrong)


def test_noise_and_a_blank_input_are_refused(server: str) -> None:
    noise = torch.randint(0, 256, (28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    inputs = [noise.tolist(), [[0] * 28] * 28]
    status, body = post(f"{server}/invocations", json.dumps({"inputs": inputs}).encode())
    assert status == 200, body
    noise_answer, blank_answer = body["predictions"]
    assert noise_answer["digit"] == -1 and noise_answer["reason"].startswith("not a digit"), noise_answer
    assert blank_answer == {"digit": -1, "probability": 0.0, "reason": refusal.BLANK}


def test_the_readme_example_is_answered_as_a_blank(server: str) -> None:
    """The request README.md's serve section builds, run as it is written there."""
    line = re.search(r"^python3 -c '(.*)' \|$", (REPO / "README.md").read_text(), re.MULTILINE)
    assert line, "README.md has no `python3 -c '...' |` serve example"
    body = subprocess.run([sys.executable, "-c", line.group(1)], capture_output=True, check=True).stdout
    status, answer = post(f"{server}/invocations", body)
    assert status == 200 and answer == {"predictions": [{"digit": -1, "probability": 0.0, "reason": refusal.BLANK}]}


def test_malformed_payload_is_a_4xx_and_server_keeps_serving(server: str) -> None:
    out_of_range = [[[256] * 28] * 28]
    old_format = [[[[-0.4242] * 28] * 28]]  # normalised floats (N, 1, 28, 28), as versions before took them
    for bad in (b"not json", {"inputs": [[1.0, 2.0]]}, {"wrong": 1}, {"inputs": out_of_range}, {"inputs": old_format}):
        status, _ = post(f"{server}/invocations", bad if isinstance(bad, bytes) else json.dumps(bad).encode())
        assert 400 <= status < 500, (bad, status)
    status, body = post(f"{server}/invocations", json.dumps({"inputs": [[[0] * 28] * 28]}).encode())
    assert status == 200 and len(body["predictions"]) == 1


def test_load_script_against_the_served_model(
    repo: Path, server: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(repo)  # the load script posts the test digits of data/processed
    loadtest.main(["--url", f"{server}/invocations", "--clients", "4", "--duration", "2", "--batch", "1,16"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["errors"] == 0, result
    assert result["ok"] == result["requests"] > 0
