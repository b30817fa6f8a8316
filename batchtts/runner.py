"""A whole run: lock the ledger, check and plan the manifest, narrate what is left, report.

`run(job)` works from any thread, and inside a running event loop too (it then narrates in a thread
of its own); `await arun(job)` narrates in the caller's loop. Blocking work (planning, the ledger,
files) runs in threads, so the loop keeps serving answers. Signals belong to the caller: the CLI
asks for SIGINT and SIGTERM handling (`signals=True`), a library user stops a run as they see fit.

The manifest is read twice, both times as a stream: once here, to refuse a bad manifest and count
what is left (and what it will cost) before anything is sent; once by `execution.narrate`, to feed
the pool the rows that have work. A sharded run sees only its shard's rows; a budget or
`max_runtime` ends the feed early, and what was taken on is finished and recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

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
    LedgerError,
    UsageError,
)
from .execution import Ending, halted, narrate
from .ledger import Ledger, Planned, RunSettings, check_layout
from .listing import Listing
from .log import log
from .models import check_models
from .narrator import Counters
from .plan import Plan, make_plan
from .providers import SpeechProvider, for_job
from .redact import redact_uri
from .storage import OutputFolder, open_output

if TYPE_CHECKING:
    from .mastering import Pass


@dataclass
class RunResult:
    exit_code: int
    plan: Plan
    prices: Prices = field(default_factory=Prices)
    counters: Counters = field(default_factory=Counters)
    stop_reason: str | None = None
    advice: str | None = None
    wall_s: float = 0.0
    mastering: Pass | None = None  # what the run's mastering did, when the job masters

    def summary(self) -> dict[str, object]:
        total = self.plan.total
        return {
            "exit_code": self.exit_code, "rows": total.rows, "already_done": total.done,
            "skipped_failed": total.failed, **asdict(self.counters),
            "audio_s": round(self.counters.audio_s, 3), "cost_usd": round(self.counters.cost_usd, 6),
            "wall_s": round(self.wall_s, 3), "stop_reason": self.stop_reason,
            **(self.mastering.summary() if self.mastering is not None else {}),
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
    running: list[tuple[asyncio.AbstractEventLoop, asyncio.Task[RunResult]]] = []
    interrupted = threading.Event()

    async def narrated() -> RunResult:
        task = asyncio.current_task()
        assert task is not None
        running.append((asyncio.get_running_loop(), task))
        if interrupted.is_set():
            raise asyncio.CancelledError
        return await arun(job, provider)

    def own_loop() -> None:
        try:
            outcome.append(asyncio.run(narrated()))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=own_loop, name="batchtts-run")
    thread.start()
    try:
        thread.join()
    except BaseException:  # Ctrl-C in the caller: the run stops as a cancelled one does, then this returns
        interrupted.set()
        for loop, task in running:
            loop.call_soon_threadsafe(task.cancel)
        thread.join()
        raise
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


async def arun(job: Job, provider: SpeechProvider | None = None, *, signals: bool = False) -> RunResult:
    """`run` in the running event loop. With `signals`, SIGINT and SIGTERM stop the run gracefully
    (a second one at once), as the CLI does; it needs the main thread."""
    job.validate()
    if signals and threading.current_thread() is not threading.main_thread():
        raise UsageError("signals=True needs the main thread: Python delivers signals there alone")
    started = time.monotonic()
    held = contextlib.ExitStack()  # the lock and the ledger, once taken
    try:
        setup = await _setting_up(job, provider, held, started)
        if isinstance(setup, RunResult):
            return setup
        result, ledger = setup.result, setup.ledger
        plan = result.plan
        total = plan.total
        run_id = await asyncio.to_thread(ledger.start_run, RunSettings.of(job), job.redacted())
        if setup.planned is not None:
            await asyncio.to_thread(ledger.record_planned, run_id, setup.planned)
        log.info(
            "start", manifest=str(job.manifest), out=str(setup.folder), ledger=str(job.ledger_path),
            **({"shard": str(job.shard)} if job.shard is not None else {}), rows=total.rows, already_done=total.done,
            pending=total.pending, skipped_failed=total.failed, partial_files_removed=setup.cleaned,
            estimated_cost_usd=plan.estimate(result.prices), **_budget_preview(plan.budget), config=job.redacted(),
        )
        if total.pending:
            assert setup.provider is not None
            result.counters, ending = await narrate(job, plan, ledger, setup.folder, setup.provider, setup.spending,
                                                    result.prices, started, signals)
            _ended(result, ending)
        if job.mastering.preset != "none" and result.exit_code in _MASTERED_AFTER:
            await _master(job, ledger, setup.folder, result, started, signals)
        await asyncio.to_thread(setup.folder.tidy)
        result.wall_s = time.monotonic() - started
        mastering_failed = result.mastering is not None and result.mastering.failed
        if result.exit_code == EXIT_OK and (result.counters.failed + total.failed or mastering_failed):
            result.exit_code = EXIT_FAILED_ROWS
        try:
            await asyncio.to_thread(ledger.finish_run, run_id, result.exit_code, result.summary())
        except LedgerError as exc:
            if result.exit_code != EXIT_HALTED:  # the first fault is the one to fix
                _ended(result, halted(exc))
        log.info("summary", **result.summary())
        return result
    finally:
        await asyncio.to_thread(held.close)


async def _setting_up(job: Job, provider: SpeechProvider | None, held: contextlib.ExitStack,
                      started: float) -> RunResult | _Setup:
    """`_set_up` in a thread. Cancelled meanwhile, the planning stops at its next row and undoes
    what it did before this returns: the lock is never let go while planning goes on."""
    cancelled = threading.Event()
    future = asyncio.get_running_loop().run_in_executor(None, _set_up, job, provider, held, started, cancelled)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        cancelled.set()
        with contextlib.suppress(Exception):  # PlanCancelled, or whatever else ended the planning
            await future
        raise


@dataclass
class _Setup:
    """A run ready to send its first request."""

    ledger: Ledger
    folder: OutputFolder
    spending: Spending
    provider: SpeechProvider | None
    result: RunResult
    cleaned: int  # partial files a killed run left, removed
    planned: Planned | None = None  # for status to count the ledger's rows instead of planning them again


def _check_layout(job: Job, folder: OutputFolder) -> Listing | None:
    """Refuse a run of another shard layout than its job's ledgers (check_layout). A local output
    folder is listed here once, for the plan too: the ledgers beside the audio are found in the
    same listing as the audio files, not by a second pass over a folder of millions."""
    named = job.named_ledger
    if isinstance(job.out, str) or not named.suffix or named.parent.resolve() != folder.root.resolve():
        check_layout(named, job.shard)
        return None
    listing = Listing(folder.root, job.verify_files, keep=(named.suffix,))
    check_layout(named, job.shard, [named.parent / name for name in listing.kept()])
    return listing


def _set_up(job: Job, provider: SpeechProvider | None, held: contextlib.ExitStack, started: float,
            cancelled: threading.Event) -> RunResult | _Setup:
    """Everything before the first request, blocking: the dry run's whole answer, or for a run the
    lock, the ledger and the plan (`held` releases them)."""
    if job.mastering.preset != "none" and isinstance(job.out, str):
        raise UsageError(f"--master {job.mastering.preset} needs the audio on local disk, not in {redact_uri(job.out)}: "
                         "narrate to a local --out folder to master, or run without --master (preset none)")
    folder = open_output(job.out, job.ledger_path)
    prices = prices_for(job, listed=provider is None)
    budget = Spending(job.budget, prices) if job.budget.capped else None
    if job.dry_run:
        listing = _check_layout(job, folder)
        ledger = Ledger.open_existing(job.ledger_path) if job.ledger_path.exists() else None
        try:
            plan = make_plan(job, ledger, folder, budget=budget, for_run=True, cancelled=cancelled.is_set,
                             listing=listing)
            plan.close()  # no feed follows
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
    lock = held.enter_context(folder.lock())
    fresh = not job.ledger_path.exists()
    ledger = Ledger(job.ledger_path)
    try:
        listing = _check_layout(job, folder)  # listed under the lock: no run adds files to it from here
        ledger.check_place(job)
        before = _planned_before(job, ledger)
        plan = make_plan(job, ledger, folder, budget=budget, for_run=True, cancelled=cancelled.is_set, listing=listing)
        held.callback(plan.close)
        planned = _planned_after(before, plan)
        spending = Spending(job.budget, prices)
        _check_models(job, plan, spending, listed=provider is None)
        if provider is None and plan.total.pending:
            provider = for_job(job, [name for name, m in plan.models.items() if m.pending])
        cleaned = folder.clean_partials() if plan.total.pending else 0  # a store is reached only for work
    except BaseException:
        ledger.close()
        if fresh:  # refused before it started: leave no ledger behind to speak for the job, nor its folder
            ledger.remove()
            lock.undo()
        raise
    held.callback(ledger.close)
    return _Setup(ledger, folder, spending, provider, RunResult(EXIT_OK, plan, prices), cleaned, planned)


def _planned_before(job: Job, ledger: Ledger) -> tuple[Planned, int] | None:
    """The manifest's size and mtime, and the rows the ledger holds, before planning; None for a
    sharded run (status plans a shard's rows)."""
    if job.shard is not None:
        return None
    try:
        return Planned.of(job.manifest, 0), ledger.row_count()
    except OSError:
        return None


def _planned_after(before: tuple[Planned, int] | None, plan: Plan) -> Planned | None:
    """What status may count the ledger by: the manifest as planned, when every row has an id and
    every record the ledger held is one of its rows as it is now (done with its file, or failed).
    From then on the run records only its rows: the ledger counts them as a plan would."""
    if before is None or plan.keyed_by_content:
        return None
    total = plan.total
    if before[1] != total.done + total.failed + total.retrying:
        return None
    return dataclasses.replace(before[0], rows=total.rows)


def _check_models(job: Job, plan: Plan, spending: Spending, listed: bool) -> None:
    """Refuse, before anything is sent, models the provider does not list (with --strict; `listed`:
    the HTTP provider's list, not one an application plugged in) and, under --max-cost, models
    without a known price."""
    pending = [name for name, m in plan.models.items() if m.pending]
    if listed:
        check_models(job, pending)
    spending.check_prices(pending)


# Runs that end so go on to master what is done; a halted (full disk), interrupted or timed-out one does not.
_MASTERED_AFTER = (EXIT_OK, EXIT_FAILED_ROWS, EXIT_BUDGET, EXIT_PROVIDER_STOP)


async def _master(job: Job, ledger: Ledger, folder: OutputFolder, result: RunResult, started: float,
                  signals: bool) -> None:
    """Master the rows done into OUT/mastered/, in threads of their own. A signal (with `signals`),
    the end of --max-runtime or a cancelled run stops it at the next frame: what is mastered is
    recorded, the rest is left to the next run."""
    from .mastering import master_rows, preset

    stop = threading.Event()
    received: list[int] = []
    deadline = started + job.max_runtime if job.max_runtime is not None else None

    def stopping() -> bool:
        return stop.is_set() or (deadline is not None and time.monotonic() > deadline)

    def on_signal(signum: int) -> None:
        received.append(signum)
        stop.set()

    await asyncio.to_thread(folder.clean_partials)  # what a run killed while mastering left half-written
    loop = asyncio.get_running_loop()
    if signals:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
    future = loop.run_in_executor(None, master_rows, ledger, folder.root, folder.partial_dir,
                                  preset(job.mastering.preset), stopping)
    try:
        result.mastering = await asyncio.shield(future)
    except asyncio.CancelledError:
        stop.set()
        with contextlib.suppress(Exception):
            await future
        raise
    except LedgerError as exc:
        _ended(result, halted(exc))
        return
    finally:
        if signals:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
    if received:
        name = signal.Signals(received[0]).name
        result.exit_code = EXIT_SIGTERM if received[0] == signal.SIGTERM else EXIT_SIGINT
        result.stop_reason = f"interrupted by {name} while mastering: the next run masters the files left"
    elif result.mastering.stopped and job.max_runtime is not None:
        result.exit_code = EXIT_MAX_RUNTIME
        result.stop_reason = (f"the maximum run time ({job.max_runtime:g} s) was reached while mastering: the next "
                              "run masters the files left")


def _budget_preview(budget: Spending | None) -> dict[str, object]:
    """What the budget lets this run take, for the start event beside the estimate of everything left."""
    if budget is None:
        return {}
    return {"budget_rows": budget.rows, "budget_characters": budget.characters, "budget_cost_usd": round(budget.cost, 6)}


def _ended(result: RunResult, ending: Ending | None) -> None:
    if ending is not None:
        result.exit_code, result.stop_reason, result.advice = ending.exit_code, ending.reason, ending.advice
