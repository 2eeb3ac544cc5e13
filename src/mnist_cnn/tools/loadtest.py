"""Bounded load on a scoring server (`make serve`): C clients post digits for D seconds.

Closed loop (the default): each client posts back to back on one keep-alive connection, cycling
through the --batch sizes. Open loop (--rate R): requests arrive at R per second whatever the server
does, and each latency runs from the request's scheduled time, so the wait once the server saturates
counts (a closed loop hides it). Bodies (MNIST test digits from data/processed/, else random pixels)
are encoded before the clock starts: the client shares the cores with the server it measures, and
reports its own CPU time. Loopback targets only. Prints a summary, then one JSON line (docs/serving.md).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import time
from collections import Counter
from urllib.parse import urlsplit

import aiohttp
import numpy as np

from mnist_cnn.cli import UserError, run_stage
from mnist_cnn.files import load_tensors
from mnist_cnn.paths import PROCESSED_DIR

DEFAULT_URL = "http://127.0.0.1:5001/invocations"
MAX_CLIENTS = 1000
MAX_DURATION = 600.0
MAX_ERROR = 300  # bytes: the longest answer a malformed request should get (docs/serving.md)


def check_loopback(url: str) -> str:
    """The URL if its host is a loopback address; a UserError for anything else (no name lookups)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"--url {url!r}: not an http(s) URL")
    try:
        loopback = parts.hostname == "localhost" or ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:  # a name other than localhost: not looked up
        loopback = False
    if not loopback:
        raise UserError(f"--url {url!r}: only loopback targets are allowed (127.0.0.0/8, ::1, localhost)")
    return url


def digits(count: int) -> np.ndarray:
    """`count` uint8 images (N, 28, 28): MNIST test digits if data/processed has them, else random pixels."""
    path = PROCESSED_DIR / "test.pt"
    if path.exists():
        return np.resize(load_tensors(path)["images"].numpy(), (count, 28, 28))  # repeats when the set is smaller
    return np.random.default_rng(0).integers(0, 256, size=(count, 28, 28), dtype=np.uint8)


def payloads(sizes: list[int], variants: int = 8) -> list[bytes]:
    """Request bodies, encoded once: `variants` distinct bodies per batch size, cycled in order of sizes."""
    batches = np.split(digits(variants * sum(sizes)), np.cumsum(sizes * variants)[:-1])
    return [json.dumps({"inputs": batch.tolist()}).encode() for batch in batches]


def malformed() -> list[bytes]:
    """Bodies a careless or hostile client sends: what the server must refuse with a short 4xx."""
    blank = [[0] * 28] * 28
    return [
        b"not json",
        b'{"inputs": ' + b"[" * 2000 + b"]" * 2000 + b"}",
        json.dumps({"inputs": [[[0.5] * 28] * 28]}).encode(),
        json.dumps({"inputs": [[["12"] * 28] * 28]}).encode(),
        json.dumps({"inputs": [blank[:27]]}).encode(),
        json.dumps({"inputs": "x" * 100_000}).encode(),
        b"\xff" * 3000,
    ]


def mixed(bodies: list[bytes], every: int) -> tuple[list[bytes], set[int]]:
    """`bodies` with every `every`-th one malformed (0: none), and the ids of the malformed ones."""
    if not every:
        return bodies, set()
    bad = malformed()
    out = []
    for i in range(max(len(bodies), len(bad)) * every):
        out.append(bad[(i // every) % len(bad)] if i % every == every - 1 else bodies[i % len(bodies)])
    return out, {id(b) for b in bad}


async def client(
    session: aiohttp.ClientSession, url: str, bodies: list[bytes], offset: int, deadline: float, stats: dict
) -> None:
    """Post back to back until the deadline."""
    i = offset
    while time.perf_counter() < deadline:
        await post(session, url, bodies[i % len(bodies)], time.perf_counter(), stats)
        i += 1


async def arrivals(
    session: aiohttp.ClientSession, url: str, bodies: list[bytes], rate: float, deadline: float, stats: dict
) -> None:
    """Open loop: request i is due at start + i / rate and sent then, whether or not earlier ones
    have been answered (the connector's limit queues them); its latency counts from when it was due."""
    start, tasks = time.perf_counter(), []
    while (due := start + len(tasks) / rate) < deadline:
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        tasks.append(asyncio.create_task(post(session, url, bodies[len(tasks) % len(bodies)], due, stats)))
    await asyncio.gather(*tasks)


async def post(session: aiohttp.ClientSession, url: str, body: bytes, start: float, stats: dict) -> None:
    """One request; its latency from `start`, or an error, into stats. A malformed body's answer is
    counted apart: a 4xx of at most MAX_ERROR bytes is what it should get; anything else is an error."""
    bad = id(body) in stats["malformed_ids"]
    try:
        async with session.post(url, data=body) as response:
            answer = await response.read()
            if bad:
                ok = 400 <= response.status < 500 and len(answer) <= MAX_ERROR
                stats["malformed"][str(response.status) if ok else f"unexpected {response.status}"] += 1
                return
            error = None if response.status == 200 else str(response.status)
    except (aiohttp.ClientError, TimeoutError) as exception:
        error = type(exception).__name__
    if bad:
        stats["malformed"][f"unexpected {error}"] += 1
        return
    if error is not None:
        stats["error_kinds"][error] += 1
    stats["failed" if error else "latencies"].append(time.perf_counter() - start)


async def load(
    url: str, clients: int, duration: float, bodies: list[bytes], timeout: float, rate: float, bad: set[int]
) -> dict:
    stats: dict = {
        "latencies": [],
        "failed": [],
        "error_kinds": Counter(),
        "malformed": Counter(),
        "malformed_ids": bad,
    }
    connector = aiohttp.TCPConnector(limit=clients, force_close=False)  # one kept-alive connection per client
    timeouts, headers = aiohttp.ClientTimeout(total=timeout), {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector, timeout=timeouts, headers=headers) as session:
        try:  # one request first, so an absent server is one clear line rather than thousands of errors
            async with session.post(url, data=bodies[0]) as response:
                await response.read()
        except (aiohttp.ClientError, TimeoutError) as error:
            raise UserError(f"{url}: no answer ({type(error).__name__}: {error})") from None
        cpu0, wall0 = time.process_time(), time.perf_counter()
        deadline = wall0 + duration
        if rate:
            await arrivals(session, url, bodies, rate, deadline, stats)
        else:
            await asyncio.gather(*(client(session, url, bodies, k, deadline, stats) for k in range(clients)))
        stats["wall_s"] = time.perf_counter() - wall0
        stats["client_cpu_s"] = time.process_time() - cpu0
    return stats


def summary(stats: dict, clients: int, sizes: list[int]) -> dict:
    ok = np.asarray(stats["latencies"]) * 1000
    errors = len(stats["failed"])
    wall = stats["wall_s"]
    pct = (lambda q: round(float(np.percentile(ok, q)), 1)) if ok.size else (lambda q: None)
    return {
        "clients": clients,
        "batch": sizes,
        "duration_s": round(wall, 2),
        "requests": int(ok.size) + errors,
        "ok": int(ok.size),
        "errors": errors,
        "error_kinds": dict(stats["error_kinds"]),
        "requests_per_s": round(ok.size / wall, 1),
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        "max_ms": pct(100),
        "client_cpu_s": round(stats["client_cpu_s"], 2),
        "client_cpu_share": round(stats["client_cpu_s"] / wall, 3),  # of one core
        "malformed": dict(stats["malformed"]),  # answers to the malformed bodies, by status
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mnist_cnn.tools.loadtest", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_URL, help=f"scoring endpoint, loopback only (default {DEFAULT_URL})")
    parser.add_argument("--clients", "-c", type=int, default=50, help="concurrent clients (default 50)")
    parser.add_argument("--duration", "-d", type=float, default=20.0, help="seconds of load (default 20)")
    parser.add_argument("--batch", default="1,16", help="digits per request, cycled (default 1,16)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds before a request counts as failed")
    parser.add_argument("--rate", type=float, default=0.0, help="open loop: requests per second (default: closed)")
    parser.add_argument("--malformed", type=int, default=0, metavar="K", help="every K-th request malformed (0: none)")
    args = parser.parse_args(argv)

    url = check_loopback(args.url)
    if not 1 <= args.clients <= MAX_CLIENTS:
        raise UserError(f"--clients {args.clients}: must be 1..{MAX_CLIENTS}")
    if not 0 < args.duration <= MAX_DURATION:
        raise UserError(f"--duration {args.duration}: must be > 0 and <= {MAX_DURATION:.0f} s")
    try:
        sizes = [int(s) for s in args.batch.split(",")]
    except ValueError:
        raise UserError(f"--batch {args.batch!r}: expected sizes like 1,16") from None
    if not all(1 <= s <= 1024 for s in sizes):
        raise UserError(f"--batch {args.batch!r}: each size must be 1..1024")

    if not 0 <= args.rate <= 100_000:
        raise UserError(f"--rate {args.rate}: must be 0 (closed loop) .. 100000 requests/s")
    if args.malformed < 0 or args.malformed == 1:
        raise UserError(f"--malformed {args.malformed}: must be 0 (none) or >= 2")
    bodies, bad = mixed(payloads(sizes), args.malformed)
    stats = asyncio.run(load(url, args.clients, args.duration, bodies, args.timeout, args.rate, bad))
    result = {"url": url, "rate": args.rate or None, **summary(stats, args.clients, sizes)}
    print(
        f"{result['clients']} clients, {result['duration_s']} s, batch {args.batch}: {result['requests']} requests, "
        f"{result['requests_per_s']} req/s, p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, "
        f"{result['errors']} errors {result['error_kinds'] or ''}".rstrip()
    )
    if result["malformed"]:
        print(f"malformed requests, answers by status: {result['malformed']}")
    print(f"client CPU: {result['client_cpu_s']} s ({100 * result['client_cpu_share']:.0f}% of one core)")
    print(json.dumps(result))


if __name__ == "__main__":
    run_stage(main)
