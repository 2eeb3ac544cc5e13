"""The scoring server's guard: a pure ASGI middleware around MLflow's scoring app (FastAPI).

- A request body over `max_body` bytes is a 413, answered as soon as the Content-Length (or the
  bytes read so far) says so, with `Connection: close` (the rest of the body is never read).
- POST /invocations with JSON, for a model whose input is uint8 pixels (N, 28, 28): the guard parses
  and checks the body itself (serving.request: a 400 that names the first bad value), and answers it
  with the model's own records, through adaptive batching (serving.batching), in MLflow's answer
  format ({"predictions": ...}, mlflow.pyfunc.scoring_server.predictions_to_json).
- Everything else (/ping, /health, /version, other models' /invocations) goes to MLflow's app;
  an error answer of its is replaced by a short one of the same status, which never echoes the request.
- No exception reaches the server: a failure of the model itself is a short 500.
docs/serving.md lists the limits.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from mnist_cnn.serving.batching import MAX_ROWS, Batcher
from mnist_cnn.serving.request import BadRequest, parse

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_BODY = 1 << 20  # bytes: about 400 digits of the densest pixels a request
# A body over the cap is still read (and dropped) up to this size before the 413, so that the client,
# still sending, reads the answer rather than a reset connection; a larger declared one is not read.
DRAIN = 64 << 20
MESSAGES = {404: "no such endpoint", 405: "method not allowed", 415: "unsupported content type: send application/json",
            504: "Request processing time exceeded limit"}  # fmt: skip
ERROR_CODES = {400: "BAD_REQUEST", 404: "ENDPOINT_NOT_FOUND", 405: "BAD_REQUEST", 413: "BAD_REQUEST",
               415: "BAD_REQUEST", 500: "INTERNAL_ERROR", 504: "INTERNAL_ERROR"}  # fmt: skip
JSON_TYPE = "application/json"


class TooLarge(Exception):
    pass


def error_body(status: int, message: str) -> bytes:
    """MLflow's error format, {"error_code", "message"}, kept short."""
    return json.dumps({"error_code": ERROR_CODES.get(status, "BAD_REQUEST"), "message": message[:200]}).encode()


async def answer(send: Send, status: int, body: bytes, close: bool = False) -> None:
    headers = [(b"content-type", JSON_TYPE.encode()), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def read_body(receive: Receive, limit: int) -> bytes:
    """The whole body, or TooLarge once it passes `limit` bytes (after dropping the rest, up to DRAIN)."""
    body, dropped = bytearray(), 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionResetError
        chunk = message.get("body", b"")
        if dropped or len(body) + len(chunk) > limit:
            body.clear()
            dropped += len(chunk)
        else:
            body += chunk
        if not message.get("more_body", False) or dropped > DRAIN:
            if dropped:
                raise TooLarge
            return bytes(body)


def short_errors(send: Send) -> Send:
    """`send` for MLflow's app: an error answer's body (which may hold the request's repr) becomes a
    short message of the same status."""
    state: dict[str, Any] = {}

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] >= 400:
            state["status"] = message["status"]
            return
        if "status" in state and message["type"] == "http.response.body":
            if not message.get("more_body", False):
                status = state.pop("status")
                message = MESSAGES.get(status, f"request refused ({status}): see docs/serving.md")
                await answer(send, status, error_body(status, message))
            return
        await send(message)

    return wrapped


class Guard:
    def __init__(self, app: App, predict: Callable | None, max_body: int = MAX_BODY, timeout_s: float = 60.0,
                 wait_s: float = 0.0, max_rows: int = MAX_ROWS) -> None:  # fmt: skip
        """`predict`: the model's predict for uint8 pixels (N, 28, 28), or None for a model of another
        input (its requests then go to MLflow's app, checked only for size)."""
        self.app, self.max_body, self.timeout_s = app, max_body, timeout_s
        self.batcher = Batcher(predict, max_rows, wait_s) if predict is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            await self._http(scope, receive, send)
        except ConnectionResetError:
            return
        except Exception:  # a bug of ours or MLflow's: a short 500, never a dropped connection
            await answer(send, 500, error_body(500, "internal error"), close=True)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"0")
        if not length.isdigit():
            return await answer(send, 400, error_body(400, "bad Content-Length"), close=True)
        if int(length) > DRAIN:
            return await answer(send, 413, error_body(413, f"the body is over {self.max_body} bytes"), close=True)
        try:
            body = await read_body(receive, self.max_body)
        except TooLarge:
            return await answer(send, 413, error_body(413, f"the body is over {self.max_body} bytes"), close=True)
        mime = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        scoring = scope["path"] == "/invocations" and scope["method"] == "POST" and mime == b"application/json"
        if self.batcher and scoring:
            return await self._score(body, headers.get(b"content-type", b""), send)
        await self.app(scope, replay(body, receive), short_errors(send))

    async def _score(self, body: bytes, content_type: bytes, send: Send) -> None:
        charset = content_type.partition(b"charset=")[2].strip().lower()
        if charset and charset != b"utf-8":
            return await answer(send, 415, error_body(415, "the scoring server only reads UTF-8"))
        try:
            pixels = parse(body)
        except BadRequest as error:
            return await answer(send, 400, error_body(400, str(error)))
        try:
            outputs = await asyncio.wait_for(self.batcher.submit(pixels), self.timeout_s)
        except TimeoutError:
            return await answer(send, 504, error_body(504, "Request processing time exceeded limit"))
        except Exception:
            return await answer(send, 500, error_body(500, "the model failed on this request"))
        from mlflow.pyfunc.scoring_server import predictions_to_json

        text = io.StringIO()
        predictions_to_json(outputs, text)
        await answer(send, 200, text.getvalue().encode())


def replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands MLflow's app the body already read, then the server's own (a disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
