"""Adaptive batching (serving.batching): concurrent requests share a forward pass, each gets its own
rows back, a lone one runs at once, a failure reaches every request of its batch."""

from __future__ import annotations

import asyncio

import numpy as np
import pandas as pd
import pytest

from mnist_cnn.serving.batching import Batcher, split


class Recorder:
    """A model that answers each picture with its first pixel, and remembers the batch sizes it saw."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __call__(self, pixels: np.ndarray) -> list[dict]:
        self.sizes.append(len(pixels))
        return [{"first": int(p[0, 0])} for p in pixels]


def pictures(first: int, count: int = 1) -> np.ndarray:
    out = np.zeros((count, 28, 28), dtype=np.uint8)
    out[:, 0, 0] = np.arange(first, first + count)
    return out


def test_requests_read_together_share_one_pass_and_get_their_own_rows() -> None:
    model = Recorder()

    async def scenario() -> list:
        batcher = Batcher(model)
        return await asyncio.gather(*(batcher.submit(pictures(10 * k, count=k)) for k in range(1, 6)))

    answers = asyncio.run(scenario())
    assert model.sizes == [1 + 2 + 3 + 4 + 5]
    for k, answer in enumerate(answers, start=1):
        assert answer == [{"first": 10 * k + i} for i in range(k)]


def test_requests_that_arrive_during_a_batch_make_the_next_one() -> None:
    sizes: list[int] = []
    later: list[asyncio.Task] = []

    async def scenario() -> None:
        def model(pixels: np.ndarray) -> list[int]:
            if not sizes:  # three requests come in while the first batch runs
                later.extend(asyncio.get_running_loop().create_task(batcher.submit(pictures(k))) for k in (1, 2, 3))
            sizes.append(len(pixels))
            return [int(p[0, 0]) for p in pixels]

        batcher = Batcher(model)
        assert await batcher.submit(pictures(0)) == [0]
        assert await asyncio.gather(*later) == [[1], [2], [3]]

    asyncio.run(scenario())
    assert sizes == [1, 3]


def test_a_lone_request_runs_alone_and_batches_stop_at_max_rows() -> None:
    model = Recorder()

    async def scenario() -> None:
        batcher = Batcher(model, max_rows=4)
        assert await batcher.submit(pictures(7)) == [{"first": 7}]
        answers = await asyncio.gather(*(batcher.submit(pictures(k, count=3)) for k in range(3)))
        assert [len(a) for a in answers] == [3, 3, 3]
        assert (batcher.batches, batcher.rows) == (4, 10)

    asyncio.run(scenario())
    assert model.sizes == [1, 3, 3, 3]


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
    assert calls == [2, 2]


def test_split_cuts_lists_frames_and_arrays_by_rows() -> None:
    assert split([1, 2, 3, 4], [1, 3]) == [[1], [2, 3, 4]]
    frames = split(pd.DataFrame({"a": range(5)}), [2, 3])
    assert [f["a"].tolist() for f in frames] == [[0, 1], [2, 3, 4]]
    arrays = split(np.arange(6).reshape(3, 2), [2, 1])
    assert [a.shape for a in arrays] == [(2, 2), (1, 2)]


@pytest.mark.parametrize("wait_s", [0.0, 0.5])
def test_under_load_a_batch_gathers_for_wait_s_and_a_lone_request_never_does(wait_s: float) -> None:
    model = Recorder()

    async def scenario() -> None:
        batcher = Batcher(model, wait_s=wait_s)
        assert await batcher.submit(pictures(0)) == [{"first": 0}]  # alone: no wait, whatever wait_s
        await asyncio.gather(batcher.submit(pictures(1)), batcher.submit(pictures(2)))  # two together: load
        first = asyncio.create_task(batcher.submit(pictures(3)))
        for _ in range(3):  # three turns of the loop, no time: enough for a batch that does not wait
            await asyncio.sleep(0)
        second = asyncio.create_task(batcher.submit(pictures(4)))
        await asyncio.gather(first, second)

    asyncio.run(scenario())
    assert model.sizes == ([1, 2, 1, 1] if wait_s == 0 else [1, 2, 2])
