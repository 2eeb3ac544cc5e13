"""Adaptive batching: the requests that arrive while the model is busy share its next forward pass.

One batch at a time runs in a thread of its own (the event loop keeps reading requests meanwhile).
A request that finds the model idle runs at once, alone, so a lone request waits for nothing; under
load, every request that came in during a batch joins the next one, up to MAX_ROWS pictures, after
gathering for at most `wait_s` more (0 by default: what queued during the last batch is the batch).
Each request gets its own rows of the answer. docs/serving.md has the measurements.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

MAX_ROWS = 256  # pictures per forward pass: past a few dozen a larger batch saves little


def split(outputs: Any, counts: Sequence[int]) -> list[Any]:
    """A model's outputs for the concatenated requests, cut back into one piece per request: a list
    (the served model's records), a pandas object or an array, each sliced by rows."""
    rows = outputs.iloc if hasattr(outputs, "iloc") else outputs
    return [rows[a:b] for a, b in itertools.pairwise(np.cumsum([0, *counts]).tolist())]


class Batcher:
    """predict(pixels (N, 28, 28)) -> outputs of N rows, for many concurrent callers of `submit`."""

    def __init__(self, predict: Callable[[np.ndarray], Any], max_rows: int = MAX_ROWS, wait_s: float = 0.0) -> None:
        self.predict, self.max_rows, self.wait_s = predict, max_rows, wait_s
        self.pending: list[tuple[np.ndarray, asyncio.Future]] = []
        self.running = False
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.batches = self.rows = 0  # counted, for the tests and the log

    async def submit(self, pixels: np.ndarray) -> Any:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((pixels, future))
        if not self.running:
            self.running = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    def _take(self) -> list[tuple[np.ndarray, asyncio.Future]]:
        """The oldest requests, as many as fit in max_rows (always at least one)."""
        taken, rows = 0, 0
        while taken < len(self.pending) and (taken == 0 or rows + len(self.pending[taken][0]) <= self.max_rows):
            rows += len(self.pending[taken][0])
            taken += 1
        batch, self.pending = self.pending[:taken], self.pending[taken:]
        return batch

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.pending:
                if self.wait_s and sum(len(p) for p, _ in self.pending) < self.max_rows:
                    await asyncio.sleep(self.wait_s)
                batch = [(p, f) for p, f in self._take() if not f.cancelled()]  # a client gone or timed out
                if not batch:
                    continue
                pixels = batch[0][0] if len(batch) == 1 else np.concatenate([p for p, _ in batch])
                try:
                    outputs = await loop.run_in_executor(self.executor, self.predict, pixels)
                    pieces = split(outputs, [len(p) for p, _ in batch])
                except Exception as error:  # the model failed: each request of the batch hears it
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(error)
                    continue
                self.batches, self.rows = self.batches + 1, self.rows + len(pixels)
                for (_, future), piece in zip(batch, pieces, strict=True):
                    if not future.done():
                        future.set_result(piece)
        finally:
            self.running = False
