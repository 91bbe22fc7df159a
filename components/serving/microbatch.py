"""Micro-batching for the model server: concurrent requests share one model call.

A transformer on CPU spends much of a one-text call on fixed per-call work (session launch,
thread-pool wake-up, tiny matrix products that use the cores badly); eight one-text requests
answered by one eight-text call finish sooner than eight calls in a row. `MicroBatcher.submit`
queues a request's texts and awaits its share of the results; one worker task takes everything
queued (up to `max_batch` texts), waits at most `max_wait_s` for more while the batch is not full,
runs the model in a worker thread and hands each request its slice. While a call runs, new requests
queue up and form the next batch, so under load batches grow on their own; `max_wait_s` only adds
latency when the server is idle. A request is never split: one larger than `max_batch` runs alone.

One bad text must not fail the other requests sharing its call: when a call fails, each of its
requests runs again alone, and a request that still fails runs text by text to name the text
(`TextFailed`). That costs extra calls only for batches that failed.

    python benchmarks/serve_batching.py      # measures it against a server with batching off
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field
from typing import Callable


class Overloaded(Exception):
    """More texts are queued than the server accepts: the caller should retry later (HTTP 503)."""


class TextFailed(Exception):
    """Text `index` of a request failed the model on its own (the other texts did not); `cause`: why."""

    def __init__(self, index: int, cause: BaseException):
        super().__init__(f"text {index}: {type(cause).__name__}: {cause}")
        self.index, self.cause = index, cause


@dataclass
class _Item:
    texts: list[str]
    future: asyncio.Future = field(repr=False)


class MicroBatcher:
    def __init__(self, fn: Callable[[list[str]], list], *, max_batch: int, max_wait_s: float, max_queue: int,
                 on_batch: Callable[[int, int, float], None] | None = None):
        """`fn(texts) -> one result per text`, called in a worker thread, one call at a time.
        `on_batch(texts, requests, seconds)` is told about every call (metrics)."""
        self.fn, self.max_batch, self.max_wait_s, self.max_queue = fn, max_batch, max_wait_s, max_queue
        self.on_batch = on_batch
        self._pending: collections.deque[_Item] = collections.deque()
        self._queued = 0  # texts waiting, not yet in a running call
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    @property
    def queued(self) -> int:
        return self._queued

    async def submit(self, texts: list[str]) -> list:
        if self._queued + len(texts) > self.max_queue:
            raise Overloaded(f"{self._queued} texts are already queued (limit {self.max_queue}); retry shortly")
        if self._worker is None or self._worker.done():
            # started on first use: it must live on the server's event loop, which only exists then
            self._wakeup = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._work(), name="kubetune-microbatch")
        item = _Item(texts, asyncio.get_running_loop().create_future())
        self._pending.append(item)
        self._queued += len(texts)
        self._wakeup.set()
        return await item.future

    def _take(self) -> list[_Item]:
        batch, n = [], 0
        while self._pending and (not batch or n + len(self._pending[0].texts) <= self.max_batch):
            item = self._pending.popleft()
            self._queued -= len(item.texts)
            if not item.future.done():  # a cancelled request (client went away) costs nothing
                batch.append(item)
                n += len(item.texts)
        return batch

    async def _fill(self) -> None:
        """Wait up to max_wait_s from now for the queue to reach max_batch texts."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while self._queued < self.max_batch:
            left = deadline - loop.time()
            if left <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), left)
            except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11
                return

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if not self._pending:
                continue
            if self.max_wait_s > 0:
                await self._fill()
            batch = self._take()
            if not batch:
                continue
            texts = [t for item in batch for t in item.texts]
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(None, self._call, texts)
            except Exception as e:  # one failed call fails only the requests that fail alone, never the worker
                await self._isolate(batch, e)
                continue
            finally:
                if self._pending:
                    self._wakeup.set()  # requests that arrived during the call form the next batch
            if self.on_batch:
                self.on_batch(len(texts), len(batch), time.perf_counter() - t0)
            start = 0
            for item in batch:
                if not item.future.done():
                    item.future.set_result(results[start:start + len(item.texts)])
                start += len(item.texts)

    def _call(self, texts: list[str]) -> list:
        results = self.fn(texts)
        if len(results) != len(texts):
            raise RuntimeError(f"the model returned {len(results)} results for {len(texts)} texts")
        return results

    async def _isolate(self, batch: list[_Item], error: Exception) -> None:
        """After a failed call: run each request alone so only those that fail alone get an error."""
        loop = asyncio.get_running_loop()
        for item in batch:
            if item.future.done():
                continue
            outcome: list | Exception = error
            if len(batch) > 1:
                try:
                    outcome = await loop.run_in_executor(None, self._call, item.texts)
                except Exception as e:
                    outcome = e
            if isinstance(outcome, Exception):
                outcome = await self._blame(item.texts, outcome)
            if item.future.done():  # the client went away meanwhile
                continue
            if isinstance(outcome, Exception):
                item.future.set_exception(outcome)
            else:
                item.future.set_result(outcome)

    async def _blame(self, texts: list[str], error: Exception) -> Exception:
        """The error for a request that failed alone: TextFailed naming its first text that fails on
        its own, else (only the combination fails) the request's error as it was."""
        if len(texts) == 1:
            return TextFailed(0, error)
        loop = asyncio.get_running_loop()
        for i, text in enumerate(texts):
            try:
                await loop.run_in_executor(None, self._call, [text])
            except Exception as e:
                return TextFailed(i, e)
        return error
