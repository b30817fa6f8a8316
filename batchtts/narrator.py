"""Narrating the work the pool hands out: a row, or one chunk of a long row, requested with retries,
streamed to disk, made into the row's shape (conform.py), published and recorded; and, once a long
row's chunks are all there, its stitching.

The order is what makes reruns safe: a file is renamed into place before the ledger says done, and
work whose failure was transient is left for the next run instead of being marked failed.

Each work item is a fault boundary. Whatever goes wrong in one row's work is recorded against that
row and the run goes on, except a fault of the machine itself (a full disk, a ledger that can no
longer be written): every row would meet it, so it is raised as a HaltError and the pool stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import re
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from tenacity import RetryCallState

from .audio import AudioInfo, AudioWriter, wire_format
from .budget import Prices
from .captions import caption_path, cues, render
from .checks import Checker, Verdict
from .config import Checks, Output, RetryPolicy, Stitching
from .conform import conform, converts
from .errors import (
    HaltError,
    HTTPStatusError,
    LedgerError,
    NoAnswerError,
    RateLimitStopError,
    RejectedError,
    RunStop,
    SpeechError,
    StorageError,
    TransportError,
    UnexpectedError,
    UnreachableError,
)
from .ledger import Attempt, Ledger, Stored
from .log import log
from .manifest import Row
from .names import chunk_path
from .plan import needs_work
from .progress import Progress
from .providers import SpeechProvider, SpeechRequest, is_local
from .retry import build_retrying, is_transient, retried_next_run
from .stitch import Stitched, stitch
from .storage import OutputFolder, Published
from .tags import write_tags
from .throttle import Throttle, Ticket
from .work import Assembly, ChunkJob, Copy, Part, PassedOver, Unreadable, WorkItem, row_of

_T = TypeVar("_T")

_UNREACHABLE_AFTER = 8  # requests in a row with no answer at all ...
_UNREACHABLE_SECONDS = 2.0  # ... over at least this long, before the provider counts as unreachable
# A 429 that says a quota is spent rather than a rate passed: waiting a moment will not help.
_QUOTA = re.compile(r"quota|per[ -]?day|daily|per[ -]?month|monthly", re.IGNORECASE)

# What a file system says when no file at all can be written there: no row can succeed either.
_MACHINE_FAULTS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EMFILE, errno.ENFILE})


def classify(exc: Exception, where: str) -> SpeechError | HaltError:
    """What an exception in one row's work means: a fault of the machine (halts the run), a file that
    could not be stored (this row only), or something unforeseen (this row only, with its type)."""
    if isinstance(exc, (SpeechError, HaltError)):
        return exc
    if isinstance(exc, (LedgerError, sqlite3.Error)):
        return HaltError(f"the ledger cannot record what was done: {exc}")
    if isinstance(exc, OSError) and exc.errno in _MACHINE_FAULTS:
        return HaltError(f"cannot write {where}: {exc.strerror or exc}")
    if isinstance(exc, OSError):
        name = f" ({exc.filename})" if exc.filename else ""
        return StorageError(f"cannot store {where}: {exc.strerror or exc}{name}")
    return UnexpectedError(f"{type(exc).__name__}: {exc}")


@dataclass
class Counters:
    done: int = 0
    failed: int = 0
    requests: int = 0
    retries: int = 0
    chunks: int = 0
    bytes: int = 0
    audio_s: float = 0.0
    characters: int = 0
    characters_sent: int = 0  # to the provider, as the budget counts them
    local_characters: int = 0  # narrated by the embedded engine: free, sent nowhere
    cost_usd: float = 0.0
    unpriced_characters: int = 0  # sent to models whose price is unknown: not in cost_usd
    copied: int = 0  # of the rows done, those whose file is a copy of an identical request's (dedup.py)
    requests_saved: int = 0  # the requests those copies did not make
    checked: int = 0  # files the audio checks measured
    flagged: int = 0  # rows this run left flagged: a new file outside the bounds, or a redo that kept one
    redone: int = 0  # flagged rows narrated again (--redo-flagged)
    replaced: int = 0  # of those, the rows whose new take replaced the file kept


@dataclass(frozen=True)
class _Take:
    """The file of a flagged row narrated again: kept until a better take lands."""

    record: dict[str, Any]  # its checks record
    verdict: Verdict  # under this run's bounds


@dataclass(frozen=True)
class _Check:
    """What a row's file is checked against as it lands: the words it says, and, for a flagged row
    narrated again, the take it must beat."""

    text: str
    language: str | None
    kept: _Take | None


@dataclass(frozen=True)
class _Outcome:
    generation_id: str | None
    published: Published | None  # None: a redo take no better than the file kept, thrown away
    info: AudioInfo
    attempts: int
    latency_s: float
    verdict: Verdict | None  # the audio checks', for a row's file


@dataclass(frozen=True)
class _Body:
    generation_id: str | None
    writer: AudioWriter
    partial: Path
    file: BinaryIO


# Answers of 404 to this many requests for one model, and audio to none: the provider has no such
# model, and its other rows are failed without being sent.
NOT_FOUND_AFTER = 3


class MissingModels:
    """Models the provider answers 404 for, request after request, and never with audio. A 404 alone
    may be the row's (a voice id the provider lacks): one success for the model clears it for good."""

    def __init__(self, after: int = NOT_FOUND_AFTER) -> None:
        self.after = after
        self._misses: dict[str, int] = {}
        self._answered: set[str] = set()
        self.missing: dict[str, str] = {}  # model: why its rows are not sent

    def succeeded(self, model: str) -> None:
        self._answered.add(model)
        self._misses.pop(model, None)

    def refuse(self, model: str) -> None:
        """Raise, for a model found missing, the 404 its rows fail with unsent."""
        if (why := self.missing.get(model)) is not None:
            raise HTTPStatusError(why, 404)

    def not_found(self, model: str, message: str) -> bool:
        """Count a 404; True when it makes the model missing."""
        if model in self._answered or model in self.missing:
            return False
        self._misses[model] = self._misses.get(model, 0) + 1
        if self._misses[model] < self.after:
            return False
        self.missing[model] = (f"{message} (not sent: the provider answered 404 to {self.after} requests for {model} "
                               "and audio to none; check the model's name with `batchtts models`)")
        return True


class _Stopped(Exception):
    """The run began winding down before this work was sent."""


class Narrator:
    """Does the pool's work. It stops the run through `stop` (a provider that refuses every row) and
    asks `stopping` before each request; blocking file work runs on `executor`."""

    def __init__(
        self,
        provider: SpeechProvider,
        folder: OutputFolder,
        ledger: Ledger,
        policy: RetryPolicy,
        stitching: Stitching,
        progress: Progress,
        throttle: Throttle,
        prices: Prices,
        stop: Callable[[str], None],
        stopping: Callable[[], bool],
        executor: Executor | None = None,
        captions: str | None = None,
        checks: Checks | None = None,
        redo_flagged: bool = False,
    ) -> None:
        self.provider = provider
        self.folder = folder
        self.ledger = ledger
        self.policy = policy
        self.stitching = stitching
        self.progress = progress
        self.throttle = throttle
        self.prices = prices
        self.counters = Counters()
        self.stop = stop
        self._stopping = stopping
        self.executor = executor
        self.captions = captions  # srt or vtt: a caption file beside each row's audio
        self.checker = Checker(checks) if checks is not None and checks.enabled else None
        self.redo_flagged = redo_flagged and self.checker is not None
        self._takes: dict[str, _Take] = {}  # the rows being narrated again, by key
        self._redone: set[str] = set()  # rows narrated again by this run: once each
        self.provider_stop: RunStop | None = None
        self._in_flight: set[str] = set()
        self._assemblies: dict[str, Assembly] = {}
        self._waiters: dict[str, asyncio.Event] = {}  # rows in flight whose request copies wait for, by key
        self._no_answers = 0
        self._no_answer_since: float | None = None
        self.missing_models = MissingModels()

    @property
    def stopping(self) -> bool:
        return self._stopping()

    async def _in_thread(self, fn: Callable[..., _T], *args: object) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def __call__(self, item: WorkItem) -> None:
        """One work item, whatever happens to it; only a HaltError leaves."""
        try:
            await self._handle(item)
        except Exception as exc:
            fault = classify(exc, self._where(row_of(item).relpath))
            if isinstance(fault, HaltError):
                raise fault from exc
            await self._unforeseen(item, fault)

    async def _unforeseen(self, item: WorkItem, fault: SpeechError) -> None:
        """A fault none of the row's own paths recorded: record it here, so the row is retried next run."""
        log.error("row_fault", row=row_of(item).number, id=row_of(item).id, error=fault.message)
        try:
            if isinstance(item, ChunkJob):
                await self._chunk_settled(item, fault, 0)
            else:
                self._row_failed(row_of(item), fault, attempts=0, retryable=True)
        except Exception as again:
            raise HaltError(f"cannot record the failure of row {row_of(item).number}: {again}") from again

    async def _handle(self, item: WorkItem) -> None:
        if isinstance(item, ChunkJob):
            await self._narrate_chunk(item)
        elif isinstance(item, Assembly):
            await self._finish(item)
        elif isinstance(item, PassedOver):
            self._row_failed(item.row, RejectedError(item.reason), attempts=0, retryable=True)
        elif isinstance(item, Unreadable):
            self._row_failed(item.row, RejectedError(item.reason), attempts=0, retryable=False)
        elif (row := row_of(item)).key in self._in_flight or (row.id is None and row.output is None
                                                              and self._already_done(row)):
            return  # an identical row without id: one file serves both
        else:
            self._in_flight.add(row.key)
            try:
                await (self._copy(item) if isinstance(item, Copy) else self._narrate_row(row))
            finally:
                self._in_flight.discard(row.key)
                self._release(row.key)

    def _where(self, relpath: str) -> str:
        return f"{str(self.folder).rstrip('/')}/{relpath}"

    async def _copy(self, copy: Copy) -> None:
        """A row whose request another row makes: once that row has settled, its file copied, or its
        failure shared; should it have no file for this request after all, the row's own work."""
        row = copy.row
        while self._busy(copy.source):
            await self._waiters.setdefault(copy.source, asyncio.Event()).wait()
        entry = self.ledger.get(copy.source)
        if entry is not None and entry["request"] != row.request:
            entry = None  # the source row now answers another request (its text edited since the plan)
        if entry is not None and entry["status"] == "done" and self.folder.has(entry["path"], entry["bytes"]):
            published = await self._in_thread(self.folder.copy, entry["path"], row.relpath, entry["bytes"],
                                             entry["sha256"])
            if self.captions is not None:
                await self._captioned(row, entry["duration_s"] or 0.0)
            self._row_copied(row, copy.source, entry, published)
            return
        if self.stopping:
            return  # the source was left for the next run: so is its copy
        if entry is not None and copy.fresh and entry["status"] == "failed":
            self._row_failed(row, SpeechError(entry["error"] or "failed", entry["http_status"]), 0,
                             retryable=bool(entry["retryable"]), chunks=entry["chunks"], copy_of=copy.source,
                             where=f"the same request as row {entry['row_number']} ({copy.source}), which failed: ")
            return
        for work in copy.work:
            await (self._narrate_row(work) if isinstance(work, Row) else self._handle(work))

    def _busy(self, key: str) -> bool:
        """Whether this run is narrating row `key` now."""
        assembly = self._assemblies.get(key)
        return key in self._in_flight or (assembly is not None and not assembly.abandoned)

    def _release(self, key: str) -> None:
        """Row `key` has settled (or was left for the next run): its copies go on."""
        if (waiting := self._waiters.pop(key, None)) is not None:
            waiting.set()

    def _already_done(self, row: Row) -> bool:
        """Done since the feed planned it: by an identical row without id earlier in this run (a
        flagged row due to be narrated again is not done, until this run has narrated it again)."""
        entry = self.ledger.lookup(row.key)
        return (entry is not None and entry.status == "done" and not needs_work(row, entry, self.folder, False)
                and not self._redo_due(row))

    def _redo_due(self, row: Row) -> bool:
        if not self.redo_flagged or row.key in self._redone:
            return False
        assert self.checker is not None
        verdict = self.ledger.checked(row.key)
        return verdict is not None and bool(verdict["flagged"]) and verdict["redos"] < self.checker.bounds.max_redo

    def _check(self, row: Row, text: str) -> _Check | None:
        """What the row's file is checked against; with --redo-flagged, for a row whose file in place
        is flagged, the take kept so far, noted until the row ends."""
        if self.checker is None:
            return None
        kept = None
        if self.redo_flagged:
            entry = self.ledger.lookup(row.key)
            record = self.ledger.checked(row.key) if entry is not None and entry.status == "done" and \
                not needs_work(row, entry, self.folder, False) else None
            if record is not None and record["flagged"]:
                kept = self._takes[row.key] = _Take(record, self.checker.recorded(record, text))
                self._redone.add(row.key)
        return _Check(text, row.language, kept)

    async def _narrate_row(self, row: Row) -> None:
        spoken = row.spoken
        request = SpeechRequest(row.model, spoken, row.voice, wire_format(row.format), row.speed, row.provider_options)
        attempts = [0]
        check = self._check(row, spoken)
        try:
            outcome = await self._request(request, row.format, row.relpath, row.tags, row, attempts, check=check,
                                          shape=row.shape)
            if self.captions is not None and outcome.published is not None:
                await self._captioned(row, outcome.info.duration_s or 0.0)
        except _Stopped:
            self._takes.pop(row.key, None)
            return
        except SpeechError as exc:
            self._row_failed(row, exc, attempts[0], retryable=retried_next_run(exc, self.policy.statuses))
            self.progress.advance(len(spoken))
            return
        if outcome.published is None:
            assert outcome.verdict is not None
            self._kept(row, outcome.verdict)
        else:
            self._row_done(row, outcome.generation_id, outcome.published, outcome.info, outcome.attempts,
                           outcome.latency_s, chunks=None, verdict=outcome.verdict)
        self.progress.advance(len(spoken))

    async def _narrate_chunk(self, job: ChunkJob) -> None:
        assembly, chunk = job.assembly, job.assembly.chunks[job.index]
        if not self._claim(assembly):
            return
        row = assembly.row
        fingerprint = row.chunk_fingerprint(chunk.text, chunk.voice)
        fmt = wire_format(row.format)
        request = SpeechRequest(row.model, chunk.text, chunk.voice or row.voice, fmt, row.speed, row.provider_options)
        attempts = [0]
        try:
            outcome = await self._request(request, fmt, chunk_path(fingerprint, fmt), {}, row, attempts,
                                          chunk=f"{job.index + 1}/{len(assembly.chunks)}", chunk_index=job.index)
        except _Stopped:
            assembly.abandoned = True
            self._release(row.key)
            return
        except SpeechError as exc:
            await self._chunk_settled(job, exc, attempts[0])
            return
        assembly.attempts += outcome.attempts
        self.counters.chunks += 1
        info, published = outcome.info, outcome.published
        assert published is not None  # a chunk is published as it lands: its row's file is checked
        self.ledger.record_chunk_done(row, job.index, chunk.text, _stored(chunk_path(fingerprint, fmt), published, info),
                                      outcome.attempts, outcome.latency_s, outcome.generation_id, chunk.voice)
        assembly.parts[job.index] = Part(published.path, chunk.paragraph_before, info.sample_rate, info.channels,
                                         chunk.pause)
        self.progress.advance(len(chunk.text))
        await self._settle(assembly)

    async def _chunk_settled(self, job: ChunkJob, exc: SpeechError, attempts: int) -> None:
        """A chunk that failed: recorded, and its row fails once every chunk has settled."""
        assembly, chunk, row = job.assembly, job.assembly.chunks[job.index], job.assembly.row
        assembly.attempts += attempts
        if isinstance(exc, RunStop) or (self.stopping and is_transient(exc, self.policy.statuses)):
            assembly.abandoned = True
            self._release(row.key)
            self._row_failed(row, exc, assembly.attempts, retryable=True)  # stops the run on 401/402
            return
        self.ledger.record_chunk_failed(row, job.index, chunk.text, exc, attempts,
                                        retryable=retried_next_run(exc, self.policy.statuses), voice=chunk.voice)
        if assembly.failure is None:
            assembly.failure = (job.index, exc)
        self.progress.advance(len(chunk.text))
        await self._settle(assembly)

    async def _settle(self, assembly: Assembly) -> None:
        """One more chunk of the row has settled; after the last, the row is finished."""
        assembly.remaining -= 1
        if assembly.remaining == 0:
            try:
                await self._finish(assembly)
            finally:
                self._assemblies.pop(assembly.row.key, None)
                self._release(assembly.row.key)

    def _claim(self, assembly: Assembly) -> bool:
        """Whether this assembly narrates its row: an identical row without id, split the same way, is
        narrated once, by whichever assembly came first, and the other is dropped."""
        owner = self._assemblies.get(assembly.row.key)
        if owner is None:
            if self._already_done(assembly.row):
                return False
            self._assemblies[assembly.row.key] = owner = assembly
        return owner is assembly

    async def _finish(self, assembly: Assembly) -> None:
        """All chunks have settled: stitch them into the row's file, or record why not."""
        row = assembly.row
        if assembly.abandoned:
            return  # the next run finds the chunks already on disk and asks only for the rest
        check = self._check(row, " ".join(chunk.text for chunk in assembly.chunks))
        # Stopping (a signal, --max-runtime, 401/402) does not hold back a row whose chunks all came
        # back: stitching them is local work, and the audio is paid for.
        if assembly.failure is not None:
            index, exc = assembly.failure
            self._row_failed(row, exc, assembly.attempts, retryable=retried_next_run(exc, self.policy.statuses),
                             chunks=len(assembly.chunks), where=f"chunk {index + 1} of {len(assembly.chunks)}: ")
            return
        parts = [p for p in assembly.parts if p is not None]
        try:
            partial, f = self.folder.open_partial()
            info, published, verdict = await self._in_thread(self._stitch, assembly, parts, partial, f, check)
        except FileNotFoundError as exc:  # a chunk file removed since the run planned: ask for it again
            self._row_failed(row, TransportError(f"chunk file gone: {exc.filename}"), assembly.attempts,
                             retryable=True, chunks=len(assembly.chunks))
            return
        except Exception as exc:
            fault = classify(exc, self._where(row.relpath))
            if isinstance(fault, HaltError):
                raise fault from exc
            self._row_failed(row, fault, assembly.attempts, retryable=retried_next_run(fault, self.policy.statuses),
                             chunks=len(assembly.chunks))
            return
        if published is None:
            assert verdict is not None
            self._kept(row, verdict)
            return
        self._row_done(row, None, published, info, assembly.attempts,
                       round(time.monotonic() - assembly.started, 3), chunks=len(assembly.chunks), verdict=verdict)

    def _stitch(self, assembly: Assembly, parts: list[Part], partial: Path, f: BinaryIO,
                check: _Check | None) -> tuple[AudioInfo, Published | None, Verdict | None]:
        row = assembly.row
        stitched: Stitched
        try:
            stitched = stitch(parts, row.format, f, self.stitching.sentence_gap, self.stitching.paragraph_gap)
            info = self._conformed(f, row.format, stitched.info, row.shape)
            write_tags(f, row.format, row.tags)
            verdict = self._checked(f, row.format, info, check)
            if verdict is not None and not self._better(verdict, check):
                self.folder.discard(partial, f)
                return info, None, verdict
            published = self.folder.publish(partial, f, row.relpath)
        except BaseException:
            self.folder.discard(partial, f)
            raise
        if self.captions is not None:
            words = [chunk.caption or chunk.text for chunk in assembly.chunks]
            self._caption(row, [(w, a, b) for w, (a, b) in zip(words, stitched.spans, strict=True)],
                          info.duration_s or 0.0)
        return info, published, verdict

    @staticmethod
    def _conformed(f: BinaryIO, fmt: str, info: AudioInfo, shape: Output | None) -> AudioInfo:
        """A row's file, written whole, made into its format at its [output] shape (a chunk, of no
        shape, stays as it was asked for): what it holds then."""
        return conform(f, fmt, info, shape) if shape is not None and converts(fmt, shape) else info

    def _checked(self, f: BinaryIO, fmt: str, info: AudioInfo, check: _Check | None) -> Verdict | None:
        """The audio checks' verdict on a row's file, written whole and not yet published."""
        if check is None:
            return None
        assert self.checker is not None
        return self.checker.check(f, fmt, info, check.text, check.language)

    @staticmethod
    def _better(verdict: Verdict, check: _Check | None) -> bool:
        """Whether a new take is published: always, but in place of a flagged take only when better."""
        return check is None or check.kept is None or verdict.replaces(check.kept.verdict)

    async def _captioned(self, row: Row, duration: float) -> None:
        """The captions of a row narrated in one request: its words over the whole file."""
        try:
            await self._in_thread(self._caption, row, [(row.text, 0.0, duration)], duration)
        except Exception as exc:
            raise classify(exc, self._where(row.relpath)) from exc

    def _caption(self, row: Row, chunks: list[tuple[str, float, float]], duration: float) -> None:
        """Write the captions beside the row's audio, through the same storage: blocking, so in a thread."""
        assert self.captions is not None
        partial, f = self.folder.open_partial()
        try:
            f.write(render(cues(chunks, duration), self.captions).encode())
            self.folder.publish(partial, f, caption_path(row.relpath, self.captions))
        except BaseException:
            self.folder.discard(partial, f)
            raise

    async def _request(
        self, request: SpeechRequest, fmt: str, relpath: str, tags: dict[str, str], row: Row, attempts: list[int],
        chunk: str | None = None, chunk_index: int | None = None, check: _Check | None = None,
        shape: Output | None = None,
    ) -> _Outcome:
        """One request with the retry policy; `attempts` counts as it goes, for the failure record.
        `shape`: a row's [output], which its file is made into as it lands."""
        self.missing_models.refuse(request.model)  # not even a turn under the rate limit
        started = time.monotonic()
        remote = not is_local(request.model)
        async for attempt in build_retrying(self.policy, lambda: self.stopping, self._before_retry(row, chunk)):
            with attempt:
                # The throttle's slot covers the request, its body and its landing on disk: audio paid
                # for is in flight until the ledger can record it, so a kill -9 pays again for at most
                # `concurrency` rows, however fast the answers come.
                async with self.throttle.slot() if remote else contextlib.nullcontext() as ticket:
                    if self.stopping:
                        raise _Stopped
                    self.missing_models.refuse(request.model)  # found missing while this one waited
                    attempts[0] += 1
                    self.counters.requests += 1
                    try:
                        body = await self._recorded(request, fmt, row, chunk_index, ticket)
                    except HTTPStatusError as exc:
                        self._answered()
                        if ticket is not None and exc.status == 429:
                            self._rate_limited(exc, ticket)
                        if exc.status == 404 and self.missing_models.not_found(request.model, exc.message):
                            log.warning("model_not_found", model=request.model, message=f"the provider has no model "
                                        f"{request.model} (404, {NOT_FOUND_AFTER} times): its other rows fail unsent")
                        raise
                    except NoAnswerError as exc:
                        self._not_answered(exc)
                        raise
                    except (SpeechError, _Stopped):
                        raise
                    except Exception as exc:
                        raise classify(exc, self._where(relpath)) from exc
                    self.missing_models.succeeded(request.model)
                    if ticket is not None:
                        self._answered()
                        self.throttle.succeeded(ticket)
                    self._spent(request)
                    try:
                        info, published, verdict = await self._in_thread(self._publish, body, relpath, fmt, tags, check,
                                                                         shape)
                    except Exception as exc:
                        raise classify(exc, self._where(relpath)) from exc
        return _Outcome(body.generation_id, published, info, attempts[0], round(time.monotonic() - started, 3),
                        verdict)

    async def _recorded(self, request: SpeechRequest, fmt: str, row: Row, chunk_index: int | None,
                        ticket: Ticket | None) -> _Body:
        """`_receive`, and a row of the ledger's attempts however it ends, with the throttle's limits
        as they were when it went out: what `batchtts report` draws."""
        limits = (self.throttle.limit, self.throttle.rate) if ticket is not None else (None, None)
        started, clock = time.time(), time.monotonic()
        status: int | str = 200
        received = retry_after = cost = None
        try:
            body = await self._receive(request, fmt)
            received, cost = body.writer.received, self.prices.cost(request.model, len(request.input))
            return body
        except BaseException as exc:
            status, retry_after = _settled_as(exc)
            raise
        finally:
            self.ledger.record_attempt(Attempt(started, round(time.monotonic() - clock, 4), row.number, row.key,
                                               chunk_index, status, received, len(request.input), retry_after, cost,
                                               *limits))

    def _rate_limited(self, exc: HTTPStatusError, ticket: Ticket) -> None:
        """A 429: the throttle holds or slows down, unless the wait is longer than the run should
        sleep (a reset hours away, a spent quota): then the run stops and the rows stay pending."""
        hint = exc.hint
        quota = _QUOTA.search(exc.message) is not None
        if (hint.wait is not None and hint.wait > self.policy.max_wait) or (quota and hint.wait is None):
            resets_at = None if hint.wait is None else time.time() + hint.wait
            when = "at a time it did not say" if hint.wait is None else f"in {_duration(hint.wait)}"
            raise RateLimitStopError(
                f"{exc.message}: the provider's limit resets {when}, later than the run waits "
                f"(--max-wait {_duration(self.policy.max_wait)})", resets_at,
            ) from exc
        self.throttle.rate_limited(ticket, hint)

    def _answered(self) -> None:
        self._no_answers, self._no_answer_since = 0, None

    def _not_answered(self, exc: NoAnswerError) -> None:
        """No answer at all: after a handful in a row, across rows and seconds, the provider is not
        there (a wrong URL, no network), and every row would spend its attempts finding that out."""
        now = time.monotonic()
        if self._no_answer_since is None:
            self._no_answer_since = now
        self._no_answers += 1
        if self._no_answers >= _UNREACHABLE_AFTER and now - self._no_answer_since >= _UNREACHABLE_SECONDS:
            raise UnreachableError(f"cannot reach the provider after {self._no_answers} tries in "
                                   f"{now - self._no_answer_since:.0f} s: {exc.message}") from exc

    def _spent(self, request: SpeechRequest) -> None:
        """A request answered with audio: its characters count toward the running estimate."""
        characters = len(request.input)
        if is_local(request.model):
            self.counters.local_characters += characters
            return
        cost = self.prices.cost(request.model, characters)
        self.counters.characters_sent += characters
        if cost is None:
            self.counters.unpriced_characters += characters
            return
        self.counters.cost_usd += cost
        self.progress.spent(cost)

    async def _receive(self, request: SpeechRequest, fmt: str) -> _Body:
        """Stream one answer into a partial file; a body cut short, empty or not audio is a failure."""
        async with self.provider.speak(request) as audio:
            partial, f = self.folder.open_partial()
            writer: AudioWriter | None = None
            try:
                writer = AudioWriter(f, fmt, audio.content_type)
                async for chunk in audio.chunks():
                    writer.write(chunk)
                if audio.content_length is not None and writer.received != audio.content_length:
                    raise TransportError(f"body cut short: {writer.received} of {audio.content_length} bytes")
            except BaseException:
                if writer is not None:
                    writer.close()
                self.folder.discard(partial, f)
                raise
        return _Body(audio.generation_id, writer, partial, f)

    def _publish(self, body: _Body, relpath: str, fmt: str, tags: dict[str, str], check: _Check | None,
                 shape: Output | None) -> tuple[AudioInfo, Published | None, Verdict | None]:
        """Check, convert, tag, measure, fsync and rename: blocking, so it runs in a thread. Once it
        starts, the file either lands whole or stays partial, whatever happens to the run meanwhile; a
        redo take no better than the flagged file kept is thrown away."""
        try:
            info = self._conformed(body.file, fmt, body.writer.finish(), shape)
            write_tags(body.file, fmt, tags)
            verdict = self._checked(body.file, fmt, info, check)
            if verdict is not None and not self._better(verdict, check):
                self.folder.discard(body.partial, body.file)
                return info, None, verdict
            return info, self.folder.publish(body.partial, body.file, relpath), verdict
        except BaseException:
            body.writer.close()
            self.folder.discard(body.partial, body.file)
            raise

    def _before_retry(self, row: Row, chunk: str | None) -> Callable[[RetryCallState], None]:
        def hook(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            self.counters.retries += 1
            self.progress.retried()
            log.warning(
                "retry", row=row.number, id=row.id, **({"chunk": chunk} if chunk else {}), attempt=state.attempt_number,
                status=getattr(exc, "status", None), error=getattr(exc, "message", str(exc)), wait_s=round(wait, 3),
            )
        return hook

    def _row_done(self, row: Row, generation_id: str | None, published: Published, info: AudioInfo,
                  attempts: int, latency_s: float, chunks: int | None, verdict: Verdict | None = None) -> None:
        self.counters.done += 1
        self.counters.bytes += published.bytes
        self.counters.audio_s += info.duration_s or 0.0
        self.counters.characters += len(row.text)
        self.ledger.record_done(row, _stored(row.relpath, published, info), attempts, latency_s, generation_id, chunks)
        if verdict is not None:
            redo = self._takes.pop(row.key, None) is not None
            self.ledger.record_check(row, published.sha256, verdict.record(), redo=redo)
            self._counted(row, verdict, redo, replaced=redo)
        self.progress.row_finished(ok=True)

    def _row_copied(self, row: Row, source: str, entry: dict[str, Any], published: Published) -> None:
        self.counters.done += 1
        self.counters.copied += 1
        self.counters.requests_saved += entry["chunks"] or 1
        self.counters.bytes += published.bytes
        self.counters.audio_s += entry["duration_s"] or 0.0
        self.counters.characters += len(row.text)
        audio = Stored(row.relpath, published.bytes, published.sha256, entry["sample_rate"], entry["channels"],
                       entry["duration_s"])
        self.ledger.record_copy(row, audio, source, entry["chunks"])
        self.progress.row_finished(ok=True)

    def _kept(self, row: Row, verdict: Verdict) -> None:
        """A flagged row narrated again whose new take is no better: the file kept stays, as it is
        recorded, and the take counts against the row's redos."""
        take = self._takes.pop(row.key)
        self.ledger.record_check(row, take.record["sha256"], take.verdict.record(), redo=True)
        log.info("redo_kept", row=row.number, id=row.id, kept=list(take.verdict.reasons), new=list(verdict.reasons))
        self._counted(row, take.verdict, redo=True, replaced=False)
        self.progress.row_finished(ok=True)

    def _counted(self, row: Row, verdict: Verdict, redo: bool, replaced: bool) -> None:
        self.counters.checked += 1
        self.counters.redone += redo
        self.counters.replaced += replaced
        if verdict.flagged:
            self.counters.flagged += 1
            log.warning("flagged", row=row.number, id=row.id, reasons=list(verdict.reasons))

    def _row_failed(self, row: Row, exc: SpeechError, attempts: int, retryable: bool, chunks: int | None = None,
                    where: str = "", copy_of: str | None = None) -> None:
        if isinstance(exc, RunStop):
            if self.provider_stop is None:
                self.provider_stop = exc
                log.error("abort", row=row.number, id=row.id, status=exc.status, error=exc.message, advice=exc.advice)
                self.stop(str(exc))
            return
        if retryable and self.stopping:
            return  # interrupted mid-retry: the next run picks the row up as if never tried
        if self._takes.pop(row.key, None) is not None:
            log.warning("redo_failed", row=row.number, id=row.id, error=where + exc.message,
                        message="the flagged file stays, as it is recorded")
            self.progress.row_finished(ok=False)
            return
        self.counters.failed += 1
        self.ledger.record_failed(row, exc, attempts, retryable, chunks, where, copy_of)
        log.error("row_failed", row=row.number, id=row.id, status=exc.status, error=where + exc.message,
                  attempts=attempts, will_retry_on_rerun=retryable)
        self.progress.row_finished(ok=False)


def _settled_as(exc: BaseException) -> tuple[int | str, float | None]:
    """An attempt's status as the ledger keeps it, and the wait its answer asked for."""
    if isinstance(exc, HTTPStatusError):
        return exc.status or 0, exc.hint.wait
    if isinstance(exc, NoAnswerError):
        return "no-answer", None
    if isinstance(exc, TransportError):
        return "transport", None
    if isinstance(exc, RejectedError):
        return "rejected", None
    return "cancelled" if isinstance(exc, asyncio.CancelledError) else "error", None


def _stored(relpath: str, published: Published, info: AudioInfo) -> Stored:
    return Stored(relpath, published.bytes, published.sha256, info.sample_rate, info.channels, info.duration_s)


def _duration(seconds: float) -> str:
    """90 s, 12 min, 2 h 5 min: how long a wait is, as a person reads it."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds // 3600:.0f} h {seconds % 3600 / 60:.0f} min"
