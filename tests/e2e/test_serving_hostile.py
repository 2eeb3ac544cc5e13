"""`make serve`'s server under a hostile client: fuzzed payloads, huge bodies, bad requests interleaved
with good ones on shared keep-alive connections. One real server (conftest's scoring_server, the one
test_serving.py uses); every answer is a 200 or a short 4xx, every good request gets its digits, and
the workers' memory stays bounded."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import mlflow
import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mnist_cnn.files import load_tensors

MAX_ERROR = 300  # bytes: the longest error answer allowed
MAX_BODY = 1 << 20  # the server's default cap
BLANK = [[0] * 28] * 28


def workers_rss(server: dict) -> int:
    """The resident memory of the server's processes (the launcher and its uvicorn workers), bytes."""
    port = urlsplit(server["url"]).port
    launcher = next(
        p for p in psutil.process_iter(["cmdline"])
        if "mnist_cnn.serving.server" in (p.info["cmdline"] or []) and str(port) in p.info["cmdline"]
    )  # fmt: skip
    return sum(p.memory_info().rss for p in [launcher, *launcher.children(recursive=True)])


@pytest.fixture(scope="module")
def connection(scoring_server: dict) -> Iterator[http.client.HTTPConnection]:
    """One keep-alive connection, reopened only after an answer with `Connection: close`."""
    parts = urlsplit(scoring_server["url"])
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    yield conn
    conn.close()


def post(conn: http.client.HTTPConnection, body: bytes, content_type: str = "application/json") -> tuple[int, bytes]:
    """One request on the shared connection: (status, answer). A reset or a dropped connection fails the test."""
    conn.request("POST", "/invocations", body=body, headers={"Content-Type": content_type})
    response = conn.getresponse()
    answer = response.read()
    if response.getheader("Connection", "").lower() == "close":
        conn.close()  # http.client reconnects on the next request
    return response.status, answer


def check(status: int, answer: bytes) -> None:
    assert status == 200 or 400 <= status < 500, (status, answer[:300])
    if status != 200:
        assert len(answer) <= MAX_ERROR, (status, len(answer))
        assert set(json.loads(answer)) == {"error_code", "message"}


@pytest.fixture(scope="module")
def digits(scoring_server: dict) -> tuple[list[bytes], list[list[int]]]:
    """Good bodies of 1-3 test digits and the digits the model answers for each (in this process)."""
    images = load_tensors(scoring_server["repo"] / "data/processed/test.pt")["images"][:60].numpy()
    mlflow.set_tracking_uri(f"sqlite:///{scoring_server['repo'] / 'mlruns' / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(scoring_server["model"])
    bodies, expected, start = [], [], 0
    for size in [1, 2, 3] * 10:
        batch = images[start : start + size]
        start += size
        bodies.append(json.dumps({"inputs": batch.tolist()}).encode())
        expected.append([r["digit"] for r in model.predict(batch)])
    return bodies, expected


@pytest.fixture(scope="module")
def rss_after_warmup(scoring_server: dict, digits: tuple) -> int:
    asyncio.run(interleaved(scoring_server["url"], digits, requests=300, bad_every=0))
    return workers_rss(scoring_server)


# --- the seven kinds of request the unguarded server got wrong, on the real server ---


def test_random_bytes_over_the_cap_are_a_short_413_that_closes(connection: http.client.HTTPConnection) -> None:
    status, answer = post(connection, os.urandom(5_000_000))
    assert status == 413 and len(answer) <= MAX_ERROR
    assert post(connection, json.dumps({"inputs": [BLANK]}).encode())[0] == 200  # a new connection, as announced


def test_a_huge_string_is_not_echoed(connection: http.client.HTTPConnection) -> None:
    status, answer = post(connection, json.dumps({"inputs": "x" * 1_000_000}).encode())
    assert status == 400 and len(answer) <= MAX_ERROR and b"xxx" not in answer


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_deep_nesting_is_a_400_on_a_connection_that_stays_open(
    connection: http.client.HTTPConnection, depth: int
) -> None:
    status, answer = post(connection, b'{"inputs": ' + b"[" * depth + b"]" * depth + b"}")
    assert status == 400 and len(answer) <= MAX_ERROR
    assert (b"nested too deeply" in answer) == (depth > 1024), answer  # orjson's limit; below it, the shape's
    sock = connection.sock
    assert post(connection, json.dumps({"inputs": [BLANK]}).encode())[0] == 200
    assert connection.sock is sock  # the same connection


@pytest.mark.parametrize(
    ("pixel", "kind"),
    [(-0.5, "a float"), (0.7, "a float"), (255.9, "a float"), ("12", "a string"), (True, "a boolean"),
     (-3, "a negative integer")],
)  # fmt: skip
def test_pixels_the_docs_call_invalid_are_a_400_naming_the_position(
    connection: http.client.HTTPConnection, pixel: object, kind: str
) -> None:
    picture = json.loads(json.dumps(BLANK))
    picture[4][9] = pixel
    status, answer = post(connection, json.dumps({"inputs": [BLANK, picture]}).encode())
    assert status == 400 and json.loads(answer)["message"].startswith(f"inputs[1][4][9]: {kind};")


# --- the fuzz ---

leaf = st.none() | st.booleans() | st.integers(-300, 300) | st.floats() | st.text(max_size=5)
nested = st.recursive(leaf, lambda c: st.lists(c, max_size=30) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                      max_leaves=300)  # fmt: skip
shapes = st.tuples(st.integers(0, 3), st.integers(0, 30), st.integers(0, 30)).map(
    lambda s: np.zeros(s, dtype=int).tolist()
)
payloads = st.one_of(
    st.binary(max_size=3000),
    st.builds(lambda k, v: json.dumps({k: v}).encode(), st.sampled_from(["inputs", "instances", "params", ""]), nested),
    st.builds(lambda v: json.dumps({"inputs": v}).encode(), shapes),
    st.builds(lambda v, enc: json.dumps({"inputs": v}, ensure_ascii=False).encode(enc, "replace"), nested,
              st.sampled_from(["utf-16", "utf-32", "latin-1", "utf-8-sig"])).filter(bool),
    st.builds(lambda d: b'{"inputs": ' + b"[" * d + b"]" * d + b"}", st.integers(1, 5000)),
)  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])  # fmt: skip
@given(body=payloads, content_type=st.sampled_from(["application/json", "application/json; charset=utf-8",
                                                    "text/csv", "application/x-www-form-urlencoded"]))  # fmt: skip
def test_fuzzed_payloads_get_a_200_or_a_short_4xx(
    connection: http.client.HTTPConnection, body: bytes, content_type: str
) -> None:
    check(*post(connection, body, content_type))


# --- many clients at once ---

BAD = [b"not json", b'{"inputs": ' + b"[" * 3000 + b"]" * 3000 + b"}",
       json.dumps({"inputs": [[[0.5] * 28] * 28]}).encode(), json.dumps({"inputs": [[["7"] * 28] * 28]}).encode(),
       json.dumps({"inputs": "x" * 200_000}).encode(), b"\xff" * 5000, json.dumps({"inputs": [BLANK[:5]]}).encode(),
       b"[" * (MAX_BODY + 10)]  # fmt: skip


async def interleaved(url: str, digits: tuple, requests: int, bad_every: int) -> dict:
    """`requests` posts over 20 keep-alive connections, every `bad_every`-th a bad one (0: none)."""
    bodies, expected = digits
    seen = {"good": 0, "bad": 0, "wrong": [], "statuses": set()}
    rng = random.Random(0)

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        bad = bad_every and i % bad_every == bad_every - 1
        k = rng.randrange(len(bodies))
        body = BAD[rng.randrange(len(BAD))] if bad else bodies[k]
        async with session.post(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}) as r:
            answer = await r.read()
            seen["statuses"].add(r.status)
            if bad:
                check(r.status, answer)
                assert r.status != 200
                seen["bad"] += 1
            elif r.status != 200 or [p["digit"] for p in json.loads(answer)["predictions"]] != expected[k]:
                seen["wrong"].append((r.status, answer[:200]))
            else:
                seen["good"] += 1

    connector = aiohttp.TCPConnector(limit=20)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(one(session, i) for i in range(requests)))
    return seen


def test_bad_requests_interleaved_with_good_ones_hurt_none(
    scoring_server: dict, digits: tuple, rss_after_warmup: int
) -> None:
    seen = asyncio.run(interleaved(scoring_server["url"], digits, requests=1500, bad_every=3))
    assert seen["wrong"] == [] and seen["good"] == 1000 and seen["bad"] == 500, seen["wrong"][:3]
    assert seen["statuses"] <= {200, 400, 413}


def test_the_servers_memory_stays_bounded(scoring_server: dict, rss_after_warmup: int) -> None:
    """Last in this module: after everything above (about 2,000 requests, bodies up to 5 MB)."""
    end = workers_rss(scoring_server)
    assert end <= rss_after_warmup * 1.15 + (60 << 20), (rss_after_warmup >> 20, end >> 20)
    assert Path(scoring_server["log"]).read_text().count("Traceback") == 0
