"""The worker pool: a fixed number of workers fed from a bounded queue, with a graceful stop.

The queue bounds read-ahead, so a manifest of millions of rows holds only a few batches in memory.
Stopping has two speeds: `stop()` takes no new rows and lets requests in flight finish (within a
grace period); `cancel()` ends them now.

A fault that escapes the handler or the feed halts the pool the graceful way: it is kept in `fault`
for the caller, the other workers finish what they hold, and `run` returns. No worker dies leaving
the feed blocked on a queue nobody reads.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
_END = object()


class WorkerPool(Generic[T]):
    def __init__(self, concurrency: int, handle: Callable[[T], Awaitable[None]]) -> None:
        self.concurrency = concurrency
        self.handle = handle
        self.stop_reason: str | None = None
        self.fault: Exception | None = None
        self._queue: asyncio.Queue[object] = asyncio.Queue(maxsize=concurrency * 2)
        self._workers: list[asyncio.Task[None]] = []
        self._feeder: asyncio.Task[None] | None = None
        self._grace: asyncio.TimerHandle | None = None

    @property
    def stopping(self) -> bool:
        return self.stop_reason is not None

    async def run(self, items: AsyncIterator[T]) -> None:
        """Work through `items`; returns once every worker has ended. Check `fault` afterwards."""
        self._feeder = asyncio.create_task(self._feed(items))
        self._workers = [asyncio.create_task(self._work()) for _ in range(self.concurrency)]
        try:
            await asyncio.gather(*self._workers, return_exceptions=True)
        finally:
            if self._grace is not None:
                self._grace.cancel()
            self._feeder.cancel()
            await asyncio.gather(self._feeder, return_exceptions=True)

    def stop(self, reason: str, grace: float | None = None) -> None:
        """Take no new rows; requests in flight finish, or are cancelled after `grace` seconds."""
        if self.stop_reason is None:
            self.stop_reason = reason
        if self._feeder is not None and self._feeder is not asyncio.current_task():
            self._feeder.cancel()
        while not self._queue.empty():
            self._queue.get_nowait()
        for _ in self._workers:
            self._queue.put_nowait(_END)
        if grace is not None and self._grace is None:
            self._grace = asyncio.get_running_loop().call_later(grace, self.cancel)

    def halt(self, fault: Exception) -> None:
        """Stop because of `fault`: the first one is kept, as the reason the run ended."""
        if self.fault is None:
            self.fault = fault
        self.stop(str(fault))

    def cancel(self) -> None:
        for worker in self._workers:
            worker.cancel()

    async def _feed(self, items: AsyncIterator[T]) -> None:
        try:
            async for item in items:
                await self._queue.put(item)
        except Exception as exc:
            self.halt(exc)
            return
        if not self.stopping:
            for _ in range(self.concurrency):
                await self._queue.put(_END)

    async def _work(self) -> None:
        while True:
            item = await self._queue.get()
            if item is _END or self.stopping:
                return
            try:
                await self.handle(item)  # type: ignore[arg-type]
            except Exception as exc:
                self.halt(exc)
                return
