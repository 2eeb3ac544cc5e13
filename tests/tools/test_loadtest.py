"""The load script against a real tiny HTTP server in this process: counts, errors, loopback only."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from helpers import free_port
from mnist_cnn.cli import UserError, run_stage
from mnist_cnn.tools import loadtest


class Counter(BaseHTTPRequestHandler):
    """Answers every third POST with a 500, the others with a prediction-shaped 200."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the scoring server
    lock = threading.Lock()
    posts: ClassVar[list[int]] = []  # the status of each answer (one server per module)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            status = 500 if len(self.posts) % 3 == 2 else 200
            self.posts.append(status)
        answer = json.dumps({"predictions": [[0.0] * 10] * len(body["inputs"])}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: object) -> None:  # quiet
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), Counter)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/invocations"
    httpd.shutdown()
    thread.join()


def test_counts_requests_and_errors_as_the_server_saw_them(server: str, capsys: pytest.CaptureFixture) -> None:
    Counter.posts.clear()
    loadtest.main(["--url", server, "--clients", "4", "--duration", "1", "--batch", "1,16"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    seen = Counter.posts[1:]  # the first POST is the reachability check, before the clock starts
    assert result["requests"] == len(seen) > 0
    assert result["errors"] == seen.count(500) > 0
    assert result["error_kinds"] == {"500": seen.count(500)}
    assert result["ok"] == seen.count(200)
    assert result["p50_ms"] <= result["p99_ms"] <= result["max_ms"]
    assert result["requests_per_s"] == pytest.approx(result["ok"] / result["duration_s"], rel=0.02)
    assert result["client_cpu_s"] > 0


def test_payloads_cycle_the_batch_sizes() -> None:
    bodies = loadtest.payloads([1, 16], variants=2)
    inputs = [json.loads(b)["inputs"] for b in bodies]
    assert [(len(x), len(x[0]), len(x[0][0])) for x in inputs] == [(1, 28, 28), (16, 28, 28)] * 2
    pixels = {p for x in inputs for image in x for row in image for p in row}
    assert all(isinstance(p, int) and 0 <= p <= 255 for p in pixels) and len(pixels) > 2  # uint8 pixels


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:5001/x", "http://127.3.2.1/", "http://localhost:80/", "http://[::1]:5001/"]
)
def test_loopback_targets_are_accepted(url: str) -> None:
    assert loadtest.check_loopback(url) == url


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1:5001/invocations",
        "http://192.168.1.2/",
        "http://8.8.8.8/",
        "http://example.com/",
        "ftp://127.0.0.1/",
    ],
)
def test_other_targets_are_refused_before_any_request(url: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_stage(lambda: loadtest.main(["--url", url, "--duration", "1"]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --url") and len(err.splitlines()) == 1


def test_no_server_is_one_clear_error() -> None:
    url = f"http://127.0.0.1:{free_port()}/invocations"
    with pytest.raises(UserError, match="no answer"):
        loadtest.main(["--url", url, "--clients", "2", "--duration", "1"])


@pytest.mark.parametrize(
    "args", [["--clients", "0"], ["--duration", "0"], ["--duration", "3600"], ["--batch", "1,x"], ["--rate", "-1"]]
)
def test_bad_arguments_are_refused(args: list[str]) -> None:
    with pytest.raises(UserError):
        loadtest.main(["--url", "http://127.0.0.1:1/", *args])


class OneAtATime(BaseHTTPRequestHandler):
    """A server of fixed capacity: 20 answers a second, one at a time, however many connections."""

    protocol_version = "HTTP/1.1"
    lock = threading.Lock()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            time.sleep(0.05)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"[]")

    def log_message(self, *args: object) -> None:
        pass


def test_an_open_loop_counts_the_queueing_a_closed_loop_hides(capsys: pytest.CaptureFixture) -> None:
    httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), OneAtATime)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/invocations"
    try:
        loadtest.main(["--url", url, "--clients", "1", "--duration", "1", "--batch", "1"])
        closed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        # 40 arrivals a second against a capacity of 20: the last of the second's 40 is answered about
        # a second after it was due, however few connections are busy.
        loadtest.main(["--url", url, "--clients", "8", "--duration", "1", "--batch", "1", "--rate", "40"])
        opened = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    finally:
        httpd.shutdown()
    assert closed["rate"] is None and opened["rate"] == 40.0
    assert opened["requests"] == opened["ok"] == 40  # every scheduled arrival was sent and answered
    assert closed["p50_ms"] >= 50 and opened["p50_ms"] >= 50
    assert opened["p99_ms"] > 500 > 3 * closed["p50_ms"]


def test_every_kth_body_is_malformed_and_known_as_such() -> None:
    good = loadtest.payloads([1], variants=3)
    bodies, bad = loadtest.mixed(good, 5)
    assert len(bodies) % 5 == 0 and bodies[0] in good
    flags = [id(b) in bad for b in bodies]
    assert flags == [i % 5 == 4 for i in range(len(bodies))]
    assert {b for b in bodies if id(b) in bad} == set(loadtest.malformed())  # each kind at least once
    assert loadtest.mixed(good, 0) == (good, set())


@pytest.mark.parametrize("value", ["1", "-1"])
def test_malformed_needs_k_of_2_or_more(value: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_stage(lambda: loadtest.main(["--malformed", value, "--duration", "1"]))
    assert exit_info.value.code == 2
