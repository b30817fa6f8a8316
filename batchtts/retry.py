"""Retry policy as tenacity pieces: which failures are worth another attempt, and how long to wait.

A provider's own wait (Retry-After, X-RateLimit-Reset) beats our backoff, up to `backoff_max`;
otherwise exponential backoff with full jitter spreads the retries of many workers apart. A 429
is different: the throttle holds and paces every request as the provider said, so the request it
refused comes straight back to wait its turn there, and it does not use up the row's attempts
(those are for faults; `max_row_seconds` bounds the time).
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import TypedDict

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_before_delay,
    wait_random_exponential,
)
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from .config import RetryPolicy
from .errors import HTTPStatusError, RunStop, StorageError, TransportError, UnexpectedError


def is_transient(exc: BaseException, statuses: tuple[int, ...]) -> bool:
    """Worth another attempt: a transport fault or a status in the policy's list (never 401/402).

    Rows whose last failure was transient are tried again by the next run without --retry-failed.
    """
    if isinstance(exc, RunStop):
        return False
    return isinstance(exc, TransportError) or (isinstance(exc, HTTPStatusError) and exc.status in statuses)


def retried_next_run(exc: BaseException, statuses: tuple[int, ...]) -> bool:
    """A failed row the next run tries again without --retry-failed: transient, its audio could not be
    stored, or a fault nobody foresaw."""
    return is_transient(exc, statuses) or isinstance(exc, (StorageError, UnexpectedError))


def retry_if_transient(statuses: tuple[int, ...]) -> retry_if_exception:
    return retry_if_exception(lambda e: is_transient(e, statuses))


def _rate_limited(exc: BaseException | None) -> bool:
    return isinstance(exc, HTTPStatusError) and exc.status == 429


HINT_JITTER = 0.02  # a share of the provider's wait added at random, so many workers do not return at once


class wait_provider_hint(wait_base):
    """Wait what the provider asked for, plus a little jitter, at most `longest`; fall back to
    `fallback` when it did not ask. After a 429, only the jitter: the throttle holds the rest."""

    def __init__(self, fallback: wait_base, longest: float, jitter: float = HINT_JITTER) -> None:
        self.fallback = fallback
        self.longest = longest
        self.jitter = jitter

    def __call__(self, retry_state: RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if _rate_limited(exc):
            return random.uniform(0, self.jitter)
        hint = exc.retry_after if isinstance(exc, HTTPStatusError) else None
        if hint is not None:
            return min(self.longest, hint + random.uniform(0, self.jitter * max(hint, 0.1)))
        return self.fallback(retry_state)


class stop_after_faults(stop_base):
    """Stop after `attempts` attempts that failed for a fault, not counting 429s. One instance per
    request: it counts that request's faults."""

    def __init__(self, attempts: int) -> None:
        self.attempts = attempts
        self.faults = 0

    def __call__(self, retry_state: RetryCallState) -> bool:
        if not _rate_limited(retry_state.outcome.exception() if retry_state.outcome else None):
            self.faults += 1
        return self.faults >= self.attempts


class stop_when(stop_base):
    """Stop retrying once the run is winding down (a signal, a provider stop)."""

    def __init__(self, predicate: Callable[[], bool]) -> None:
        self.predicate = predicate

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.predicate()


class _SleepArg(TypedDict, total=False):
    sleep: Callable[[float], Awaitable[None]]


def build_retrying(
    policy: RetryPolicy,
    stopping: Callable[[], bool],
    before_sleep: Callable[[RetryCallState], Awaitable[None] | None] | None = None,
    sleep: Callable[[float], Awaitable[None]] | None = None,
) -> AsyncRetrying:
    kwargs: _SleepArg = {"sleep": sleep} if sleep is not None else {}
    return AsyncRetrying(
        retry=retry_if_transient(policy.statuses),
        wait=wait_provider_hint(wait_random_exponential(multiplier=policy.backoff_initial, max=policy.backoff_max),
                                longest=policy.backoff_max),
        # stop_before_delay: the wait that would pass max_row_seconds is not slept.
        stop=stop_after_faults(policy.max_attempts) | stop_before_delay(policy.max_row_seconds) | stop_when(stopping),
        before_sleep=before_sleep,
        reraise=True,
        **kwargs,
    )

