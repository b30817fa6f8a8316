"""Narrow unit tests: header parsing, the retry policy, job files, storage safety, the ledger."""

from __future__ import annotations

import array
import asyncio
import os
import sqlite3
import time
from email.utils import formatdate
from pathlib import Path

import httpx
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from batchtts.client import HTTPSpeechClient, error_message, rate_hint
from batchtts.config import DEFAULT_RETRY_STATUSES, Provider, RetryPolicy, Timeouts, load_job
from batchtts.errors import (
    FolderLockedError,
    HTTPStatusError,
    ProviderStopError,
    TransportError,
    UsageError,
)
from batchtts.ledger import TALLIES, VERSION, Ledger, Stored
from batchtts.manifest import Row
from batchtts.names import MAX_NAME, safe_name, unsafe_reason
from batchtts.providers import SpeechRequest
from batchtts.retry import HINT_JITTER, build_retrying, is_transient
from batchtts.storage import OutputFolder


def test_retry_after_in_seconds_dates_and_reset_milliseconds():
    now = 1_700_000_000.0
    assert rate_hint(httpx.Headers({"Retry-After": "7"}), now).wait == 7
    assert rate_hint(httpx.Headers({"Retry-After": "0.25"}), now).wait == 0.25
    date = formatdate(now + 30, usegmt=True)
    assert rate_hint(httpx.Headers({"Retry-After": date}), now).wait == pytest.approx(30, abs=1)
    reset_ms = str(int((now + 2.5) * 1000))
    assert rate_hint(httpx.Headers({"X-RateLimit-Reset": reset_ms}), now).wait == pytest.approx(2.5)
    both = httpx.Headers({"Retry-After": "1", "X-RateLimit-Reset": reset_ms})
    assert rate_hint(both, now).wait == pytest.approx(2.5)
    assert rate_hint(httpx.Headers({"X-RateLimit-Reset": str(int((now - 5) * 1000))}), now).wait == 0
    assert rate_hint(httpx.Headers({"Retry-After": "soon"}), now).wait is None
    assert rate_hint(httpx.Headers(), now).wait is None


def test_error_message_takes_the_providers_words():
    body = b'{"error": {"code": 502, "message": "Provider returned error", "metadata": {"raw": "upstream 500"}}}'
    assert error_message(body, 502) == "Provider returned error (upstream 500)"
    assert error_message(b"<html>gateway</html>", 502) == "<html>gateway</html>"
    assert error_message(b"", 503) == "Service Unavailable"


def test_transient_means_listed_statuses_and_transport_faults_never_401_402():
    statuses = RetryPolicy().statuses
    assert is_transient(TransportError("dropped"), statuses)
    assert all(is_transient(HTTPStatusError("x", s), statuses) for s in DEFAULT_RETRY_STATUSES)
    assert not any(is_transient(HTTPStatusError("x", s), statuses) for s in (400, 404, 500))
    assert not is_transient(ProviderStopError("x", 402), statuses)


def test_retrying_honours_the_providers_wait_up_to_backoff_max_and_stops_after_max_attempts():
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async def scenario(status: int, retry_after: float) -> int:
        calls = 0
        policy = RetryPolicy(max_attempts=3, backoff_initial=0.5, backoff_max=1)
        retrying = build_retrying(policy, lambda: calls >= 10, sleep=sleep)
        with pytest.raises(HTTPStatusError):
            async for attempt in retrying:
                with attempt:
                    calls += 1
                    raise HTTPStatusError("try later", status, retry_after=retry_after)
        return calls

    assert asyncio.run(scenario(503, 0.5)) == 3
    assert len(slept) == 2 and all(0.5 <= s <= 0.5 * (1 + HINT_JITTER) for s in slept)
    slept.clear()
    assert asyncio.run(scenario(503, 4.0)) == 3
    assert slept == [1, 1]  # a provider's wait, but no longer than backoff_max
    slept.clear()
    # A 429 comes straight back (the throttle holds it as the provider said) and is no fault of the
    # row's: it does not use up the attempts; here the run's stopping ends it.
    assert asyncio.run(scenario(429, 4.0)) == 10
    assert all(s <= HINT_JITTER for s in slept)


def test_retrying_backs_off_with_full_jitter_under_the_cap():
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async def scenario() -> None:
        retrying = build_retrying(RetryPolicy(max_attempts=6, backoff_initial=1, backoff_max=3), lambda: False, sleep=sleep)
        with pytest.raises(TransportError):
            async for attempt in retrying:
                with attempt:
                    raise TransportError("dropped")

    asyncio.run(scenario())
    assert len(slept) == 5 and all(0 <= s <= 3 for s in slept)


def test_request_body_carries_optional_fields_only_when_set():
    assert SpeechRequest("m", "hi", "v", "pcm").to_json() == {"model": "m", "input": "hi", "voice": "v", "response_format": "pcm"}
    body = SpeechRequest("m", "hi", "v", "mp3", 1.5, {"openai": {"x": 1}}).to_json()
    assert body["speed"] == 1.5 and body["provider"] == {"options": {"openai": {"x": 1}}}


def test_http_client_sends_key_and_attribution_headers():
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"\x00\x00" * 10, headers={"content-type": "audio/pcm;rate=16000;channels=1"})

    async def scenario() -> None:
        client = HTTPSpeechClient(Provider(base_url="http://127.0.0.1:9/api/v1"), "k", Timeouts(), 4,
                                  transport=httpx.MockTransport(handler))
        async with client.speak(SpeechRequest("m", "hi", "v", "pcm")) as audio:
            assert audio.content_type.startswith("audio/pcm")
        await client.aclose()

    asyncio.run(scenario())
    request = seen[0]
    assert str(request.url) == "http://127.0.0.1:9/api/v1/audio/speech"
    assert request.headers["authorization"] == "Bearer k"
    assert request.headers["x-title"] == "batchtts" and request.headers["http-referer"]


def test_job_file_paths_are_relative_to_it_and_flags_override(tmp_path):
    job_file = tmp_path / "jobs" / "j.toml"
    job_file.parent.mkdir()
    job_file.write_text('manifest = "../m.csv"\nout = "../o"\nconcurrency = 3\n[defaults]\nvoice = "nova"\n[retry]\nstatuses = [429]\n')
    job = load_job(job_file, **{"defaults.model": "x", "concurrency": 9, "defaults.voice": None})
    assert job.manifest == tmp_path / "m.csv" and job.out == tmp_path / "o"
    assert (job.concurrency, job.defaults.voice, job.defaults.model, job.retry.statuses) == (9, "nova", "x", (429,))
    assert job.ledger_path == job.out / "ledger.sqlite"


def test_job_file_mistakes_are_usage_errors(tmp_path):
    bad = tmp_path / "j.toml"
    for text, expected in [("manifest = ", "not valid TOML"), ('manifest="m"\nout="o"\nconcurency=3', "unknown job setting"),
                           ('manifest="m"\nout="o"\n[retry]\ntries=3', "unknown key in [retry]"), ('out="o"', "no manifest")]:
        bad.write_text(text)
        with pytest.raises(UsageError, match=expected.replace("[", r"\[").replace("]", r"\]")):
            load_job(bad)


def test_shipped_job_files_load():
    for job_file in (Path(__file__).parent.parent / "jobs").glob("*.toml"):
        assert load_job(job_file).manifest.exists(), job_file


def test_names_are_refused_or_made_safe():
    assert unsafe_reason("a/../../b") and unsafe_reason("/abs") and unsafe_reason("C:x") and unsafe_reason("a\x00")
    assert unsafe_reason("..\\x") and unsafe_reason("ledger.sqlite", allow_folders=True)
    assert unsafe_reason("ledger-shard-0001-of-0004.sqlite-wal", allow_folders=True)
    assert unsafe_reason(".batchtts-partial/x", allow_folders=True)
    assert unsafe_reason("chapters/01", allow_folders=True) is None
    # mastered/ holds the mastered copies; a file of that name, or a folder of another, is the user's.
    assert unsafe_reason("Mastered/ch01", allow_folders=True)
    assert unsafe_reason("mastered", allow_folders=True) is None and unsafe_reason("mastered-takes/01", allow_folders=True) is None
    assert safe_name("plain-id_1.2") == "plain-id_1.2"
    assert safe_name("a b") != safe_name("a_b") and safe_name(".hidden").startswith("hidden-")
    assert len(safe_name("x" * 1000)) == MAX_NAME + 11  # the kept part, a dash, the hash


def test_the_lock_refuses_a_second_holder_of_the_same_ledger(tmp_path):
    folder = OutputFolder(tmp_path, tmp_path / "ledger.sqlite")
    with folder.lock():
        with pytest.raises(FolderLockedError, match=f"pid {os.getpid()}"):
            with OutputFolder(tmp_path, tmp_path / "ledger.sqlite").lock():
                pass
        with OutputFolder(tmp_path, tmp_path / "ledger-shard-0001-of-0002.sqlite").lock():
            pass  # another shard's ledger: shards share the folder
    with folder.lock():
        pass


def test_partial_files_never_appear_under_final_names(tmp_path):
    folder = OutputFolder(tmp_path, tmp_path / "ledger.sqlite")
    other_shard = OutputFolder(tmp_path, tmp_path / "ledger-shard-0001-of-0002.sqlite")
    theirs, g = other_shard.open_partial()
    partial, f = folder.open_partial()
    f.write(b"half a file")
    assert not list(tmp_path.glob("*.mp3"))
    assert folder.clean_partials() == 1 and not partial.exists()
    assert theirs.exists()  # a shard cleans up its own leftovers, never another's in-flight files
    partial, f = folder.open_partial()
    f.write(b"whole")
    published = folder.publish(partial, f, "sub/x.mp3")
    assert (tmp_path / "sub" / "x.mp3").read_bytes() == b"whole" and published.bytes == 5
    g.close()


def test_ledger_migrates_and_sums_attempts_per_fingerprint(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    row = Row(1, "a", "hello", "m", "v", "mp3", None, None, None, {})
    ledger.record_failed(row, TransportError("cut"), attempts=2, retryable=True)
    assert ledger.get("a")["retryable"] == 1 and ledger.get("a")["error"] == "cut"
    ledger.record_done(row, Stored("a.mp3", 3, "00", 24000, 1, 0.1), attempts=1, latency_s=0.2, generation_id="g")
    done = ledger.get("a")
    assert done["attempts"] == 3 and done["error"] is None and done["retryable"] == 0 and done["bytes"] == 3
    edited = Row(1, "a", "hello again", "m", "v", "mp3", None, None, None, {})
    ledger.record_done(edited, Stored("a.mp3", 4, "01", 24000, 1, 0.1), attempts=1, latency_s=0.2, generation_id="h")
    assert ledger.get("a")["attempts"] == 1 and ledger.get("a")["fingerprint"] == edited.fingerprint
    ledger.close()
    again = Ledger(tmp_path / "l.sqlite")
    assert again.db.execute("PRAGMA user_version").fetchone()[0] == VERSION
    assert again.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert again.lookup("a").fingerprint == edited.fingerprint
    again.close()


def test_an_exact_reset_holds_every_request_until_then():
    from batchtts.errors import RateHint
    from batchtts.throttle import Throttle, Ticket

    async def scenario() -> list[float]:
        throttle = Throttle(8)
        start = time.monotonic()  # before the 429 is taken in: the hold runs from a moment after this
        throttle.rate_limited(Ticket(time.monotonic(), 1), RateHint(wait=0.2, exact=True))

        async def request() -> float:
            async with throttle.slot():
                return time.monotonic() - start

        return list(await asyncio.gather(*(request() for _ in range(5))))

    assert all(t >= 0.2 for t in asyncio.run(scenario()))


def test_a_rounded_retry_after_is_probed_by_one_request_not_waited_out():
    from batchtts.errors import RateHint
    from batchtts.throttle import _FIRST_PROBE, Throttle, Ticket

    async def scenario() -> tuple[list[float], int]:
        throttle = Throttle(8)
        throttle.rate_limited(Ticket(time.monotonic(), 1), RateHint(wait=1.0, exact=False))
        start = time.monotonic()
        went: list[float] = []
        most_at_once = 0

        async def request() -> None:
            nonlocal most_at_once
            async with throttle.slot() as ticket:
                went.append(time.monotonic() - start)
                most_at_once = max(most_at_once, throttle.in_flight)
                await asyncio.sleep(0.01)
                throttle.succeeded(ticket)

        await asyncio.gather(*(request() for _ in range(6)))
        return went, most_at_once

    went, _ = asyncio.run(scenario())
    assert _FIRST_PROBE * 0.9 <= went[0] < 0.5  # the probe went long before the second Retry-After said
    assert all(t >= went[0] + 0.009 for t in went[1:])  # the others waited for the probe's answer
    assert max(went) < 0.5


def test_a_limit_on_requests_in_flight_is_told_from_a_rate_limit():
    from batchtts.errors import RateHint
    from batchtts.throttle import Throttle, Ticket

    clock = [1000.0]
    throttle = Throttle(64, clock=lambda: clock[0])
    for level in range(1, 13):  # slow start: every success lets one more go
        throttle.succeeded(Ticket(clock[0], level))
    throttle.rate_limited(Ticket(clock[0], 13), RateHint(wait=1.0))
    assert throttle.limit == 12 and throttle.learned is None and throttle.held_for == 0
    assert throttle.bound_by_concurrency


def test_a_rate_limit_paces_at_what_got_through_then_probes_upwards(monkeypatch):
    from batchtts.errors import RateHint
    from batchtts.throttle import _CUT, _FAST_GROWTH, _MARGIN, _MOST_GROWTH, _QUIET, _WINDOW, Throttle, Ticket, growth

    clock = [1000.0]
    throttle = Throttle(64, clock=lambda: clock[0])
    for _ in range(40):  # 40 successes a second, each with few in flight
        clock[0] += 0.025
        throttle.succeeded(Ticket(clock[0], 3))
    throttle.rate_limited(Ticket(clock[0], 2), RateHint(wait=0.02, exact=True))
    assert throttle.learned == pytest.approx(_MARGIN * 40, rel=0.05)
    assert throttle.limit == 64 and throttle.held_for == pytest.approx(0.02)
    first = throttle.learned
    throttle.rate_limited(Ticket(clock[0] - 0.01, 2), RateHint(wait=0.02, exact=True))  # sent before the cut
    assert throttle.learned == first
    for _ in range(24):  # 40 a second still get through
        clock[0] += 0.025
        throttle.succeeded(Ticket(clock[0], 3))
    assert throttle.learned == pytest.approx(first * _FAST_GROWTH)  # a rough first estimate grows fast
    clock[0] += 0.01
    throttle.rate_limited(Ticket(clock[0], 2), RateHint(wait=0.02, exact=True))
    assert throttle.learned == pytest.approx(first)  # back to the last rate that drew no 429
    clock[0] += 0.01
    throttle.rate_limited(Ticket(clock[0], 2), RateHint(wait=0.02, exact=True))
    assert throttle.learned == pytest.approx(first * _CUT)  # a step down: still above what got through
    for _ in range(20):  # then only 20 a second get through
        clock[0] += 0.05
        throttle.succeeded(Ticket(clock[0], 3))
    throttle.rate_limited(Ticket(clock[0], 2), RateHint(wait=0.02, exact=True))
    recent = sum(1 for t, _ in throttle._successes if t >= clock[0] - _WINDOW)
    assert throttle.learned == pytest.approx(_MARGIN * recent / _WINDOW)  # down to the goodput
    assert throttle.learned < first * _CUT * _CUT
    settled = throttle.learned
    clock[0] += 1.0
    throttle.succeeded(Ticket(clock[0], 2))
    assert throttle.learned == settled  # quiet for too short a while
    clock[0] += 2.5
    throttle.succeeded(Ticket(clock[0], 2))
    growing = 1.0 + 2.5 - _QUIET  # seconds since the last 429, less the quiet ones before any growth
    assert throttle.learned == pytest.approx(settled * growth(growing) ** growing, rel=0.01)
    assert growth(0.0) < growth(_QUIET) < growth(60.0) == 1 + _MOST_GROWTH  # the longer it stays quiet, the faster it grows


def test_the_request_rate_cap_paces_requests():
    from batchtts.throttle import Throttle

    async def scenario() -> float:
        throttle = Throttle(64, requests_per_minute=6000)  # 100 a second
        start = time.monotonic()

        async def request() -> None:
            async with throttle.slot():
                pass

        await asyncio.gather(*(request() for _ in range(31)))
        return time.monotonic() - start

    assert asyncio.run(scenario()) >= 0.29


def test_a_refused_connection_is_reported_as_such(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again at once: nothing listens there

    async def scenario() -> str:
        client = HTTPSpeechClient(Provider(base_url=f"http://127.0.0.1:{port}/api/v1"), "k", Timeouts(connect=2), 2)
        try:
            async with client.speak(SpeechRequest("m", "hi", "v", "pcm")):
                pass
        except TransportError as exc:
            return exc.message
        finally:
            await client.aclose()
        return "no error"

    assert asyncio.run(scenario()).startswith("cannot connect")


def test_audio_of_the_wrong_kind_or_shape_is_refused():
    import io

    from batchtts.audio import AudioWriter
    from batchtts.errors import RejectedError

    with pytest.raises(RejectedError, match="audio/mpeg"):
        AudioWriter(io.BytesIO(), "wav", "audio/mpeg")
    writer = AudioWriter(io.BytesIO(), "pcm", "audio/pcm;rate=16000;channels=2")
    writer.write(b"\x00" * 6)
    with pytest.raises(TransportError, match="mid-sample"):
        writer.finish()
    with pytest.raises(TransportError, match="empty body"):
        AudioWriter(io.BytesIO(), "mp3", "audio/mpeg").finish()
    with pytest.raises(TransportError, match="not valid mp3"):
        bad = AudioWriter(io.BytesIO(), "mp3", "audio/mpeg")
        bad.write(b"<html>not audio</html>" * 20)
        bad.finish()


@given(st.lists(st.integers(min_value=0, max_value=40), max_size=300))
def test_repeats_are_counted_alike_by_the_set_and_by_sorting(values):
    from collections import Counter

    from batchtts.manifest import _duplicates

    hashes = array.array("Q", values)
    repeats = {value for value, count in Counter(values).items() if count > 1}
    expected = sum(count - 1 for count in Counter(values).values())
    assert _duplicates(hashes, sort_from=len(values) + 1) == (repeats, expected)
    assert _duplicates(hashes, sort_from=0) == (repeats, expected)
    few, count = _duplicates(hashes, keep=1, sort_from=len(values) + 1)
    assert count == expected and len(few) == min(1, len(repeats)) and few <= repeats


def _scanned(ledger: Ledger) -> tuple[dict[str, tuple[int, int, float]], tuple[int, int, int], tuple[int, int],
                                      tuple[int, int]]:
    """What the rows and checks tables hold, summed over every row: what the tallies must say without
    the pass. A done row's file is checked by its own record of that file, or for a copy by the first
    record of the file it copies."""
    db = ledger.db
    totals = {s: (n, b or 0, d or 0.0) for s, n, b, d in
              db.execute("SELECT status, COUNT(*), SUM(bytes), SUM(duration_s) FROM rows GROUP BY status")}
    counts = db.execute("SELECT COUNT(*) FILTER (WHERE status = 'done'), COUNT(*) FILTER (WHERE status = 'failed'), "
                        "COUNT(*) FILTER (WHERE status = 'failed' AND retryable) FROM rows").fetchone()
    copies = db.execute("SELECT COUNT(*), TOTAL(COALESCE(chunks, 1)) FROM rows "
                        "WHERE status = 'done' AND copy_of IS NOT NULL").fetchone()
    checks = db.execute("SELECT rowid, key, sha256, flagged FROM checks ORDER BY rowid").fetchall()
    verdicts = []
    for key, sha, copy_of in db.execute("SELECT key, sha256, copy_of FROM rows WHERE status = 'done'"):
        own = [flagged for _, of, file, flagged in checks if of == key and file == sha]
        first = [flagged for _, _, file, flagged in checks if file == sha][:1] if copy_of is not None else []
        verdicts += (own or first)[:1]
    return totals, tuple(counts), (copies[0], int(copies[1])), (len(verdicts), sum(verdicts))


def _tallied(ledger: Ledger) -> tuple[dict[str, tuple[int, int, float]], tuple[int, int, int], tuple[int, int],
                                      tuple[int, int]]:
    totals = {s: (int(t["rows"]), int(t["bytes"]), t["duration_s"]) for s, t in ledger.totals().items()}
    checked, flagged, rows = ledger.flags()
    assert len(rows) == flagged
    return totals, ledger.counts(), ledger.copies(), (checked, flagged)


def _same(tallied: tuple, scanned: tuple) -> None:
    (totals, *rest), (want_totals, *want_rest) = tallied, scanned
    assert rest == want_rest
    assert totals.keys() == want_totals.keys()
    for status, (rows, size, seconds) in want_totals.items():
        assert totals[status][:2] == (rows, size)
        assert totals[status][2] == pytest.approx(seconds, abs=1e-6 * rows + 1e-9)


_RECORDS = st.lists(st.tuples(
    st.sampled_from(["done", "copy", "failed", "check", "delete", "resize", "refile"]), st.integers(0, 3),  # what, key
    st.integers(0, 2), st.floats(0, 3600, allow_nan=False), st.booleans(), st.none() | st.integers(1, 9),
), max_size=40)


@given(_RECORDS)
@example([("copy", 1, 0, 1.0, False, None), ("check", 0, 0, 0.0, True, None), ("check", 0, 1, 0.0, False, None)])
@example([("done", 0, 0, 1.0, False, None), ("check", 0, 0, 0.0, True, None), ("refile", 0, 1, 0.0, False, None)])
def test_the_tallies_say_what_a_pass_over_every_row_says(tmp_path_factory, records):
    """Status reads counts, sums and the checks' verdicts from the tallies kept as rows and checks are
    recorded; whatever is recorded, updated or deleted, in whatever order, they are what going over
    every row gives. Keys are one of four and files one of three, so that copies, checks and files meet."""
    ledger = Ledger(tmp_path_factory.mktemp("tallies") / "l.sqlite")
    try:
        for what, key, file, seconds, yes, chunks in records:
            row = Row(key + 1, f"k{key}", f"text {key}", "m", "v", "mp3", None, None, None, {})
            audio = Stored(f"k{key}.mp3", 1000 + file, f"{file:064d}", 24000, 1, seconds)
            if what == "done":
                ledger.record_done(row, audio, attempts=1, latency_s=0.1, generation_id=None, chunks=chunks)
            elif what == "copy":
                ledger.record_copy(row, audio, source="k0", chunks=chunks)
            elif what == "failed":
                ledger.record_failed(row, TransportError("cut"), attempts=1, retryable=yes, chunks=chunks)
            elif what == "check":
                ledger.record_check(row, f"{file:064d}", {"flagged": int(yes), "flag_reasons": "too fast" if yes else None})
            elif what == "delete":
                ledger.db.execute("DELETE FROM rows WHERE key = ?", (row.key,))
            elif what == "resize":
                ledger.db.execute("UPDATE rows SET bytes = ?, duration_s = ? WHERE key = ?", (file, seconds, row.key))
            else:
                ledger.db.execute("UPDATE rows SET sha256 = ? WHERE key = ?", (f"{file:064d}", row.key))
            _same(_tallied(ledger), _scanned(ledger))
            assert ledger.row_count() == ledger.db.execute("SELECT COUNT(*) FROM rows").fetchone()[0]
    finally:
        ledger.close()


def test_a_ledger_of_schema_10_is_tallied_once_by_the_run_that_upgrades_it(tmp_path):
    path = tmp_path / "l.sqlite"
    ledger = Ledger(path)
    for key in range(30):
        row = Row(key + 1, f"k{key}", f"text {key}", "m", "v", "mp3", None, None, None, {})
        if key % 3:
            ledger.record_done(row, Stored(f"k{key}.mp3", 1000 + key, f"{key:064d}", 24000, 1, key / 7), attempts=1,
                               latency_s=0.1, generation_id=None, chunks=key % 4 or None)
            if key % 5:
                ledger.record_check(row, f"{key:064d}", {"flagged": int(key % 2)})
        else:
            ledger.record_failed(row, TransportError("cut"), attempts=1, retryable=key % 2 == 0)
    ledger.record_copy(Row(40, "k40", "text 1", "m", "v", "mp3", None, None, None, {}),
                       Stored("k40.mp3", 1001, f"{1:064d}", 24000, 1, 1 / 7), source="k1", chunks=3)
    want = _scanned(ledger)
    ledger.close()
    db = sqlite3.connect(path)  # the ledger as schema 10 left it: no tallies
    db.executescript("".join(f"DROP {kind} {name};" for kind, name, _ in TALLIES.derived)
                     + "DROP TABLE tallies; PRAGMA user_version = 10;")
    db.close()
    older = Ledger.open_existing(path)
    assert older.version == 10
    _same(_tallied(older), want)  # read as it is, by a pass over the rows
    older.close()
    upgraded = Ledger(path)
    assert upgraded.version == VERSION
    _same(_tallied(upgraded), want)  # counted once by the upgrade, then read from the tallies
    upgraded.close()
