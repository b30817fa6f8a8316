"""When the next request may go out: as close to the provider's limit as it allows, whatever kind
of limiter it runs, without spending requests on 429s.

Providers limit one of two things, and a 429 does not say which:

- a rate (a token bucket, a fixed or sliding window, a quota). Requests are then paced by a token
  bucket (aiolimiter's) at a rate learned from what succeeds: the first 429 sets it a little under
  the goodput that got through, which at the start of a run is rough, so it then grows a quarter
  every quiet half second until the next 429 (as TCP's slow start does); from then on each 429
  episode takes it down to the goodput of the last seconds, or 5% off, whichever is lower; quiet
  seconds add 5% a second, and more the longer it stays quiet (up to half a second's worth), so a
  raised limit, or the share a finished shard leaves, is found within seconds;
- the requests in flight. When a 429 answers a request sent with more in flight than any recent
  success had, the limit is on concurrency: it is set to the most in flight that succeeded, and
  probed one higher after quiet seconds. Nothing else is held back: fewer in flight is the cure.

A 429 whose request went out with fewer awaiting an answer than recent successes had, or that
follows such a 429 within seconds, is a rate's; a concurrency cut it contradicts is undone.

A 429's hint says when the next request may go. An exact X-RateLimit-Reset holds every request
until then. A Retry-After in whole seconds is rounded up (a bucket that refills in 20 ms says "1"),
so it holds requests only while single probes, sent after a short and then doubling wait, are
refused; a bare 429 is probed the same way. A cold start opens the pool gradually, one more request
in flight per two successes (half again per round trip, as TCP's slow start grows), so a run at
--concurrency 256 does not open with 256 requests against a burst of 5. `requests_per_minute`
caps the rate whatever is learned. Only requests to remote providers pass through here; the
embedded engine has no limit.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aiolimiter import AsyncLimiter

from .errors import RateHint
from .log import log

_SLOW_START = 8  # requests in flight at the start; one more per two successes until the first 429
_WINDOW = 2.0  # seconds of successes that measure goodput and the levels in flight that succeed
_MIN_SPAN = 0.5  # the shortest stretch of successes a goodput is measured over
_MARGIN = 0.95  # the first learned rate: this share of the goodput that got through
_CUT = 0.95  # each later 429 episode
_QUIET = 2.0  # seconds without a 429 before the rate and the concurrency probe upwards
_GROWTH = 0.05  # the rate's growth in its first quiet second, 5% more for each quiet second after ...
_MOST_GROWTH = 0.5  # ... up to this much a second, so capacity that frees up is found within seconds
_FAST_GROWTH = 1.25  # per quiet half second, until the first 429 after the first estimate
_FIRST_PROBE = 0.05  # seconds before the first probe after a 429 whose wait is not exact


@dataclass
class Ticket:
    """One request's place: when it went out, how many awaited an answer with it (itself included),
    and whether it was the single probe sent while the others wait."""

    sent: float
    in_flight: int
    probe: bool = False
    answered: bool = False


class _Pacer(AsyncLimiter):
    """aiolimiter's leaky bucket, holding one request, whose rate follows what the provider allows.
    AsyncLimiter fixes its rate when built; waiters queued on it must keep their places when the
    rate changes, so the rate is changed in place (its leak is settled at the old rate first)."""

    def __init__(self, rate: float) -> None:
        super().__init__(1, 1 / rate)

    def set_rate(self, rate: float) -> None:
        if self._level:
            self._leak()
        self.time_period = 1 / rate
        self._rate_per_sec = rate


def growth(quiet: float) -> float:
    """The rate's growth per second after `quiet` seconds without a 429 (past the first few)."""
    return 1 + min(_MOST_GROWTH, _GROWTH * (1 + max(0.0, quiet)))


class Throttle:
    def __init__(self, concurrency: int, requests_per_minute: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.maximum = concurrency
        self.limit = min(concurrency, _SLOW_START)
        self.slow_start = self.limit < concurrency
        self.in_flight = 0  # requests holding a place: from sending until their audio has landed
        self.awaiting = 0  # of those, the ones not answered yet: what a limit on concurrency counts
        self.cap = requests_per_minute / 60 if requests_per_minute else None
        self.learned: float | None = None
        self.bound_by_concurrency = False
        self._rate_slow_start = True
        self._clock = clock
        self._pacer = _Pacer(self.cap) if self.cap is not None else None
        self._hold_until = 0.0
        self._probing = False
        self._probe_out = False
        self._probe_wait = _FIRST_PROBE
        self._successes: deque[tuple[float, int]] = deque()
        self._first_success: float | None = None
        self._last_429 = self._last_cut = self._last_growth = self._last_rate_429 = -math.inf
        self._concurrency_cut_at = -math.inf
        self._limit_before_cut = self.limit
        self._grown = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def rate(self) -> float | None:
        """Requests per second allowed now, or None for no rate limit."""
        rates = [r for r in (self.cap, self.learned) if r is not None]
        return min(rates) if rates else None

    @property
    def held_for(self) -> float:
        return max(0.0, self._hold_until - self._clock())

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[Ticket]:
        """Hold one request's place: waits out a hold, a probe, a full pool and the pace."""
        ticket = await self._acquire()
        try:
            yield ticket
        finally:
            self._answered(ticket)
            self.in_flight -= 1
            if ticket.probe and self._probe_out:  # the probe ended without an answer either way
                self._probe_out = False
            self._wake()

    def _full(self) -> bool:
        """`concurrency` places at most, from sending to landing; the limit learned from the provider
        counts the requests it has not answered yet, as its limit on concurrency does."""
        return self.in_flight >= self.maximum or self.awaiting >= self.limit

    def _answered(self, ticket: Ticket) -> None:
        if not ticket.answered:
            ticket.answered = True
            self.awaiting -= 1
            self._wake()

    async def _acquire(self) -> Ticket:
        while True:
            if (hold := self.held_for) > 0:
                await asyncio.sleep(hold)
                continue
            if self._full() or (self._probing and self._probe_out):
                await self._wait_for_wake()
                continue
            if self._pacer is not None:
                await self._pacer.acquire()
                if self.held_for > 0 or self._full() or (self._probing and self._probe_out):
                    continue  # things changed while it waited its turn
            self.in_flight += 1
            self.awaiting += 1
            probe = self._probing
            if probe:
                self._probe_out = True
            return Ticket(self._clock(), self.awaiting, probe)

    async def _wait_for_wake(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if not waiter.done():
                waiter.cancel()

    def _wake(self) -> None:
        free = max(1, min(self.maximum - self.in_flight, self.limit - self.awaiting)) if not self._probing else 1
        while free > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                free -= 1

    def _wake_all(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def succeeded(self, ticket: Ticket) -> None:
        self._answered(ticket)
        now = self._clock()
        if self._first_success is None:
            self._first_success = now
        self._successes.append((now, ticket.in_flight))
        while self._successes and self._successes[0][0] < now - _WINDOW:
            self._successes.popleft()
        if self._probing:
            self._probing = self._probe_out = False
            self._probe_wait = _FIRST_PROBE
            self._wake_all()
        if self.slow_start:
            self._grown += 1
            if self._grown >= 2:  # half again per round trip: a window's burst ends with fewer on their way
                self._grown = 0
                self.limit += 1
                self.slow_start = self.limit < self.maximum
                self._wake()
            return
        if self.learned is not None and self._rate_slow_start:
            if now - self._last_growth >= 0.5 and now - self._last_429 >= 0.5:
                self._set_rate(self.learned * _FAST_GROWTH)
                self._last_growth = now
            return
        if now - self._last_429 < _QUIET:
            return
        if self.learned is not None and now - self._last_growth >= 1.0:
            quiet = now - max(self._last_growth, self._last_429 + _QUIET)
            self._set_rate(self.learned * growth(now - self._last_429 - _QUIET) ** min(max(quiet, 1.0), 10.0))
            self._last_growth = now
        if self.limit < self.maximum:
            self._grown += 1
            if self._grown >= self.limit:
                self._grown = 0
                self.limit += 1
                self._wake()

    def rate_limited(self, ticket: Ticket, hint: RateHint) -> None:
        """A 429: decide what is limited, and hold or slow down accordingly."""
        self._answered(ticket)
        now = self._clock()
        self._last_429 = self._last_growth = now
        self.slow_start = False
        recent = [level for t, level in self._successes if t >= now - _WINDOW]
        if recent and ticket.in_flight > max(recent) and now - self._last_rate_429 > _WINDOW:
            self._concurrency_limited(ticket, max(recent), now)
            return
        self._last_rate_429 = now
        if self.bound_by_concurrency and now - self._concurrency_cut_at < _WINDOW:
            # A 429 with fewer in flight than have succeeded: that cut was a rate limit's doing.
            self.limit, self.bound_by_concurrency = self._limit_before_cut, False
            self._wake()
        if ticket.sent >= self._last_cut:  # a new episode: what was sent before the last cut came too fast already
            self._cut(now)
        self._hold(now, hint, ticket)

    def _concurrency_limited(self, ticket: Ticket, most: int, now: float) -> None:
        if ticket.probe:
            self._probing = self._probe_out = False
            self._wake_all()
        if self.limit > most:
            old, self.limit = self.limit, most
            if not self.bound_by_concurrency:
                self._limit_before_cut = old
            self.bound_by_concurrency = True
            self._concurrency_cut_at = now
            self._grown = 0
            log.info("throttle", reason="429: too many in flight", concurrency=self.limit, was=old)

    def _cut(self, now: float) -> None:
        self._last_cut = now
        goodput = self._goodput(now)
        if self.learned is None:
            if goodput is None:
                old, self.limit = self.limit, max(1, self.limit // 2)  # no success yet to measure a rate by
                log.info("throttle", reason="429 before any success", concurrency=self.limit, was=old)
                return
            self._set_rate(_MARGIN * goodput)
            self.limit = self.maximum  # the pace holds the rate now; the pool need not
            self._wake()
        elif self._rate_slow_start:
            self._rate_slow_start = False
            self._set_rate(self.learned / _FAST_GROWTH)  # the last rate that drew no 429
        else:  # sent faster than what got through: down to that, or by a step, whichever is lower
            self._set_rate(min(self.learned * _CUT, _MARGIN * goodput if goodput is not None else math.inf))
        log.info("throttle", reason="429: too fast", rate_per_s=round(self.learned or 0, 2),
                 goodput_per_s=None if goodput is None else round(goodput, 2))

    def _goodput(self, now: float) -> float | None:
        """Successes per second over the last window, or since the first success if that is shorter."""
        if self._first_success is None:
            return None
        span = max(_MIN_SPAN, min(_WINDOW, now - self._first_success))
        return sum(1 for t, _ in self._successes if t >= now - span) / span or None

    def _hold(self, now: float, hint: RateHint, ticket: Ticket) -> None:
        """Hold every request until the provider said the next may go: exactly, when it said so
        exactly; else while a probe sent after a short, doubling wait is refused."""
        if hint.exact and hint.wait is not None:
            self._hold_until = max(self._hold_until, now + hint.wait)
            return
        if self._probing and not ticket.probe:
            return  # refused before the probe went: the probe will tell
        longest = hint.wait if hint.wait is not None else math.inf
        wait = min(self._probe_wait, longest)
        self._probe_wait = min(self._probe_wait * 2, longest)
        self._probing = True
        self._probe_out = False
        self._hold_until = max(self._hold_until, now + wait)

    def _set_rate(self, rate: float) -> None:
        self.learned = max(rate, 0.1)
        allowed = self.rate
        assert allowed is not None
        if self._pacer is None:
            self._pacer = _Pacer(allowed)
        else:
            self._pacer.set_rate(allowed)
