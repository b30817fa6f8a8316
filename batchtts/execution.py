"""Narrating the work a plan found: the worker pool fed from the manifest, the throttle, the
progress bar, group commits of the ledger, and the ways a run ends early (a signal, --max-runtime,
the budget, a provider that refuses every row, a fault of the machine).
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass

from .budget import Prices, Spending
from .config import Job
from .errors import (
    EXIT_BUDGET,
    EXIT_HALTED,
    EXIT_MAX_RUNTIME,
    EXIT_PROVIDER_STOP,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    BatchTTSError,
    HaltError,
    LedgerError,
)
from .ledger import Ledger
from .log import log
from .narrator import Counters, Narrator
from .plan import Plan, pending_work
from .pool import WorkerPool
from .progress import Progress
from .providers import SpeechProvider
from .storage import OutputFolder
from .throttle import Throttle
from .work import WorkItem


@dataclass(frozen=True)
class Ending:
    """Why a run ended before its work was done, as its exit code says."""

    exit_code: int
    reason: str | None
    advice: str | None = None


async def narrate(job: Job, plan: Plan, ledger: Ledger, folder: OutputFolder, provider: SpeechProvider,
                  spending: Spending, prices: Prices, started: float, signals: bool) -> tuple[Counters, Ending | None]:
    """Narrate the work the plan found; returns what was done, and why the run ended early, if it did."""
    # Under a budget, the bar runs to what the budget lets this run take, as the plan played it through.
    rows, characters = ((plan.budget.rows, plan.budget.sent_characters) if plan.budget is not None
                        else (plan.total.pending, plan.total.pending_characters))
    throttle = Throttle(job.concurrency, job.requests_per_minute)
    progress = Progress(rows, characters, interactive=sys.stderr.isatty() and job.log_format != "json",
                        interval=job.progress_interval, job_rows=plan.total.rows, done_before=plan.total.done,
                        throttle=throttle)
    # Publishing waits on fsync: with a handful of threads the disk, not the provider, would set the
    # pace of a fast run. Threads of the run's own, so the caller's default executor is not resized.
    executor = ThreadPoolExecutor(max_workers=min(64, 2 * job.concurrency), thread_name_prefix="batchtts")
    pool: WorkerPool[WorkItem]
    narrator = Narrator(provider, folder, ledger, job.retry, job.stitching, progress, throttle,
                        prices, stop=lambda reason: pool.stop(reason), stopping=lambda: pool.stopping,
                        executor=executor, captions=job.captions, checks=job.checks,
                        redo_flagged=job.redo_flagged)
    # Twice as many workers as requests allowed in flight: a worker sleeping out a retry's backoff, or
    # narrating a local row, then does not hold back the remote requests the throttle would allow.
    pool = WorkerPool(2 * job.concurrency, narrator)
    received: list[int] = []

    def on_signal(signum: int) -> None:
        received.append(signum)
        if len(received) == 1:
            log.warning(
                "stopping", signal=signal.Signals(signum).name, grace_s=job.grace_seconds,
                message="taking no new rows; letting requests in flight finish. Signal again to stop at once.",
            )
            pool.stop(f"interrupted by {signal.Signals(signum).name}", grace=job.grace_seconds)
        else:
            log.warning("cancelling", message="stopping requests in flight now; they will be redone next run")
            pool.cancel()

    loop = asyncio.get_running_loop()

    def commit() -> None:
        try:
            ledger.commit()
        except LedgerError as exc:
            pool.halt(HaltError(str(exc)))

    def commit_soon() -> None:
        loop.call_soon(commit)

    # Group commit: rows that finish in the same turn of the event loop share one commit.
    ledger.on_write = commit_soon
    if signals:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
    timer = _stop_at_max_runtime(job, pool, started)
    progress.start()
    try:
        await pool.run(_feed(job, plan, folder, spending, executor))
    finally:
        if timer is not None:
            timer.cancel()
        ledger.on_write = None
        commit()
        if signals:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
        progress.close()
        await provider.aclose()
        await asyncio.to_thread(executor.shutdown)  # threads still publishing finish before the ledger closes
    if pool.fault is not None:
        return narrator.counters, halted(pool.fault)
    if narrator.provider_stop is not None:
        stop = narrator.provider_stop
        return narrator.counters, Ending(EXIT_PROVIDER_STOP, str(stop), stop.advice)
    if received:
        return narrator.counters, Ending(EXIT_SIGTERM if received[0] == signal.SIGTERM else EXIT_SIGINT,
                                         pool.stop_reason)
    if pool.stopping:
        return narrator.counters, Ending(EXIT_MAX_RUNTIME, pool.stop_reason)
    if spending.refused is not None:
        log.warning("budget_reached", reason=spending.refused, characters=spending.characters,
                    estimated_cost_usd=round(spending.cost, 6))
        return narrator.counters, Ending(EXIT_BUDGET, spending.refused)
    return narrator.counters, None


async def _feed(job: Job, plan: Plan, folder: OutputFolder, spending: Spending,
                executor: Executor) -> AsyncIterator[WorkItem]:
    """Work left to do, planned in a thread so the event loop keeps serving responses meanwhile."""
    reader = Ledger(job.ledger_path, readonly=True)
    try:
        batches = pending_work(job, plan, reader, folder, spending)
        loop = asyncio.get_running_loop()
        while (batch := await loop.run_in_executor(executor, next, batches, None)) is not None:
            for item in batch:
                yield item
    finally:
        reader.close()


def halted(fault: Exception) -> Ending:
    """The run could not go on: say why, and that a rerun resumes once that is fixed."""
    reason = str(fault) if isinstance(fault, BatchTTSError) else f"{type(fault).__name__}: {fault}"
    log.error("halted", reason=reason)
    return Ending(EXIT_HALTED, reason, "what finished is recorded: fix that, then run the same command again to resume")


def _stop_at_max_runtime(job: Job, pool: WorkerPool[WorkItem], started: float) -> asyncio.TimerHandle | None:
    """End inside the window: take no new rows `grace` seconds before the end, cancel what is still in
    flight at the end (it is redone next run)."""
    if job.max_runtime is None:
        return None
    grace = min(job.grace_seconds, job.max_runtime / 2)

    def stop() -> None:
        log.warning("max_runtime", max_runtime_s=job.max_runtime, grace_s=round(grace, 3),
                    message="taking no new rows; requests in flight get the rest of the window")
        pool.stop(f"the maximum run time ({job.max_runtime:g} s) is near: no new rows in its last {grace:g} s",
                  grace=grace)

    delay = max(0.0, started + job.max_runtime - grace - time.monotonic())
    return asyncio.get_running_loop().call_later(delay, stop)
