"""When the next request may go out, so a run gets as close to the account's rate limit as the
provider allows without spending requests on 429s.

Three things decide it, all adapted as answers come back:

- a pause: a 429's Retry-After or X-RateLimit-Reset holds every request, not just the one that got it;
- concurrency, additive-increase / multiplicative-decrease: halved (floor 1) by the first 429 of an
  episode, grown back by one for every `limit` successes once 429s have stopped for a while, up to
  the configured maximum;
- a request rate, as a token bucket: the user's cap (`requests_per_minute`) if given, and a rate
  learned from the 429s themselves, which keeps a fast client from discovering the limit again in
  every window. The first 429 sets it a little under the rate that got through; each later 429 sets
  it a little under the rate that broke the limit, or 5% lower if it came while that rate was
  being held. After 20 quiet seconds (5 after the first, rough, estimate) it grows 10% a second, so
  a lifted limit is found again; the hold keeps those probes rare, because each costs a pause (a
  whole window, when Retry-After is rounded up to seconds).

Only requests to remote providers pass through here; the embedded engine has no rate limit.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog

log = structlog.get_logger("batchtts")

_QUIET_AFTER_429 = 1.0  # seconds without a 429 before concurrency grows again
_FIRST_HOLD = 5.0  # seconds the first, roughest estimate of the rate is held before it grows
_HOLD_RATE = 20.0  # seconds without a 429 before a refined rate grows again
_LEARNED_MARGIN = 0.97
_RATE_GROWTH = 1.1  # per second, after the hold


class Throttle:
    def __init__(self, concurrency: int, requests_per_minute: float | None = None) -> None:
        self.maximum = concurrency
        self.limit = concurrency
        self.in_flight = 0
        self.cap = requests_per_minute / 60 if requests_per_minute else None
        self.learned: float | None = None
        self._paused_until = 0.0
        self._last_429 = self._last_episode = float("-inf")
        self._hold = _FIRST_HOLD
        now = time.monotonic()
        # The first success starts the first cycle: connecting a large pool takes a while.
        self._cycle_start: float | None = None
        self._cycle_successes = 0
        self._successes = 0
        self._last_growth = now
        self._last_log = float("-inf")
        self._tokens = 1.0
        self._refilled = now
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def rate(self) -> float | None:
        """Requests per second allowed now, or None for no rate limit."""
        rates = [r for r in (self.cap, self.learned) if r is not None]
        return min(rates) if rates else None

    @property
    def paused_for(self) -> float:
        return max(0.0, self._paused_until - time.monotonic())

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one request's place: waits out a pause, a full pool and the rate."""
        await self._acquire()
        try:
            yield
        finally:
            self.in_flight -= 1
            self._wake()

    async def _acquire(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if (pause := self.paused_for) > 0:
                await asyncio.sleep(pause)
                continue
            if self.in_flight >= self.limit:
                waiter = loop.create_future()
                self._waiters.append(waiter)
                try:
                    await waiter
                finally:
                    if not waiter.done():
                        waiter.cancel()
                continue
            if (rate := self.rate) is not None:
                now = time.monotonic()
                self._tokens = min(max(1.0, rate / 4), self._tokens + (now - self._refilled) * rate)
                self._refilled = now
                if self._tokens < 1.0:
                    await asyncio.sleep((1.0 - self._tokens) / rate)
                    continue
                self._tokens -= 1.0
            self.in_flight += 1
            return

    def _wake(self) -> None:
        free = self.limit - self.in_flight
        while free > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                free -= 1

    def rate_limited(self, wait: float) -> None:
        """A 429: pause everyone for `wait` seconds; the first 429 of an episode also cuts concurrency
        and learns the rate the provider allowed since the last one."""
        now = time.monotonic()
        resume = now + wait
        first_of_episode = now >= self._paused_until
        self._paused_until = max(self._paused_until, resume)
        self._last_429 = self._last_growth = now
        if not first_of_episode:
            return
        cycle = resume - (self._cycle_start if self._cycle_start is not None else now)
        if self.learned is None:
            if self._cycle_successes and cycle > 0:
                self.learned = _LEARNED_MARGIN * self._cycle_successes / cycle
        elif now - self._last_episode < self._hold:
            self.learned *= 0.95
            self._hold = _HOLD_RATE
        else:
            self.learned *= _LEARNED_MARGIN
            self._hold = _HOLD_RATE
        self._last_episode = now
        self._cycle_start, self._cycle_successes = resume, 0
        old = self.limit
        self.limit = max(1, self.limit // 2)
        self._successes = 0
        log.info("throttle", reason="429", concurrency=self.limit, was=old, pause_s=round(wait, 3),
                 learned_rate_per_s=None if self.learned is None else round(self.learned, 2))

    def succeeded(self) -> None:
        now = time.monotonic()
        if self._cycle_start is None:
            self._cycle_start = now
        self._cycle_successes += 1
        if now - self._last_429 < _QUIET_AFTER_429:
            return
        if self.learned is not None and now - self._last_429 >= self._hold and now - self._last_growth >= 1.0:
            self.learned *= _RATE_GROWTH ** min(now - max(self._last_growth, self._last_429 + self._hold), 10.0)
            self._last_growth = now
        if self.limit < self.maximum:
            self._successes += 1
            if self._successes >= self.limit:
                self._successes = 0
                self.limit += 1
                self._wake()
                if self.limit == self.maximum or now - self._last_log >= 1.0:  # a line a second at most
                    self._last_log = now
                    log.info("throttle", reason="recovering", concurrency=self.limit, maximum=self.maximum)
