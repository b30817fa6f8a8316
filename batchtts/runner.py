"""A whole run: lock the ledger, check and plan the manifest, narrate what is left, report.

`run(job)` is the library entry point the CLI calls. The manifest is read twice, both times as a
stream: once to refuse a bad manifest and count what is left (and what it will cost) before
anything is sent, once to feed the pool. A sharded run sees only its shard's rows; a budget or
`max_runtime` ends the feed early, and what was taken on is finished and recorded.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields

import structlog

from . import manifest
from .budget import Prices, Spending, Verdict, prices_for
from .chunking import limit_for, split_text
from .client import HTTPSpeechClient
from .config import Job, redact_uri
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
from .ledger import Entry, Ledger, LedgerSet, check_layout
from .local import LocalSpeechProvider, validate_manifest
from .manifest import Row
from .models import check_models
from .names import OutputChecks, owned_files
from .narrator import Assembly, ChunkJob, Counters, Narrator, PassedOver, WorkItem
from .pool import WorkerPool
from .progress import Progress
from .providers import RoutingProvider, SpeechProvider, is_local
from .stitch import Part
from .storage import OutputFolder, open_output
from .throttle import Throttle

log = structlog.get_logger("batchtts")
_FEED_BATCH = 512


@dataclass
class ModelPlan:
    rows: int = 0
    characters: int = 0
    done: int = 0
    failed: int = 0
    pending: int = 0
    requests: int = 0  # requests the pending rows need: one per row, or per missing chunk of a long row
    pending_characters: int = 0  # characters those requests send


@dataclass
class Plan:
    """What the manifest asks for against what the ledger already has, per model; with a budget, also
    what one run under it would take on."""

    models: dict[str, ModelPlan] = field(default_factory=dict)
    budget: Spending | None = None

    @property
    def total(self) -> ModelPlan:
        return ModelPlan(*(sum(getattr(m, f.name) for m in self.models.values()) for f in fields(ModelPlan)))

    def estimates(self, prices: Prices) -> dict[str, float | None]:
        """Estimated cost of what is left, per model; None where the price is unknown."""
        return {name: prices.cost(name, m.pending_characters) for name, m in sorted(self.models.items())}

    def estimate(self, prices: Prices) -> float | None:
        """Estimated cost of everything left, or None if a model with work left has no known price."""
        costs = self.estimates(prices).values()
        return None if None in costs else round(sum(c for c in costs if c is not None), 6)


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


def needs_work(row: Row, entry: Entry | None, folder: OutputFolder, retry_failed: bool) -> bool:
    """The resume rule: skip a row only if its file is there as recorded, for the same audio."""
    if entry is None or entry.fingerprint != row.fingerprint:
        return True
    if entry.status == "done":
        return entry.path != row.relpath or not folder.has(entry.path, entry.bytes)
    return entry.retryable or retry_failed


def make_plan(job: Job, ledger: Ledger | LedgerSet | None, folder: OutputFolder,
              owns: Callable[[str], bool] | None = None, budget: Spending | None = None,
              checks: OutputChecks | None = None) -> Plan:
    """Validate the manifest (raises ManifestError) and count what is done and what is left, for the
    rows `owns` accepts (default: the job's shard, or every row); `budget` is run as the feed runs it.
    For a run, `checks` sees every row's file name, and local rows no run could narrate are refused."""
    plan = Plan(budget=budget)
    pending = 0
    limits: dict[str, int] = {}
    if owns is None and job.shard is not None:
        owns = job.shard.owns

    def count(row: Row) -> None:
        nonlocal pending
        if owns is not None and not owns(row.key):
            if checks is not None:
                checks.see(row, pending=False)
            return
        model = plan.models.setdefault(row.model, ModelPlan())
        model.rows += 1
        model.characters += len(row.text)
        entry = ledger.lookup(row.key) if ledger is not None else None
        work = needs_work(row, entry, folder, job.retry_failed)
        if checks is not None:
            checks.see(row, pending=work)
        if work:
            if job.limit is None or pending < job.limit:
                pending += 1
                model.pending += 1
                if row.model not in limits:
                    limits[row.model] = limit_for(row.model, job.limits, job.chunk_chars)
                if len(row.text) <= limits[row.model]:
                    requests, characters = 1, len(row.text)  # the common case, without building its work items
                else:
                    items = _work_for(row, job, ledger, folder)
                    requests = sum(1 for item in items if not isinstance(item, Assembly))
                    characters = sum(map(_characters, items))
                model.requests += requests
                model.pending_characters += characters
                if budget is not None and budget.admit(row, characters) is Verdict.OVER:
                    pending -= 1  # passed over, as the feed does: not counted against --limit
        elif entry is not None and entry.status == "failed":
            model.failed += 1
        else:
            model.done += 1

    if checks is None:  # counting what a ledger holds (status): rows are counted as they are
        manifest.validate(job.manifest, job.defaults, on_row=count)
        return plan
    validate_manifest(job.manifest, job.defaults, on_row=count)
    checks.raise_problems(job.manifest)
    return plan


def _valid_rows(job: Job) -> Iterator[Row]:
    for row in manifest.iter_rows(job.manifest, job.defaults):
        if isinstance(row, Row) and (job.shard is None or job.shard.owns(row.key)):
            yield row


def _characters(item: WorkItem) -> int:
    """Characters one work item sends: a whole row, one chunk, or none for stitching alone."""
    if isinstance(item, Row):
        return len(item.text)
    if isinstance(item, ChunkJob):
        return len(item.assembly.chunks[item.index].text)
    return 0


def _pending_batches(job: Job, ledger: Ledger, folder: OutputFolder, spending: Spending) -> Iterator[list[WorkItem]]:
    """The work left, in manifest order: whole rows, or the missing chunks of rows over their limit.
    Ends early at the first row the budget cannot take on; passes over a row no run under it can."""
    batch: list[WorkItem] = []
    sent = 0
    for row in _valid_rows(job):
        if job.limit is not None and sent >= job.limit:
            break
        if needs_work(row, ledger.lookup(row.key), folder, job.retry_failed):
            items = _work_for(row, job, ledger, folder)
            characters = sum(map(_characters, items))
            verdict = spending.admit(row, characters)
            if verdict is Verdict.STOP:
                break
            if verdict is Verdict.OVER:  # recorded as failed; not taken on, so not counted against --limit
                assert spending.last_over is not None
                batch.append(PassedOver(row, spending.last_over))
                continue
            sent += 1
            batch.extend(items)
            if len(batch) >= _FEED_BATCH:
                yield batch
                batch = []
    if batch:
        yield batch


def _work_for(row: Row, job: Job, ledger: Ledger | None, folder: OutputFolder) -> list[WorkItem]:
    chunks = split_text(row.text, limit_for(row.model, job.limits, job.chunk_chars))
    if len(chunks) == 1:
        return [row]
    parts: list[Part | None] = []
    for chunk in chunks:
        done = ledger.chunk(row.chunk_fingerprint(chunk.text)) if ledger is not None else None
        have = done is not None and done["status"] == "done" and folder.has(done["path"], done["bytes"])
        parts.append(Part(folder.path_of(done["path"]), chunk.paragraph_before, done["sample_rate"], done["channels"])
                     if have else None)
    missing = [i for i, part in enumerate(parts) if part is None]
    assembly = Assembly(row, chunks, parts, remaining=len(missing))
    return [ChunkJob(assembly, i) for i in missing] if missing else [assembly]


async def _pending_work(job: Job, folder: OutputFolder, spending: Spending) -> AsyncIterator[WorkItem]:
    """Work left to do, planned in a thread so the event loop keeps serving responses meanwhile."""
    reader = Ledger(job.ledger_path, readonly=True)
    try:
        batches = _pending_batches(job, reader, folder, spending)
        while (batch := await asyncio.to_thread(next, batches, None)) is not None:
            for item in batch:
                yield item
    finally:
        reader.close()


def run(job: Job, provider: SpeechProvider | None = None) -> RunResult:
    """Narrate every row of the job's manifest that the ledger does not already hold."""
    job.validate()
    started = time.monotonic()
    check_layout(job.named_ledger, job.shard)
    folder = open_output(job.out, job.ledger_path)
    prices = prices_for(job)
    if job.dry_run:
        ledger = Ledger.open_existing(job.ledger_path) if job.ledger_path.exists() else None
        try:
            plan = make_plan(job, ledger, folder, budget=Spending(job.budget, prices) if job.budget.capped else None,
                             checks=_output_checks(job, folder))
        finally:
            if ledger is not None:
                ledger.close()
        result = RunResult(EXIT_OK, plan, prices)
        try:
            check_models(job, (name for name, m in plan.models.items() if m.pending))
            Spending(job.budget, prices).check_prices(name for name, m in plan.models.items() if m.pending)
        except UsageError as exc:
            result.exit_code, result.stop_reason = exc.exit_code, str(exc)
        result.wall_s = time.monotonic() - started
        return result

    with folder.lock():
        fresh = not job.ledger_path.exists()
        ledger = Ledger(job.ledger_path)
        try:
            _check_bucket(job, ledger)
            plan = make_plan(job, ledger, folder, budget=Spending(job.budget, prices) if job.budget.capped else None,
                             checks=_output_checks(job, folder))
            spending = Spending(job.budget, prices)
            check_models(job, (name for name, m in plan.models.items() if m.pending))
            spending.check_prices(name for name, m in plan.models.items() if m.pending)
            if provider is None and plan.total.pending:
                provider = _providers(job, plan)
            cleaned = folder.clean_partials() if plan.total.pending else 0  # a store is reached only for work
        except BaseException:
            ledger.close()
            if fresh:  # refused before it started: leave no ledger behind to speak for the job
                ledger.remove()
            raise
        try:
            total = plan.total
            run_id = ledger.start_run(job.manifest.resolve(), job.redacted())
            log.info(
                "start", manifest=str(job.manifest), out=str(folder), ledger=str(job.ledger_path),
                **({"shard": str(job.shard)} if job.shard is not None else {}), rows=total.rows, already_done=total.done,
                pending=total.pending, skipped_failed=total.failed, partial_files_removed=cleaned,
                estimated_cost_usd=plan.estimate(prices), **_budget_preview(plan.budget), config=job.redacted(),
            )
            result = RunResult(EXIT_OK, plan, prices)
            if total.pending:
                assert provider is not None
                asyncio.run(_execute(job, plan, ledger, folder, provider, result, spending, started))
            folder.tidy()
            result.wall_s = time.monotonic() - started
            if result.exit_code == EXIT_OK and result.counters.failed + total.failed:
                result.exit_code = EXIT_FAILED_ROWS
            try:
                ledger.finish_run(run_id, result.exit_code, result.summary())
            except LedgerError as exc:
                _halted(result, exc)
            log.info("summary", **result.summary())
            return result
        finally:
            ledger.close()


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

    recorded = str((ledger.last_run() or {}).get("config", {}).get("out") or "")
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
        remote = HTTPSpeechClient(job.provider, job.provider.api_key(), job.timeouts, job.concurrency)
    return RoutingProvider(LocalSpeechProvider(), remote)


async def _execute(
    job: Job, plan: Plan, ledger: Ledger, folder: OutputFolder, provider: SpeechProvider, result: RunResult,
    spending: Spending, started: float,
) -> None:
    # Under a budget, the bar runs to what the budget lets this run take, as the plan played it through.
    rows, characters = ((plan.budget.rows, plan.budget.sent_characters) if plan.budget is not None
                        else (plan.total.pending, plan.total.pending_characters))
    progress = Progress(rows, characters, interactive=sys.stderr.isatty() and job.log_format != "json",
                        interval=job.progress_interval)
    throttle = Throttle(job.concurrency, job.requests_per_minute)
    narrator = Narrator(provider, folder, ledger, job.retry, job.stitching, progress, throttle, result.prices)
    # Twice as many workers as requests allowed in flight: a worker sleeping out a retry's backoff, or
    # narrating a local row, then does not hold back the remote requests the throttle would allow.
    pool: WorkerPool[WorkItem] = WorkerPool(2 * job.concurrency, narrator)
    narrator.pool = pool
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

    # Group commit: rows that finish in the same turn of the event loop share one commit.
    ledger.on_write = lambda: loop.call_soon(commit)
    # Publishing waits on fsync; with the default handful of threads the disk, not the provider,
    # would set the pace of a fast run.
    loop.set_default_executor(ThreadPoolExecutor(max_workers=min(64, 2 * job.concurrency), thread_name_prefix="publish"))
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    timer = _stop_at_max_runtime(job, pool, started)
    progress.start()
    try:
        await pool.run(_pending_work(job, folder, spending))
    finally:
        if timer is not None:
            timer.cancel()
        ledger.on_write = None
        commit()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        progress.close()
        await provider.aclose()
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
