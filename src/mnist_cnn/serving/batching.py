"""Adaptive batching: the requests that a server worker has read while its model was busy share the
model's next forward pass, and each gets its own rows of the answer.

A request that finds the model idle runs after one turn of the event loop (the requests already read
join it), so a lone request waits for nothing. Under load (the last batch served more than one
request), a batch first gathers for `wait_s` more, up to `max_rows` pictures: clients that wait for
their answers before sending again would otherwise arrive one at a time and each get a pass of its own. The model runs
in the event loop's own thread: a worker has one core and one torch thread, and a second thread would
pass the GIL back and forth with the loop at each torch operation, waiting out Python's switch interval
each time (docs/serving.md). While it runs, new requests wait in the socket buffers.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

MAX_ROWS = 64  # pictures per forward pass: past a few dozen a larger batch saves little, and blocks longer


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
        self.batches = self.rows = 0  # counted, for the tests
        self.last_requests = 0  # in the last batch: more than one means requests are arriving together

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
        try:
            while self.pending:
                loaded = self.last_requests > 1 and sum(len(p) for p, _ in self.pending) < self.max_rows
                await asyncio.sleep(self.wait_s if loaded else 0)  # 0: one turn, for the requests already read
                batch = [(p, f) for p, f in self._take() if not f.done()]  # not a client that timed out
                if not batch:
                    continue
                pixels = batch[0][0] if len(batch) == 1 else np.concatenate([p for p, _ in batch])
                try:
                    pieces = split(self.predict(pixels), [len(p) for p, _ in batch])
                except Exception as error:  # the model failed: each request of the batch hears it
                    for _, future in batch:
                        future.set_exception(error)
                    continue
                self.batches, self.rows, self.last_requests = self.batches + 1, self.rows + len(pixels), len(batch)
                for (_, future), piece in zip(batch, pieces, strict=True):
                    future.set_result(piece)
        finally:
            self.running = False
