"""Retry policy as tenacity pieces: which failures are worth another attempt, and how long to wait.

A provider's own wait (Retry-After, X-RateLimit-Reset) beats our backoff; otherwise exponential
backoff with full jitter spreads the retries of many workers apart.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from .config import RetryPolicy
from .errors import HTTPStatusError, ProviderStopError, StorageError, TransportError, UnexpectedError


def is_transient(exc: BaseException, statuses: tuple[int, ...]) -> bool:
    """Worth another attempt: a transport fault or a status in the policy's list (never 401/402).

    Rows whose last failure was transient are tried again by the next run without --retry-failed.
    """
    return isinstance(exc, TransportError) or (
        isinstance(exc, HTTPStatusError) and not isinstance(exc, ProviderStopError) and exc.status in statuses
    )


def retried_next_run(exc: BaseException, statuses: tuple[int, ...]) -> bool:
    """A failed row the next run tries again without --retry-failed: transient, its audio could not be
    stored, or a fault nobody foresaw."""
    return is_transient(exc, statuses) or isinstance(exc, (StorageError, UnexpectedError))


def retry_if_transient(statuses: tuple[int, ...]) -> retry_if_exception:
    return retry_if_exception(lambda e: is_transient(e, statuses))


class wait_provider_hint(wait_base):
    """Wait what the provider asked for, plus a little jitter (the throttle paces the restart, so little is
    needed); fall back to `fallback` when it did not ask."""

    def __init__(self, fallback: wait_base, jitter: float = 0.02) -> None:
        self.fallback = fallback
        self.jitter = jitter

    def __call__(self, retry_state: RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        hint = getattr(exc, "retry_after", None)
        if hint is not None:
            return hint + random.uniform(0, self.jitter * max(hint, 0.1))
        return self.fallback(retry_state)


class stop_when(stop_base):
    """Stop retrying once the run is winding down (a signal, a provider stop)."""

    def __init__(self, predicate: Callable[[], bool]) -> None:
        self.predicate = predicate

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.predicate()


def build_retrying(
    policy: RetryPolicy,
    stopping: Callable[[], bool],
    before_sleep: Callable[[RetryCallState], Awaitable[None] | None] | None = None,
    sleep: Callable[[float], Awaitable[None]] | None = None,
) -> AsyncRetrying:
    kwargs = {"sleep": sleep} if sleep is not None else {}
    return AsyncRetrying(
        retry=retry_if_transient(policy.statuses),
        wait=wait_provider_hint(wait_random_exponential(multiplier=policy.backoff_initial, max=policy.backoff_max)),
        stop=stop_after_attempt(policy.max_attempts) | stop_after_delay(policy.max_row_seconds) | stop_when(stopping),
        before_sleep=before_sleep,
        reraise=True,
        **kwargs,
    )

