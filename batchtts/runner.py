"""A whole run: lock the ledger, check and plan the manifest, narrate what is left, report.

`run(job)` works from any thread, and inside a running event loop too (it then narrates in a thread
of its own); `await arun(job)` narrates in the caller's loop. Blocking work (planning, the ledger,
files) runs in threads, so the loop keeps serving answers. Signals belong to the caller: the CLI
asks for SIGINT and SIGTERM handling (`signals=True`), a library user stops a run as they see fit.

The manifest is read twice, both times as a stream: once to refuse a bad manifest and count what is
left (and what it will cost) before anything is sent, once to feed the pool the rows that have work.
A sharded run sees only its shard's rows; a budget or `max_runtime` ends the feed early, and what
was taken on is finished and recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from .budget import Prices, Spending, prices_for
from .config import Job
from .errors import (
    EXIT_BUDGET,
    EXIT_FAILED_ROWS,
    EXIT_HALTED,
    EXIT_MAX_RUNTIME,
    EXIT_OK,
    EXIT_PROVIDER_STOP,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    BatchTTSError,
    HaltError,
    LedgerError,
    UsageError,
)
from .ledger import Ledger, RunSettings, check_layout
from .local import LocalSpeechProvider
from .log import log
from .models import check_models
from .names import OutputChecks, owned_files
from .narrator import Counters, Narrator
from .plan import Plan, make_plan, pending_work
from .pool import WorkerPool
from .progress import Progress
from .providers import RoutingProvider, SpeechProvider, is_local
from .redact import redact_uri
from .storage import OutputFolder, open_output
from .throttle import Throttle
from .work import WorkItem


@dataclass
class RunResult:
    exit_code: int
    plan: Plan
    prices: Prices = field(default_factory=Prices)
    counters: Counters = field(default_factory=Counters)
    stop_reason: str | None = None
    advice: str | None = None
    wall_s: float = 0.0

    def summary(self) -> dict[str, object]:
        total = self.plan.total
        return {
            "exit_code": self.exit_code, "rows": total.rows, "already_done": total.done,
            "skipped_failed": total.failed, **asdict(self.counters),
            "audio_s": round(self.counters.audio_s, 3), "cost_usd": round(self.counters.cost_usd, 6),
            "wall_s": round(self.wall_s, 3), "stop_reason": self.stop_reason,
        }


def run(job: Job, provider: SpeechProvider | None = None, *, signals: bool = False) -> RunResult:
    """Narrate every row of the job's manifest that the ledger does not already hold.

    From a thread with an event loop running (a notebook, a server), the run gets a thread and a
    loop of its own, and this call waits for it."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(arun(job, provider, signals=signals))
    if signals:
        raise UsageError("signals=True needs run() from the main thread without a running event loop: "
                         "inside one, await arun(job) and stop it as the application does")
    outcome: list[RunResult | BaseException] = []

    def own_loop() -> None:
        try:
            outcome.append(asyncio.run(arun(job, provider)))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=own_loop, name="batchtts-run")
    thread.start()
    thread.join()
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


async def arun(job: Job, provider: SpeechProvider | None = None, *, signals: bool = False) -> RunResult:
    """`run` in the running event loop. With `signals`, SIGINT and SIGTERM stop the run gracefully
    (a second one at once), as the CLI does; it needs the main thread."""
    job.validate()
    started = time.monotonic()
    held = contextlib.ExitStack()  # the lock and the ledger, once taken
    try:
        setup = await asyncio.to_thread(_set_up, job, provider, held, started)
        if isinstance(setup, RunResult):
            return setup
        plan, result, ledger = setup.plan, setup.result, setup.ledger
        total = plan.total
        run_id = await asyncio.to_thread(ledger.start_run, _settings(job), job.redacted())
        log.info(
            "start", manifest=str(job.manifest), out=str(setup.folder), ledger=str(job.ledger_path),
            **({"shard": str(job.shard)} if job.shard is not None else {}), rows=total.rows, already_done=total.done,
            pending=total.pending, skipped_failed=total.failed, partial_files_removed=setup.cleaned,
            estimated_cost_usd=plan.estimate(result.prices), **_budget_preview(plan.budget), config=job.redacted(),
        )
        if total.pending:
            assert setup.provider is not None
            await _execute(job, setup, started, signals)
        await asyncio.to_thread(setup.folder.tidy)
        result.wall_s = time.monotonic() - started
        if result.exit_code == EXIT_OK and result.counters.failed + total.failed:
            result.exit_code = EXIT_FAILED_ROWS
        try:
            await asyncio.to_thread(ledger.finish_run, run_id, result.exit_code, result.summary())
        except LedgerError as exc:
            _halted(result, exc)
        log.info("summary", **result.summary())
        return result
    finally:
        await asyncio.to_thread(held.close)


@dataclass
class _Setup:
    """A run ready to send its first request."""

    ledger: Ledger
    folder: OutputFolder
    plan: Plan
    spending: Spending
    provider: SpeechProvider | None
    result: RunResult
    cleaned: int  # partial files a killed run left, removed


def _set_up(job: Job, provider: SpeechProvider | None, held: contextlib.ExitStack, started: float
            ) -> RunResult | _Setup:
    """Everything before the first request, blocking: the dry run's whole answer, or for a run the
    lock, the ledger and the plan (`held` releases them)."""
    check_layout(job.named_ledger, job.shard)
    folder = open_output(job.out, job.ledger_path)
    prices = prices_for(job, listed=provider is None)
    budget = Spending(job.budget, prices) if job.budget.capped else None
    if job.dry_run:
        ledger = Ledger.open_existing(job.ledger_path) if job.ledger_path.exists() else None
        try:
            plan = make_plan(job, ledger, folder, budget=budget, checks=_output_checks(job, folder))
        finally:
            if ledger is not None:
                ledger.close()
        result = RunResult(EXIT_OK, plan, prices)
        try:
            _check_models(job, plan, Spending(job.budget, prices), listed=provider is None)
        except UsageError as exc:
            result.exit_code, result.stop_reason = exc.exit_code, str(exc)
        result.wall_s = time.monotonic() - started
        return result
    held.enter_context(folder.lock())
    fresh = not job.ledger_path.exists()
    ledger = Ledger(job.ledger_path)
    try:
        _check_bucket(job, ledger)
        plan = make_plan(job, ledger, folder, budget=budget, checks=_output_checks(job, folder))
        spending = Spending(job.budget, prices)
        _check_models(job, plan, spending, listed=provider is None)
        if provider is None and plan.total.pending:
            provider = _providers(job, plan)
        cleaned = folder.clean_partials() if plan.total.pending else 0  # a store is reached only for work
    except BaseException:
        ledger.close()
        if fresh:  # refused before it started: leave no ledger behind to speak for the job
            ledger.remove()
        raise
    held.callback(ledger.close)
    return _Setup(ledger, folder, plan, spending, provider, RunResult(EXIT_OK, plan, prices), cleaned)


def _check_models(job: Job, plan: Plan, spending: Spending, listed: bool) -> None:
    """Refuse, before anything is sent, models the provider does not list (with --strict; `listed`:
    the HTTP provider's list, not one an application plugged in) and, under --max-cost, models
    without a known price."""
    pending = [name for name, m in plan.models.items() if m.pending]
    if listed:
        check_models(job, pending)
    spending.check_prices(pending)


def _settings(job: Job) -> RunSettings:
    return RunSettings(str(job.manifest.resolve()), redact_uri(job.out) if isinstance(job.out, str) else str(job.out),
                       job.defaults, str(job.shard) if job.shard is not None else None)


def _output_checks(job: Job, folder: OutputFolder) -> OutputChecks:
    if isinstance(job.out, str):
        return OutputChecks(None, {})
    return OutputChecks(job.out, owned_files(job.out, job.ledger_path, folder.lock_path))


def _check_bucket(job: Job, ledger: Ledger) -> None:
    """A ledger is trusted for what is in the bucket it recorded: refuse to read it as another's."""
    if not isinstance(job.out, str):
        return  # a local folder is checked file by file
    def place(uri: str) -> str:  # the bucket and prefix, without options such as the endpoint
        return uri.partition("?")[0].rstrip("/")

    last = ledger.last_run()
    recorded = last.out or "" if last is not None else ""
    here = redact_uri(job.out)
    if recorded and place(recorded) != place(here):
        raise UsageError(
            f"{job.ledger_path} records the audio of {place(recorded)}, not of {place(here)}: it would take that "
            "audio as already here. Give each place a ledger of its own (--ledger)"
        )


def _budget_preview(budget: Spending | None) -> dict[str, object]:
    """What the budget lets this run take, for the start event beside the estimate of everything left."""
    if budget is None:
        return {}
    return {"budget_rows": budget.rows, "budget_characters": budget.characters, "budget_cost_usd": round(budget.cost, 6)}


def _providers(job: Job, plan: Plan) -> SpeechProvider:
    """The embedded engine for `local/*` rows; the HTTP client, and so the key, only if other rows are left."""
    remote = None
    if any(m.pending for name, m in plan.models.items() if not is_local(name)):
        from .client import HTTPSpeechClient  # the HTTP stack, only for a run that sends requests

        remote = HTTPSpeechClient(job.provider, job.provider.api_key(), job.timeouts, job.concurrency)
    return RoutingProvider(LocalSpeechProvider(), remote)


async def _execute(job: Job, setup: _Setup, started: float, signals: bool) -> None:
    plan, result, ledger, spending = setup.plan, setup.result, setup.ledger, setup.spending
    assert setup.provider is not None
    # Under a budget, the bar runs to what the budget lets this run take, as the plan played it through.
    rows, characters = ((plan.budget.rows, plan.budget.sent_characters) if plan.budget is not None
                        else (plan.total.pending, plan.total.pending_characters))
    progress = Progress(rows, characters, interactive=sys.stderr.isatty() and job.log_format != "json",
                        interval=job.progress_interval)
    throttle = Throttle(job.concurrency, job.requests_per_minute)
    # Publishing waits on fsync: with a handful of threads the disk, not the provider, would set the
    # pace of a fast run. The run's own threads, so a caller's event loop keeps its executor.
    executor = ThreadPoolExecutor(max_workers=min(64, 2 * job.concurrency), thread_name_prefix="batchtts")
    pool: WorkerPool[WorkItem]
    narrator = Narrator(setup.provider, setup.folder, ledger, job.retry, job.stitching, progress, throttle,
                        result.prices, stop=lambda reason: pool.stop(reason), stopping=lambda: pool.stopping,
                        executor=executor)
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
        await pool.run(_feed(job, plan, setup.folder, spending, executor))
    finally:
        if timer is not None:
            timer.cancel()
        ledger.on_write = None
        commit()
        if signals:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
        progress.close()
        await setup.provider.aclose()
        executor.shutdown(wait=False)
    result.counters = narrator.counters
    if pool.fault is not None:
        _halted(result, pool.fault)
    elif narrator.provider_stop is not None:
        result.exit_code = EXIT_PROVIDER_STOP
        result.stop_reason = str(narrator.provider_stop)
        result.advice = narrator.provider_stop.advice
    elif received:
        result.exit_code = EXIT_SIGTERM if received[0] == signal.SIGTERM else EXIT_SIGINT
        result.stop_reason = pool.stop_reason
    elif pool.stopping:
        result.exit_code = EXIT_MAX_RUNTIME
        result.stop_reason = pool.stop_reason
    elif spending.refused is not None:
        result.exit_code = EXIT_BUDGET
        result.stop_reason = spending.refused
        log.warning("budget_reached", reason=spending.refused, characters=spending.characters,
                    estimated_cost_usd=round(spending.cost, 6))


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


def _halted(result: RunResult, fault: Exception) -> None:
    """The run could not go on: say why, and that a rerun resumes once that is fixed."""
    if result.exit_code == EXIT_HALTED:
        return
    result.exit_code = EXIT_HALTED
    result.stop_reason = str(fault) if isinstance(fault, BatchTTSError) else f"{type(fault).__name__}: {fault}"
    result.advice = "what finished is recorded: fix that, then run the same command again to resume"
    log.error("halted", reason=result.stop_reason)


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
