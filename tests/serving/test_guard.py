"""The guard (serving.guard) around MLflow's real scoring app, called in this process as uvicorn calls
an ASGI app: body cap, short errors, the scoring path and MLflow's own answers. The same guard on a
real server, under a hostile client, is tests/e2e/test_serving.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from mlflow.pyfunc import PyFuncModel, scoring_server

from mnist_cnn.serving.guard import DRAIN, Guard
from mnist_cnn.serving.server import takes_pixels
from mnist_cnn.tools import floor, floor_model

BLANK = [[0] * 28] * 28
GOOD = json.dumps({"inputs": [BLANK, BLANK]}).encode()
CAP = 10_000


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> PyFuncModel:
    """The floor model: the served model's signature, one constant record per picture."""
    folder = tmp_path_factory.mktemp("floor") / "model"
    floor.save(folder)
    loaded = scoring_server.load_model_with_mlflow_config(str(folder))
    assert takes_pixels(loaded)
    return loaded


@pytest.fixture(scope="module")
def guarded(model: PyFuncModel) -> Guard:
    """The floor model in MLflow's app, behind the guard."""
    return Guard(scoring_server.init(model), model.predict, max_body=CAP)


def call(
    app: Guard, body: bytes = b"", path: str = "/invocations", method: str = "POST",
    content_type: str = "application/json", chunks: int = 1, length: str | None = None,
) -> tuple[int, dict[bytes, bytes], bytes, int]:  # fmt: skip
    """(status, headers, body, bytes of the request read by the app) of one request."""
    headers = [(b"content-type", content_type.encode())]
    if length is not None or chunks == 1:
        headers.append((b"content-length", (length if length is not None else str(len(body))).encode()))
    scope = {"type": "http", "method": method, "path": path, "headers": headers, "query_string": b"",
             "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 1), "client": ("127.0.0.1", 2),
             "root_path": "", "raw_path": path.encode()}  # fmt: skip
    size = max(1, -(-len(body) // chunks))
    parts = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
    read, sent = [0], []

    async def receive() -> dict:
        if read[0] < len(parts):
            read[0] += 1
            return {"type": "http.request", "body": parts[read[0] - 1], "more_body": read[0] < len(parts)}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    answer = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), answer, sum(len(p) for p in parts[: read[0]])


def test_good_pixels_get_the_models_records_in_mlflows_format(guarded: Guard, model: PyFuncModel) -> None:
    status, headers, answer, _ = call(guarded, GOOD)
    assert status == 200 and headers[b"content-type"] == b"application/json"
    assert json.loads(answer) == {"predictions": [floor_model.RECORD] * 2}
    assert b"connection" not in headers
    # Byte for byte what MLflow's own /invocations answers.
    own = scoring_server.invocations(GOOD, "application/json", model, model.metadata.get_input_schema())
    assert own.status == 200 and answer == own.response.encode()


def test_bad_pixels_are_a_short_400_that_names_the_position(guarded: Guard) -> None:
    status, headers, answer, _ = call(guarded, json.dumps({"inputs": [[[0.7] * 28] * 28]}).encode())
    assert status == 400 and len(answer) < 300 and b"connection" not in headers
    message = "inputs[0][0][0]: a float; pixels are integers 0-255"
    assert json.loads(answer) == {"error_code": "BAD_REQUEST", "message": message}


@pytest.mark.parametrize("chunks", [1, 7])
def test_a_body_over_the_cap_is_a_413_that_closes_the_connection(guarded: Guard, chunks: int) -> None:
    body = b"[" * (CAP + 1)
    status, headers, answer, read = call(guarded, body, chunks=chunks, length=None if chunks > 1 else str(len(body)))
    assert status == 413 and headers[b"connection"] == b"close" and len(answer) < 300
    assert read == len(body)  # read to the end (and dropped): the client sees the answer, not a reset


def test_a_declared_body_past_the_drain_limit_is_not_read(guarded: Guard) -> None:
    status, headers, _, read = call(guarded, b"x", length=str(DRAIN + 1))
    assert status == 413 and headers[b"connection"] == b"close" and read == 0
    status, headers, _, _ = call(guarded, b"x", length="12abc")
    assert status == 400 and headers[b"connection"] == b"close"


def test_mlflows_error_answers_are_replaced_by_short_ones(guarded: Guard) -> None:
    """MLflow's own 4xx answers quote the request (its content type, its CSV); the guard's never do."""
    secret = "s3cr3t" * 1000
    cases = [(secret.encode(), "text/csv"), (b"x", f"text/{secret}"), (GOOD, "application/json; charset=latin-1")]
    for body, content_type in cases:
        status, _, answer, _ = call(guarded, body, content_type=content_type)
        assert 400 <= status < 500 and len(answer) < 300 and b"s3cr3t" not in answer, (status, answer)
    status, _, answer, _ = call(guarded, path="/nothing", method="GET")
    assert status == 404 and len(answer) < 300


def test_mlflows_other_routes_answer_as_before(guarded: Guard) -> None:
    assert call(guarded, path="/ping", method="GET")[0] == 200
    status, _, answer, _ = call(guarded, path="/version", method="GET")
    assert status == 200 and answer.decode()[0].isdigit()


def test_a_model_failure_is_a_short_500(tmp_path: Path) -> None:
    def broken(pixels: object) -> None:
        raise RuntimeError("x" * 10_000)

    guard = Guard(lambda scope, receive, send: None, broken)  # type: ignore[arg-type,return-value]
    status, _, answer, _ = call(guard, GOOD)
    assert status == 500 and len(answer) < 300 and b"xxx" not in answer
