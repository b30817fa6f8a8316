"""Narrating one row: request it with retries, stream the audio to disk, publish it, record it.

The order is what makes reruns safe: the file is renamed into place before the ledger says done,
and a row whose failure was transient is left for the next run instead of being marked failed.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import structlog
from tenacity import RetryCallState

from .audio import AudioInfo, AudioWriter, wire_format
from .config import RetryPolicy
from .errors import HTTPStatusError, ProviderStopError, SpeechError, TransportError
from .ledger import Ledger
from .manifest import Row
from .pool import Gate, WorkerPool
from .progress import Progress
from .providers import SpeechProvider, SpeechRequest
from .retry import build_retrying, is_transient
from .storage import OutputFolder, Published

log = structlog.get_logger("batchtts")


@dataclass
class Counters:
    done: int = 0
    failed: int = 0
    requests: int = 0
    retries: int = 0
    bytes: int = 0
    audio_s: float = 0.0
    characters: int = 0


class Narrator:
    def __init__(
        self,
        provider: SpeechProvider,
        folder: OutputFolder,
        ledger: Ledger,
        policy: RetryPolicy,
        progress: Progress,
    ) -> None:
        self.provider = provider
        self.folder = folder
        self.ledger = ledger
        self.policy = policy
        self.progress = progress
        self.gate = Gate()
        self.counters = Counters()
        self.pool: WorkerPool[Row] | None = None
        self.provider_stop: ProviderStopError | None = None
        self._in_flight: set[str] = set()

    @property
    def stopping(self) -> bool:
        return self.pool is not None and self.pool.stopping

    async def __call__(self, row: Row) -> None:
        if row.key in self._in_flight or (row.id is None and row.output is None and self._already_done(row)):
            return  # an identical row without id: one file serves both
        self._in_flight.add(row.key)
        try:
            await self._narrate(row)
        finally:
            self._in_flight.discard(row.key)

    def _already_done(self, row: Row) -> bool:
        entry = self.ledger.lookup(row.key)
        return entry is not None and entry.fingerprint == row.fingerprint and entry.status == "done"

    async def _narrate(self, row: Row) -> None:
        attempts = 0
        started = time.monotonic()
        request = SpeechRequest(row.model, row.text, row.voice, wire_format(row.format), row.speed, row.provider_options)
        try:
            async for attempt in build_retrying(self.policy, lambda: self.stopping, self._before_retry(row)):
                with attempt:
                    attempts += 1
                    await self.gate.wait()
                    if self.stopping:
                        return
                    self.counters.requests += 1
                    generation_id, published, info = await self._attempt(request, row)
        except SpeechError as exc:
            self._failed(row, exc, attempts)
            return
        self.counters.done += 1
        self.counters.bytes += published.bytes
        self.counters.audio_s += info.duration_s or 0.0
        self.counters.characters += len(row.text)
        self.ledger.record(
            key=row.key, row_number=row.number, fingerprint=row.fingerprint, status="done", retryable=0,
            path=row.relpath, bytes=published.bytes, sha256=published.sha256, sample_rate=info.sample_rate,
            channels=info.channels, duration_s=info.duration_s, model=row.model, voice=row.voice,
            format=row.format, characters=len(row.text), attempts=attempts, http_status=200, error=None,
            generation_id=generation_id, latency_s=round(time.monotonic() - started, 3),
        )
        self.progress.row_finished(ok=True, characters=len(row.text))

    async def _attempt(self, request: SpeechRequest, row: Row) -> tuple[str | None, Published, AudioInfo]:
        async with self.provider.speak(request) as audio:
            partial, f = self.folder.open_partial()
            writer: AudioWriter | None = None
            try:
                writer = AudioWriter(f, row.format, audio.content_type)
                async for chunk in audio.chunks():
                    writer.write(chunk)
                if audio.content_length is not None and writer.received != audio.content_length:
                    raise TransportError(f"body cut short: {writer.received} of {audio.content_length} bytes")
            except BaseException:
                if writer is not None:
                    writer.close()
                self.folder.discard(partial, f)
                raise
        # Not cancelled half-way: once publishing starts the file either lands whole or stays partial.
        info, published = await asyncio.to_thread(self._publish, writer, partial, f, row.relpath)
        return audio.generation_id, published, info

    def _publish(self, writer: AudioWriter, partial: Path, f: BinaryIO, relpath: str) -> tuple[AudioInfo, Published]:
        try:
            info = writer.finish()
            return info, self.folder.publish(partial, f, relpath)
        except BaseException:
            writer.close()
            self.folder.discard(partial, f)
            raise

    def _before_retry(self, row: Row):  # noqa: ANN202 - tenacity's hook type
        def hook(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            if isinstance(exc, HTTPStatusError) and exc.status == 429:
                self.gate.hold(wait)
            self.counters.retries += 1
            self.progress.retried()
            log.warning(
                "retry", row=row.number, id=row.id, attempt=state.attempt_number,
                status=getattr(exc, "status", None), error=getattr(exc, "message", str(exc)), wait_s=round(wait, 3),
            )
        return hook

    def _failed(self, row: Row, exc: SpeechError, attempts: int) -> None:
        if isinstance(exc, ProviderStopError):
            if self.provider_stop is None:
                self.provider_stop = exc
                log.error("abort", row=row.number, id=row.id, status=exc.status, error=exc.message, advice=exc.advice)
                if self.pool is not None:
                    self.pool.stop(f"HTTP {exc.status}: {exc.message}")
            return
        transient = is_transient(exc, self.policy.statuses)
        if transient and self.stopping:
            return  # interrupted mid-retry: the next run picks the row up as if never tried
        self.counters.failed += 1
        self.ledger.record(
            key=row.key, row_number=row.number, fingerprint=row.fingerprint, status="failed",
            retryable=int(transient), path=None, bytes=None, sha256=None, sample_rate=None, channels=None,
            duration_s=None, model=row.model, voice=row.voice, format=row.format, characters=len(row.text),
            attempts=attempts, http_status=exc.status, error=exc.message, generation_id=None, latency_s=None,
        )
        log.error("row_failed", row=row.number, id=row.id, status=exc.status, error=exc.message,
                  attempts=attempts, will_retry_on_rerun=transient)
        self.progress.row_finished(ok=False, characters=len(row.text))
