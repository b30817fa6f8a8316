"""Narrating the work the pool hands out: a row, or one chunk of a long row, requested with retries,
streamed to disk, published and recorded; and, once a long row's chunks are all there, its stitching.

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
from typing import BinaryIO, TypeVar

from tenacity import RetryCallState

from .audio import AudioInfo, AudioWriter, wire_format
from .budget import Prices
from .captions import caption_path, cues, render
from .config import RetryPolicy, Stitching
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
from .work import Assembly, ChunkJob, Part, PassedOver, Unreadable, WorkItem, row_of

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


@dataclass(frozen=True)
class _Outcome:
    generation_id: str | None
    published: Published
    info: AudioInfo
    attempts: int
    latency_s: float


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
        self.provider_stop: RunStop | None = None
        self._in_flight: set[str] = set()
        self._assemblies: dict[str, Assembly] = {}
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
        elif item.key in self._in_flight or (item.id is None and item.output is None and self._already_done(item)):
            return  # an identical row without id: one file serves both
        else:
            self._in_flight.add(item.key)
            try:
                await self._narrate_row(item)
            finally:
                self._in_flight.discard(item.key)

    def _where(self, relpath: str) -> str:
        return f"{str(self.folder).rstrip('/')}/{relpath}"

    def _already_done(self, row: Row) -> bool:
        """Done since the feed planned it: by an identical row without id earlier in this run."""
        entry = self.ledger.lookup(row.key)
        return entry is not None and entry.status == "done" and not needs_work(row, entry, self.folder, False)

    async def _narrate_row(self, row: Row) -> None:
        spoken = row.spoken
        request = SpeechRequest(row.model, spoken, row.voice, wire_format(row.format), row.speed, row.provider_options)
        attempts = [0]
        try:
            outcome = await self._request(request, row.format, row.relpath, row.tags, row, attempts)
            if self.captions is not None:
                await self._captioned(row, outcome.info.duration_s or 0.0)
        except _Stopped:
            return
        except SpeechError as exc:
            self._row_failed(row, exc, attempts[0], retryable=retried_next_run(exc, self.policy.statuses))
            self.progress.advance(len(spoken))
            return
        self._row_done(row, outcome.generation_id, outcome.published, outcome.info, outcome.attempts,
                       outcome.latency_s, chunks=None)
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
            return
        except SpeechError as exc:
            await self._chunk_settled(job, exc, attempts[0])
            return
        assembly.attempts += outcome.attempts
        self.counters.chunks += 1
        info, published = outcome.info, outcome.published
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
            info, published = await self._in_thread(self._stitch, assembly, parts, partial, f)
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
        self._row_done(row, None, published, info, assembly.attempts,
                       round(time.monotonic() - assembly.started, 3), chunks=len(assembly.chunks))

    def _stitch(self, assembly: Assembly, parts: list[Part], partial: Path, f: BinaryIO) -> tuple[AudioInfo, Published]:
        row = assembly.row
        stitched: Stitched
        try:
            stitched = stitch(parts, row.format, f, self.stitching.sentence_gap, self.stitching.paragraph_gap)
            write_tags(f, row.format, row.tags)
            published = self.folder.publish(partial, f, row.relpath)
        except BaseException:
            self.folder.discard(partial, f)
            raise
        if self.captions is not None:
            words = [chunk.caption or chunk.text for chunk in assembly.chunks]
            self._caption(row, [(w, a, b) for w, (a, b) in zip(words, stitched.spans, strict=True)],
                          stitched.info.duration_s or 0.0)
        return stitched.info, published

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
        chunk: str | None = None, chunk_index: int | None = None,
    ) -> _Outcome:
        """One request with the retry policy; `attempts` counts as it goes, for the failure record."""
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
                        info, published = await self._in_thread(self._publish, body, relpath, fmt, tags)
                    except Exception as exc:
                        raise classify(exc, self._where(relpath)) from exc
        return _Outcome(body.generation_id, published, info, attempts[0], round(time.monotonic() - started, 3))

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

    def _publish(self, body: _Body, relpath: str, fmt: str, tags: dict[str, str]) -> tuple[AudioInfo, Published]:
        """Check, tag, fsync and rename: blocking, so it runs in a thread. Once it starts, the file
        either lands whole or stays partial, whatever happens to the run meanwhile."""
        try:
            info = body.writer.finish()
            write_tags(body.file, fmt, tags)
            return info, self.folder.publish(body.partial, body.file, relpath)
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
                  attempts: int, latency_s: float, chunks: int | None) -> None:
        self.counters.done += 1
        self.counters.bytes += published.bytes
        self.counters.audio_s += info.duration_s or 0.0
        self.counters.characters += len(row.text)
        self.ledger.record_done(row, _stored(row.relpath, published, info), attempts, latency_s, generation_id, chunks)
        self.progress.row_finished(ok=True)

    def _row_failed(self, row: Row, exc: SpeechError, attempts: int, retryable: bool, chunks: int | None = None,
                    where: str = "") -> None:
        if isinstance(exc, RunStop):
            if self.provider_stop is None:
                self.provider_stop = exc
                log.error("abort", row=row.number, id=row.id, status=exc.status, error=exc.message, advice=exc.advice)
                self.stop(str(exc))
            return
        if retryable and self.stopping:
            return  # interrupted mid-retry: the next run picks the row up as if never tried
        self.counters.failed += 1
        self.ledger.record_failed(row, exc, attempts, retryable, chunks, where)
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
