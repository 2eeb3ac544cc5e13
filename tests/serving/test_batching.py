"""Adaptive batching (serving.batching): concurrent requests share a forward pass, each gets its own
rows back, a lone one runs at once, a failure reaches every request of its batch."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pandas as pd
import pytest

from mnist_cnn.serving.batching import Batcher, split


class Recorder:
    """A model that answers each picture with its first pixel, and remembers the batch sizes it saw;
    the first call waits until released, so that requests pile up behind it."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.release = threading.Event()

    def __call__(self, pixels: np.ndarray) -> list[dict]:
        self.release.wait(timeout=10)
        self.sizes.append(len(pixels))
        return [{"first": int(p[0, 0])} for p in pixels]


def pictures(first: int, count: int = 1) -> np.ndarray:
    out = np.zeros((count, 28, 28), dtype=np.uint8)
    out[:, 0, 0] = np.arange(first, first + count)
    return out


def test_requests_that_arrive_during_a_batch_share_the_next_and_get_their_own_rows() -> None:
    model = Recorder()

    async def scenario() -> list:
        batcher = Batcher(model)
        first = asyncio.create_task(batcher.submit(pictures(0)))
        await asyncio.sleep(0.05)  # the first runs alone (the model idle), and blocks
        rest = [asyncio.create_task(batcher.submit(pictures(10 * k, count=k))) for k in range(1, 6)]
        await asyncio.sleep(0.05)
        model.release.set()
        return [await first, *[await task for task in rest]]

    answers = asyncio.run(scenario())
    assert model.sizes == [1, 1 + 2 + 3 + 4 + 5]
    assert answers[0] == [{"first": 0}]
    for k, answer in enumerate(answers[1:], start=1):
        assert answer == [{"first": 10 * k + i} for i in range(k)]


def test_a_lone_request_runs_at_once_and_batches_stop_at_max_rows() -> None:
    model = Recorder()
    model.release.set()

    async def scenario() -> None:
        batcher = Batcher(model, max_rows=4)
        assert await batcher.submit(pictures(7)) == [{"first": 7}]
        answers = await asyncio.gather(*(batcher.submit(pictures(k, count=3)) for k in range(3)))
        assert [len(a) for a in answers] == [3, 3, 3]

    asyncio.run(scenario())
    assert model.sizes[0] == 1 and max(model.sizes) <= 4


def test_a_model_failure_reaches_every_request_of_its_batch_and_the_next_batch_runs() -> None:
    calls = []

    def model(pixels: np.ndarray) -> list[int]:
        calls.append(len(pixels))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return list(range(len(pixels)))

    async def scenario() -> None:
        batcher = Batcher(model)
        results = await asyncio.gather(batcher.submit(pictures(0)), batcher.submit(pictures(1)), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results)
        assert await batcher.submit(pictures(2, count=2)) == [0, 1]

    asyncio.run(scenario())


def test_split_cuts_lists_frames_and_arrays_by_rows() -> None:
    assert split([1, 2, 3, 4], [1, 3]) == [[1], [2, 3, 4]]
    frames = split(pd.DataFrame({"a": range(5)}), [2, 3])
    assert [f["a"].tolist() for f in frames] == [[0, 1], [2, 3, 4]]
    arrays = split(np.arange(6).reshape(3, 2), [2, 1])
    assert [a.shape for a in arrays] == [(2, 2), (1, 2)]


@pytest.mark.parametrize("wait_s", [0.0, 0.01])
def test_gathering_waits_for_more_only_when_asked(wait_s: float) -> None:
    model = Recorder()
    model.release.set()

    async def scenario() -> None:
        batcher = Batcher(model, wait_s=wait_s)
        first = asyncio.create_task(batcher.submit(pictures(0)))
        await asyncio.sleep(0.002)
        second = asyncio.create_task(batcher.submit(pictures(1)))
        await asyncio.gather(first, second)

    asyncio.run(scenario())
    assert model.sizes == ([1, 1] if wait_s == 0 else [2])
