"""`mlflow models serve` on the registered model answers the standard /invocations protocol."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from helpers import VENV_BIN, free_port, http_server
from mnist_cnn import loadtest, refusal
from mnist_cnn.data import load_tensors
from mnist_cnn.model import normalize

pytestmark = pytest.mark.slow


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@pytest.fixture(scope="module")
def server(pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    uri = f"sqlite:///{pipeline / 'mlruns' / 'mlflow.db'}"
    cmd = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", "models:/mnist-cnn/1", "--env-manager", "local"]
    cmd += ["-h", "127.0.0.1", "-p", str(port)]
    with http_server(cmd, tmp_path_factory.mktemp("serve"), "/ping", port, MLFLOW_TRACKING_URI=uri) as base:
        yield base


def test_served_answers_match_the_model(pipeline: Path, server: str) -> None:
    test = load_tensors(pipeline / "data/processed/test.pt")
    images = normalize(test["images"][:32].unsqueeze(1)).numpy()
    status, body = post(f"{server}/invocations", json.dumps({"inputs": images.tolist()}).encode())
    assert status == 200, body
    served = body["predictions"]
    assert len(served) == 32 and set(served[0]) == {"digit", "probability", "reason"}
    mlflow.set_tracking_uri(f"sqlite:///{pipeline / 'mlruns' / 'mlflow.db'}")
    local = mlflow.pyfunc.load_model("models:/mnist-cnn/1").predict(images)
    assert [s["digit"] for s in served] == local["digit"].tolist()
    np.testing.assert_allclose([s["probability"] for s in served], local["probability"], rtol=1e-4, atol=1e-4)
    accuracy = (local["digit"].to_numpy() == test["labels"][:32].numpy()).mean()
    assert accuracy > 0.5  # synthetic digits; chance is 0.1 (a refused digit counts as wrong)


def test_noise_and_a_blank_input_are_refused(server: str) -> None:
    noise = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 255
    inputs = torch.cat([normalize(noise), normalize(torch.zeros(1, 1, 28, 28))]).numpy()
    status, body = post(f"{server}/invocations", json.dumps({"inputs": inputs.tolist()}).encode())
    assert status == 200, body
    noise_answer, blank_answer = body["predictions"]
    assert noise_answer["digit"] == -1 and noise_answer["reason"].startswith("not a digit"), noise_answer
    assert blank_answer == {"digit": -1, "probability": 0.0, "reason": refusal.BLANK}


def test_malformed_payload_is_a_4xx_and_server_keeps_serving(server: str) -> None:
    for bad in (b"not json", json.dumps({"inputs": [[1.0, 2.0]]}).encode(), json.dumps({"wrong": 1}).encode()):
        status, _ = post(f"{server}/invocations", bad)
        assert 400 <= status < 500, (bad, status)
    good = torch.zeros(1, 1, 28, 28).numpy().tolist()
    status, body = post(f"{server}/invocations", json.dumps({"inputs": good}).encode())
    assert status == 200 and len(body["predictions"]) == 1


def test_load_script_against_the_served_model(
    pipeline: Path, server: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(pipeline)  # the load script posts the test digits of data/processed
    loadtest.main(["--url", f"{server}/invocations", "--clients", "4", "--duration", "2", "--batch", "1,16"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["errors"] == 0, result
    assert result["ok"] == result["requests"] > 0
