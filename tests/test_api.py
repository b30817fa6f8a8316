"""The Python API, called as an application would: from the main thread, from a thread of its own,
inside a running event loop, with a provider of its own; status and export read the result back."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import wave
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import miniaudio
import pyarrow.parquet as pq
import pytest
import structlog
from conftest import write_csv

import batchtts
from batchtts.errors import EXIT_FAILED_ROWS, EXIT_OK, ManifestError, RejectedError, UsageError
from batchtts.lock import hold, lock_path
from batchtts.sharding import shard_of

TEXTS = ["The first line.", "The second line.", "The third line."]
RATE = 16000


def job(tmp_path: Path, model: str = "local/espeak-ng", **settings: object) -> batchtts.Job:
    manifest = write_csv(tmp_path / "m.csv", [{"id": f"r{i}", "text": t} for i, t in enumerate(TEXTS)])
    return batchtts.Job(manifest=manifest, out=tmp_path / "out",
                        defaults=batchtts.Defaults(model=model, voice="alloy", format="wav"), **settings)


def decoded_frames(path: Path) -> int:
    return miniaudio.decode_file(str(path)).num_frames


def test_run_from_the_main_thread_writes_nothing_to_stdout_or_stderr(tmp_path, capfd):
    structlog.reset_defaults()  # as in an application that never configured structlog
    result = batchtts.run(job(tmp_path))
    assert result.exit_code == EXIT_OK and result.counters.done == 3
    assert all(decoded_frames(tmp_path / "out" / f"r{i}.wav") > 0 for i in range(3))
    assert capfd.readouterr() == ("", "")


def test_unconfigured_the_events_go_to_the_standard_logger_named_batchtts(tmp_path, caplog):
    structlog.reset_defaults()
    with caplog.at_level(logging.INFO, logger="batchtts"):
        batchtts.run(job(tmp_path))
    events = [r.getMessage() for r in caplog.records if r.name == "batchtts"]
    assert any(e.startswith("event='start'") and "pending=3" in e for e in events)
    assert any(e.startswith("event='summary'") and "done=3" in e for e in events)


def test_run_from_a_thread_of_its_own(tmp_path):
    results: list[batchtts.RunResult] = []
    thread = threading.Thread(target=lambda: results.append(batchtts.run(job(tmp_path))))
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive() and results[0].exit_code == EXIT_OK and results[0].counters.done == 3


def test_arun_inside_a_running_loop_and_run_called_from_one(tmp_path):
    async def application() -> tuple[batchtts.RunResult, batchtts.RunResult]:
        ticks = 0

        async def heartbeat() -> None:  # the application's own work goes on while the run narrates
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        beating = asyncio.create_task(heartbeat())
        first = await batchtts.arun(job(tmp_path / "a"))
        beating.cancel()
        assert ticks > 1
        second = batchtts.run(job(tmp_path / "b"))  # a synchronous call from inside the loop: a thread of its own
        return first, second

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = asyncio.run(application())
    assert first.counters.done == 3 and second.counters.done == 3


def test_signals_are_refused_where_they_cannot_be_installed(tmp_path):
    async def inside() -> None:
        with pytest.raises(UsageError, match="signals=True needs run"):
            batchtts.run(job(tmp_path), signals=True)

    asyncio.run(inside())


@dataclass
class _Audio:
    """What a provider hands back: here, 16-bit mono PCM at 16 kHz."""

    body: bytes
    content_type: str = f"audio/pcm;rate={RATE};channels=1"
    generation_id: str | None = "gen-custom"

    @property
    def content_length(self) -> int:
        return len(self.body)

    async def chunks(self) -> AsyncIterator[bytes]:
        for start in range(0, len(self.body), 1000):
            yield self.body[start:start + 1000]


class Beeps:
    """A provider of its own: a tenth of a second of sound per word; it refuses texts with 'third'."""

    def __init__(self) -> None:
        self.requests: list[batchtts.SpeechRequest] = []
        self.closed = False

    @asynccontextmanager
    async def speak(self, request: batchtts.SpeechRequest) -> AsyncIterator[_Audio]:
        self.requests.append(request)
        if "third" in request.input:
            raise RejectedError("this provider does not say 'third'", status=400)
        words = len(request.input.split())
        yield _Audio(b"\x10\x00" * (RATE // 10) * words)

    async def aclose(self) -> None:
        self.closed = True


def test_a_provider_of_its_own_plugs_in_and_status_and_export_read_the_run_back(tmp_path):
    provider = Beeps()
    # The HTTP provider's settings point at a closed loopback port: nothing may ask it anything.
    the_job = job(tmp_path, model="acme/beeps", provider=batchtts.Provider(base_url="http://127.0.0.1:9/api/v1"))
    result = batchtts.run(the_job, provider)
    assert result.prices.source == "no prices used" and result.prices.list_error is None
    assert result.exit_code == EXIT_FAILED_ROWS and (result.counters.done, result.counters.failed) == (2, 1)
    assert provider.closed and [r.response_format for r in provider.requests] == ["pcm"] * 3  # wav is asked as pcm
    with wave.open(str(tmp_path / "out" / "r0.wav")) as w:  # "The first line." is three words
        assert (w.getframerate(), w.getnchannels(), w.getnframes()) == (RATE, 1, 3 * RATE // 10)

    report = batchtts.status([tmp_path / "out"])
    assert (report["total"], report["done"], report["failed"], report["pending"]) == (3, 2, 1, 0)
    assert report["failures"][0]["error"] == "this provider does not say 'third'"

    where, rows = batchtts.export([tmp_path / "out"], to=tmp_path / "results.parquet")
    table = pq.read_table(where).to_pylist()
    assert rows == 3 and [r["status"] for r in table] == ["done", "done", "failed"]
    assert [r["path"] for r in table][:2] == ["r0.wav", "r1.wav"]

    again = batchtts.run(the_job, provider)  # the refused row is not retried: a 400 is for good
    assert again.counters.done == 0 and len(provider.requests) == 3


def test_signals_need_the_main_thread_and_nothing_is_started_without_it(tmp_path):
    raised: list[BaseException] = []

    def elsewhere() -> None:
        try:
            batchtts.run(job(tmp_path), signals=True)
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join(timeout=60)
    assert isinstance(raised[0], UsageError) and "main thread" in str(raised[0])
    assert not (tmp_path / "out").exists()


def test_a_run_cancelled_while_it_plans_leaves_no_ledger_and_lets_go_of_the_lock(tmp_path):
    manifest = write_csv(tmp_path / "big.csv", [{"id": f"r{i}", "text": f"Line {i}."} for i in range(200_000)])
    the_job = batchtts.Job(manifest=manifest, out=tmp_path / "out",
                           defaults=batchtts.Defaults(model="local/espeak-ng", voice="alloy", format="wav"))

    async def cancelled_early() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(batchtts.arun(the_job), 0.3)

    asyncio.run(cancelled_early())
    assert not the_job.ledger_path.exists()  # planning stopped and undid itself before the call returned
    with hold(lock_path(the_job.ledger_path), tmp_path / "out"):
        pass  # free: no planning goes on behind the caller's back


def test_a_shard_is_not_held_up_by_another_shards_file_names(tmp_path):
    rows = [{"id": f"r{i}", "text": f"Line {i}."} for i in range(12)]
    theirs = next(r["id"] for r in rows if shard_of(r["id"], 2) == 1)
    (tmp_path / "out" / f"{theirs}.wav").mkdir(parents=True)  # shard 1 will refuse this row; shard 0 never meets it
    mine = batchtts.Job(manifest=write_csv(tmp_path / "m.csv", rows), out=tmp_path / "out",
                        defaults=batchtts.Defaults(model="local/espeak-ng", voice="alloy", format="wav"),
                        shard=batchtts.Shard(0, 2), dry_run=True)
    assert batchtts.run(mine).exit_code == EXIT_OK
    with pytest.raises(ManifestError, match="folder"):
        batchtts.run(dataclasses.replace(mine, shard=batchtts.Shard(1, 2)))
