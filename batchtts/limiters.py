"""The rate limiters API gateways put in front of an API, for `batchtts serve` to imitate.

Each is told the time instead of reading a clock, so a test can drive it instant by instant, and its
refusal names the exact instant the next request could pass: what a gateway's X-RateLimit-Reset
tells a client, and what the runner's rate controller is built against.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from typing import ClassVar

SLACK = 1e-6
"""Times are floats: a request within a microsecond of the instant it was told to wait for counts as
arriving at that instant, so a client that waits exactly as told is not refused for a rounding error."""

QUOTA_SPENT = "Rate limit exceeded: free-models-per-day"  # OpenRouter's words when a free tier's day is spent


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request was refused: when to come back, and what a 429 says of the limit."""

    retry_at: float  # the earliest instant the next request could pass, on the clock admit() was given
    limit: int  # what the limiter allows, for X-RateLimit-Limit
    message: str | None = None  # None: the API's plain "Rate limit exceeded"


class Limiter(ABC):
    """One gateway limiter. `admit` is asked before a request is served; `release` is told when a request
    it admitted has ended, however it ended."""

    name: ClassVar[str]

    @abstractmethod
    def admit(self, now: float) -> Refusal | None:
        """None lets the request through, and counts it."""

    def release(self, ok: bool) -> None:  # noqa: B027 - a hook, a no-op by default
        """A request this limiter admitted has ended, successfully when `ok`."""

    @abstractmethod
    def nominal(self) -> dict[str, float | int | None]:
        """The settings a benchmark compares goodput with: `capacity_rps`, the requests a second the
        limiter lets through when fully used (None for a limiter that caps no rate), and its own."""


class TokenBucket(Limiter):
    """`rate` tokens a second into a bucket that holds `burst`, one taken per request: a burst of up
    to `burst` at once, then an even pace (nginx's limit_req, Envoy's local rate limit)."""

    name = "bucket"

    def __init__(self, rate: float, burst: int = 1) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.updated = -math.inf

    def admit(self, now: float) -> Refusal | None:
        self.tokens = min(self.burst, self.tokens + max(now - self.updated, 0.0) * self.rate)
        self.updated = now
        if self.tokens >= 1 - SLACK * self.rate:
            self.tokens = max(self.tokens - 1, 0.0)
            return None
        return Refusal(now + (1 - self.tokens) / self.rate, self.burst)

    def nominal(self) -> dict[str, float | int | None]:
        return {"capacity_rps": self.rate, "burst": self.burst}


class FixedWindow(Limiter):
    """`limit` requests in each window of `window` seconds, windows starting at multiples of `window` on
    the clock (whole seconds by default). A burst at one window's end and another at the next one's start
    pass twice the limit in a moment, as they do at real gateways."""

    name = "fixed"

    def __init__(self, limit: int, window: float = 1.0) -> None:
        self.limit = limit
        self.window = window
        self.index = -math.inf
        self.count = 0

    def admit(self, now: float) -> Refusal | None:
        index = math.floor((now + SLACK) / self.window)
        if index != self.index:
            self.index, self.count = index, 0
        if self.count >= self.limit:
            return Refusal((index + 1) * self.window, self.limit)
        self.count += 1
        return None

    def nominal(self) -> dict[str, float | int | None]:
        return {"capacity_rps": self.limit / self.window, "limit": self.limit, "window": self.window}


class SlidingWindow(Limiter):
    """At most `limit` requests in any span of `window` seconds, kept as a log of the times of the
    requests it let through (a sliding-log limiter): no double burst at window edges."""

    name = "sliding"

    def __init__(self, limit: int, window: float = 1.0) -> None:
        self.limit = limit
        self.window = window
        self.sent: deque[float] = deque()

    def admit(self, now: float) -> Refusal | None:
        sent = self.sent
        while sent and sent[0] + self.window <= now + SLACK:
            sent.popleft()
        if len(sent) >= self.limit:
            return Refusal(sent[0] + self.window, self.limit)
        sent.append(now)
        return None

    def nominal(self) -> dict[str, float | int | None]:
        return {"capacity_rps": self.limit / self.window, "limit": self.limit, "window": self.window}


class InFlightCap(Limiter):
    """At most `limit` requests at once (0: no cap, only counting). A gateway cannot tell when a request
    will end, so its refusal says to come back in a second, as gateways do."""

    name = "in_flight"

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running = 0

    def admit(self, now: float) -> Refusal | None:
        if self.limit and self.running >= self.limit:
            return Refusal(now + 1.0, self.limit)
        self.running += 1
        return None

    def release(self, ok: bool) -> None:
        self.running -= 1

    def nominal(self) -> dict[str, float | int | None]:
        return {"capacity_rps": None, "max_in_flight": self.limit}


class Quota(Limiter):
    """`limit` successful requests in each period of `period` seconds from `origin`, like a free tier's
    requests a day. A request in flight holds its place until it ends, so requests racing for the last
    place cannot overspend the quota; one that fails gives its place back."""

    name = "quota"

    def __init__(self, limit: int, period: float, origin: float) -> None:
        self.limit = limit
        self.period = period
        self.origin = origin
        self.index = 0
        self.used = 0
        self.running = 0

    def admit(self, now: float) -> Refusal | None:
        index = math.floor((now - self.origin + SLACK) / self.period)
        if index != self.index:
            self.index, self.used = index, 0
        if self.used + self.running >= self.limit:
            return Refusal(self.origin + (index + 1) * self.period, self.limit, QUOTA_SPENT)
        self.running += 1
        return None

    def release(self, ok: bool) -> None:
        self.running -= 1
        if ok:
            self.used += 1

    def nominal(self) -> dict[str, float | int | None]:
        return {"capacity_rps": None, "quota": self.limit, "quota_reset": self.period}
