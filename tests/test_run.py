"""The runner end to end: the real CLI against a real `batchtts serve` on loopback."""

from __future__ import annotations

import hashlib
import json
import signal
import wave
from pathlib import Path

import mutagen.mp3
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from conftest import (
    FAST_RETRY,
    KEY,
    SAMPLES,
    batchtts,
    cli,
    http,
    ledger_rows,
    sha,
    start_batchtts,
    stop,
    wait_for,
    write_csv,
)

MODEL = "openai/gpt-4o-mini-tts"


def rows(n: int, prefix: str = "r") -> list[dict[str, str]]:
    return [{"id": f"{prefix}{i:03d}", "text": f"Sentence number {i} for the {prefix} test.", "voice": "alloy"} for i in range(n)]


def run_args(manifest: Path, out: Path, server, *extra: str) -> list[str | Path]:
    return ["run", manifest, "--out", out, "--model", MODEL, "--base-url", server.url, *FAST_RETRY, *extra]


def events(stderr: str) -> list[dict]:
    """The run's log events: off a terminal, one JSON object a line."""
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def assert_all_done(out: Path, count: int) -> dict:
    entries = ledger_rows(out / "ledger.sqlite")
    assert len(entries) == count
    for e in entries.values():
        assert e["status"] == "done", e
        data = (out / e["path"]).read_bytes()
        assert len(data) == e["bytes"] and hashlib.sha256(data).hexdigest() == e["sha256"]
    assert not list((out / ".batchtts-partial").glob("*")) if (out / ".batchtts-partial").exists() else True
    return entries


@pytest.mark.parametrize("manifest", ["lines.csv", "lines.tsv", "lines.csv.gz", "lines.jsonl", "dataset.parquet", "minimal.csv"])
def test_happy_path_each_format_then_rerun_sends_nothing(serve, tmp_path, manifest):
    server = serve()
    out = tmp_path / "out"
    # The README's first `batchtts run`, as a user types it: in a process of its own, for one format.
    run = batchtts if manifest == "lines.csv" else cli
    result = run(*run_args(SAMPLES / manifest, out, server, "--voice", "alloy"))
    assert result.returncode == 0, result.stderr
    entries = ledger_rows(out / "ledger.sqlite")
    assert entries and server.stats()["requests"] == len(entries)
    assert_all_done(out, len(entries))
    for e in entries.values():
        path = out / e["path"]
        assert path.suffix == "." + e["format"]
        if e["format"] == "wav":
            with wave.open(str(path)) as w:
                assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
                assert w.getnframes() / 24000 == pytest.approx(e["duration_s"], abs=0.01)
        elif e["format"] == "mp3":
            assert mutagen.mp3.MP3(path).info.length == pytest.approx(e["duration_s"], abs=0.1)
        assert e["duration_s"] > 0.2 and e["sample_rate"] == 24000 and e["generation_id"]
    assert "narrated" in result.stdout

    again = run(*run_args(SAMPLES / manifest, out, server, "--voice", "alloy"))
    assert again.returncode == 0, again.stderr
    assert server.stats()["requests"] == len(entries)
    assert f"{len(entries)} already done" in again.stdout


def test_jsonl_row_options_reach_the_provider_and_output_names_the_file(serve, tmp_path):
    server = serve()
    out = tmp_path / "out"
    assert cli(*run_args(SAMPLES / "lines.jsonl", out, server)).returncode == 0
    entries = ledger_rows(out / "ledger.sqlite")
    assert entries["j-004"]["path"] == "extras/named-by-output.mp3"
    assert (out / "extras" / "named-by-output.mp3").exists()
    assert entries["j-002"]["format"] == "wav" and (out / "j-002.wav").exists()


@pytest.mark.parametrize("status", [429, 502, 503, 524, 529])
def test_each_retryable_status_recovers(serve, tmp_path, status):
    server = serve("--fail-first", "2", "--fail-status", str(status), "--retry-after", "0.01")
    out = tmp_path / "out"
    manifest = write_csv(tmp_path / "m.csv", rows(5))
    result = cli(*run_args(manifest, out, server))
    assert result.returncode == 0, result.stderr
    assert_all_done(out, 5)
    for row in rows(5):
        assert server.requests_for(row["text"]) == 3
    assert all(e["attempts"] == 3 for e in ledger_rows(out / "ledger.sqlite").values())
    # Off a terminal each retry is a JSON event naming its row, its attempt and the status it met.
    retries = sorted((e["row"], e["id"], e["attempt"], e["status"]) for e in events(result.stderr) if e["event"] == "retry")
    assert retries == [(i + 1, row["id"], attempt, status) for i, row in enumerate(rows(5)) for attempt in (1, 2)]


def test_exhausted_retries_fail_the_row_and_the_next_run_retries_it(serve, tmp_path):
    server = serve("--fail-first", "3", "--fail-status", "503")
    out = tmp_path / "out"
    manifest = write_csv(tmp_path / "m.csv", rows(2))
    first = cli(*run_args(manifest, out, server, "--max-attempts", "2"))
    assert first.returncode == 1
    failed = ledger_rows(out / "ledger.sqlite")
    assert {e["status"] for e in failed.values()} == {"failed"}
    assert all(e["http_status"] == 503 and e["retryable"] == 1 for e in failed.values())
    second = cli(*run_args(manifest, out, server, "--max-attempts", "2"))
    assert second.returncode == 0, second.stderr
    assert_all_done(out, 2)


def test_retry_after_pauses_the_whole_pool(serve, tmp_path):
    pause = 0.3  # far longer than any backoff of FAST_RETRY (50 ms at most)
    server = serve("--fail-first", "1", "--fail-status", "429", "--retry-after", str(pause), "--rate-limit-headers", "retry-after")
    out = tmp_path / "out"
    manifest = write_csv(tmp_path / "m.csv", rows(6))
    result = cli(*run_args(manifest, out, server, "--concurrency", "2"))
    assert result.returncode == 0, result.stderr
    log = server.stats()["log"]
    first_429 = min(e["t"] for e in log if e["status"] == 429)
    for row in rows(6):
        times = [e for e in log if e["input_sha256"] == sha(row["text"])]
        rejected = [e["t"] for e in times if e["status"] == 429]
        accepted = [e["t"] for e in times if e["status"] == 200]
        assert len(rejected) == 1 and len(accepted) == 1
        assert accepted[0] - rejected[0] >= pause
    # No request at all went out during the pause the first 429 asked for.
    assert not [e for e in log if first_429 < e["t"] < first_429 + pause and e["status"] == 200]


def test_ratelimit_reset_header_alone_is_honoured(serve, tmp_path):
    server = serve("--rate-limit", "5", "--rate-limit-headers", "reset")
    out = tmp_path / "out"
    manifest = write_csv(tmp_path / "m.csv", rows(12))
    result = cli(*run_args(manifest, out, server, "--concurrency", "8"))
    assert result.returncode == 0, result.stderr
    assert_all_done(out, 12)
    stats = server.stats()
    # Paused instead of hammering: refused are the requests already on their way when the first 429
    # came back (the 8 a cold start lets in flight, and the few the pool grew by with the first
    # successes), then one probe a window; a client that retried on its 10-50 ms backoff instead of
    # waiting for the reset would draw dozens a row. (A bound of 12 failed one run in 20: the burst
    # is 8 to 12 requests, by how the first window's successes fall.)
    assert stats["by_status"].get("429", 0) <= 12 + 8


def test_bad_request_fails_only_its_row(serve, tmp_path):
    server = serve()
    out = tmp_path / "out"
    data = rows(4)
    data[2]["text"] = "This row is [[bad]] on purpose."
    manifest = write_csv(tmp_path / "m.csv", data)
    result = cli(*run_args(manifest, out, server))
    assert result.returncode == 1
    entries = ledger_rows(out / "ledger.sqlite")
    assert entries["r002"]["status"] == "failed" and entries["r002"]["http_status"] == 400
    assert entries["r002"]["error"] == "Invalid request parameters" and entries["r002"]["retryable"] == 0
    assert sum(e["status"] == "done" for e in entries.values()) == 3
    assert server.requests_for(data[2]["text"]) == 1

    status = batchtts("status", out, "--json")  # the README's `batchtts status`, in a process of its own
    report = json.loads(status.stdout)
    assert (report["total"], report["done"], report["failed"], report["pending"]) == (4, 3, 1, 0)
    again = cli(*run_args(manifest, out, server))
    assert again.returncode == 1 and server.requests_for(data[2]["text"]) == 1
    cli(*run_args(manifest, out, server, "--retry-failed"))
    assert server.requests_for(data[2]["text"]) == 2


def test_missing_model_is_a_permanent_404(serve, tmp_path):
    server = serve()
    out = tmp_path / "out"
    manifest = write_csv(tmp_path / "m.csv", [{"id": "a", "text": "hello", "voice": "alloy", "model": "test/missing-model"}])
    result = cli(*run_args(manifest, out, server))
    assert result.returncode == 1
    assert ledger_rows(out / "ledger.sqlite")["a"]["http_status"] == 404
    assert "Model not found" in ledger_rows(out / "ledger.sqlite")["a"]["error"]


def test_bad_key_stops_with_exit_3_and_a_rerun_resumes(serve, tmp_path):
    server = serve("--api-key", "the-right-key")
    out = tmp_path / "out"
    manifest = write_csv(tmp_path / "m.csv", rows(6))
    result = cli(*run_args(manifest, out, server, "--concurrency", "2"), key="a-wrong-key")
    assert result.returncode == 3
    assert "check the key" in result.stdout
    assert not [e for e in ledger_rows(out / "ledger.sqlite").values() if e["status"] == "done"]
    assert server.stats()["requests"] <= 2  # stopped taking rows at once
    rerun = cli(*run_args(manifest, out, server), key="the-right-key")
    assert rerun.returncode == 0, rerun.stderr
    assert_all_done(out, 6)


def test_a_base_url_with_no_api_behind_it_stops_with_exit_3_and_says_where_to_look(serve, tmp_path):
    server = serve()
    out = tmp_path / "out"
    manifest = write_csv(tmp_path / "m.csv", rows(6))
    wrong = server.url.removesuffix("/api/v1")
    result = cli("run", manifest, "--out", out, "--model", "m", "--voice", "v", "--base-url", wrong,
                      "--concurrency", "2")
    assert result.returncode == 3, result.stderr
    assert f"no speech API at {wrong}/audio/speech" in result.stdout and "check the base URL" in result.stdout
    assert ledger_rows(out / "ledger.sqlite") == {}  # nothing recorded as failed: the rerun does every row
    rerun = cli(*run_args(manifest, out, server))
    assert rerun.returncode == 0, rerun.stderr
    assert_all_done(out, 6)


def test_exhausted_credits_stop_with_exit_3_and_nothing_is_paid_twice(serve, tmp_path):
    server = serve("--credits", "3")
    out = tmp_path / "out"
    manifest = write_csv(tmp_path / "m.csv", rows(8))
    result = cli(*run_args(manifest, out, server, "--concurrency", "1"))
    assert result.returncode == 3
    assert "add credits" in result.stdout
    done = [k for k, e in ledger_rows(out / "ledger.sqlite").items() if e["status"] == "done"]
    assert len(done) == 3
    server.faults(credits=None)
    rerun = cli(*run_args(manifest, out, server))
    assert rerun.returncode == 0, rerun.stderr
    assert_all_done(out, 8)
    assert set(server.successes_by_input().values()) == {1}


@pytest.mark.parametrize("fault", ["--drop-first", "--truncate-first"])
@pytest.mark.parametrize("fmt", ["pcm", "wav", "mp3"])
def test_cut_connections_are_retried_and_files_are_byte_exact(serve, tmp_path, fault, fmt):
    server = serve(fault, "2")
    out = tmp_path / "out"
    manifest = write_csv(tmp_path / "m.csv", rows(4))
    result = cli(*run_args(manifest, out, server, "--format", fmt))
    assert result.returncode == 0, result.stderr
    entries = assert_all_done(out, 4)
    reference = serve()
    for row in rows(4):
        assert server.requests_for(row["text"]) == 3
        body = http.post(
            f"{reference.url}/audio/speech",
            json={"model": MODEL, "input": row["text"], "voice": "alloy", "response_format": "mp3" if fmt == "mp3" else "pcm"},
            headers={"Authorization": "Bearer x"},
        ).content
        written = (out / entries[row["id"]]["path"]).read_bytes()
        if fmt == "wav":
            with wave.open(str(out / entries[row["id"]]["path"])) as w:
                written = w.readframes(w.getnframes())
        assert written == body


def test_read_timeout_on_a_stalled_body_is_retried(serve, tmp_path):
    server = serve("--stall-first", "1", "--stall-seconds", "3")
    out = tmp_path / "out"
    manifest = write_csv(tmp_path / "m.csv", rows(2))
    result = cli(*run_args(manifest, out, server, "--timeout", "0.3"))
    assert result.returncode == 0, result.stderr
    assert "read timed out" in result.stderr
    assert_all_done(out, 2)


def test_kill_9_then_rerun_completes_without_requesting_done_rows_again(serve, tmp_path):
    server = serve("--latency", "0.05")
    out = tmp_path / "out"
    manifest = write_csv(tmp_path / "m.csv", rows(80))
    proc = start_batchtts(*run_args(manifest, out, server, "--concurrency", "4", "--format", "wav"))
    ledger = out / "ledger.sqlite"
    wait_for(lambda: ledger.exists() and sum(e["status"] == "done" for e in ledger_rows(ledger).values()) >= 12)
    stop(proc, signal.SIGKILL)
    done_before = {k for k, e in ledger_rows(ledger).items() if e["status"] == "done"}
    assert 12 <= len(done_before) < 80

    rerun = cli(*run_args(manifest, out, server, "--concurrency", "4", "--format", "wav"))
    assert rerun.returncode == 0, rerun.stderr
    entries = assert_all_done(out, 80)
    for e in entries.values():
        with wave.open(str(out / e["path"])) as w:
            assert w.getnframes() > 0
    successes = server.successes_by_input()
    texts = {r["id"]: r["text"] for r in rows(80)}
    assert all(successes[sha(texts[k])] == 1 for k in done_before)
    # At most the rows in flight at the kill, and those finished in the last ledger commit interval
    # (0.1 s, a handful at this pace), were redone.
    assert sum(successes.values()) <= 80 + 4 + 12
    assert not any(p.name.endswith(".wav") and p.parent.name == ".batchtts-partial" for p in out.rglob("*"))


def test_sigint_finishes_in_flight_rows_and_exits_130_and_lock_refuses_a_second_run(serve, tmp_path):
    server = serve("--latency", "0.4")
    out = tmp_path / "out"
    manifest = write_csv(tmp_path / "m.csv", rows(20))
    proc = start_batchtts(*run_args(manifest, out, server, "--concurrency", "2"))
    wait_for(lambda: server.stats()["in_flight"] >= 2)
    second = batchtts(*run_args(manifest, out, server))
    assert second.returncode == 75
    assert "another batchtts run" in second.stderr
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 130, stderr
    assert "interrupted by SIGINT" in stdout
    entries = ledger_rows(out / "ledger.sqlite")
    assert 2 <= len(entries) < 20 and all(e["status"] == "done" for e in entries.values())
    rerun = cli(*run_args(manifest, out, server, "--concurrency", "8"))
    assert rerun.returncode == 0
    assert_all_done(out, 20)
    assert set(server.successes_by_input().values()) == {1}


def test_sigterm_exits_143(serve, tmp_path):
    server = serve("--latency", "0.3")
    out = tmp_path / "out"
    proc = start_batchtts(*run_args(write_csv(tmp_path / "m.csv", rows(10)), out, server, "--concurrency", "1"))
    wait_for(lambda: server.stats()["requests"] >= 1)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=20)
    assert proc.returncode == 143


def test_edited_row_is_narrated_again_and_only_it(serve, tmp_path):
    server = serve()
    out = tmp_path / "out"
    data = rows(5)
    manifest = write_csv(tmp_path / "m.csv", data)
    assert cli(*run_args(manifest, out, server)).returncode == 0
    before = ledger_rows(out / "ledger.sqlite")
    data[3]["text"] = "An edited sentence."
    write_csv(manifest, data)
    assert cli(*run_args(manifest, out, server)).returncode == 0
    stats = server.stats()
    assert stats["requests"] == 6 and server.requests_for("An edited sentence.") == 1
    after = ledger_rows(out / "ledger.sqlite")
    assert after["r003"]["fingerprint"] != before["r003"]["fingerprint"]
    assert after["r003"]["sha256"] != before["r003"]["sha256"]


def test_deleted_file_is_narrated_again(serve, tmp_path):
    server = serve()
    out = tmp_path / "out"
    manifest = write_csv(tmp_path / "m.csv", rows(3))
    assert cli(*run_args(manifest, out, server)).returncode == 0
    (out / "r001.mp3").unlink()
    assert cli(*run_args(manifest, out, server)).returncode == 0
    assert server.stats()["requests"] == 4 and (out / "r001.mp3").exists()


def test_the_key_never_appears_in_logs_ledger_or_files(serve, tmp_path):
    server = serve("--fail-first", "1", "--fail-status", "503")
    out = tmp_path / "out"
    manifest = write_csv(tmp_path / "m.csv", rows(3))
    result = cli(*run_args(manifest, out, server, "--log-format", "json"))
    assert result.returncode == 0
    assert KEY not in result.stdout and KEY not in result.stderr
    assert '"event": "start"' in result.stderr and "OPENROUTER_API_KEY" in result.stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    dry = cli("run", manifest, "--out", out, "--model", MODEL, "--dry-run")
    assert KEY not in dry.stdout + dry.stderr


def test_missing_key_fails_fast_with_exit_2(serve, tmp_path):
    server = serve()
    result = cli(*run_args(write_csv(tmp_path / "m.csv", rows(2)), tmp_path / "out", server), key=None)
    assert result.returncode == 2
    assert "OPENROUTER_API_KEY" in result.stderr and "Traceback" not in result.stderr
    assert server.stats()["requests"] == 0


def test_identical_rows_without_ids_are_narrated_once(serve, tmp_path):
    server = serve()
    out = tmp_path / "out"
    manifest = tmp_path / "m.csv"
    manifest.write_text("text\nSame words twice.\nSame words twice.\nDifferent words.\n")
    assert cli(*run_args(manifest, out, server, "--voice", "alloy")).returncode == 0
    assert server.stats()["requests"] == 2
    assert len(ledger_rows(out / "ledger.sqlite")) == 2


def test_limit_takes_the_first_rows_left(serve, tmp_path):
    server = serve()
    out = tmp_path / "out"
    manifest = write_csv(tmp_path / "m.csv", rows(5))
    assert cli(*run_args(manifest, out, server, "--limit", "2")).returncode == 0
    assert set(ledger_rows(out / "ledger.sqlite")) == {"r000", "r001"}
    assert cli(*run_args(manifest, out, server, "--limit", "2")).returncode == 0
    assert set(ledger_rows(out / "ledger.sqlite")) == {"r000", "r001", "r002", "r003"}


def test_export_joins_manifest_and_ledger_with_carried_columns(serve, tmp_path):
    server = serve()
    out = tmp_path / "out"
    assert cli(*run_args(SAMPLES / "dataset.parquet", out, server, "--voice", "echo", "--format", "wav")).returncode == 0
    for target in ("results.parquet", "results.csv"):
        export = batchtts if target.endswith("parquet") else cli  # the README's `batchtts export`, as typed
        result = export("export", out, "--to", tmp_path / target)
        assert result.returncode == 0, result.stderr
        table = pq.read_table(tmp_path / target) if target.endswith("parquet") else pacsv.read_csv(tmp_path / target)
        data = table.to_pylist()
        assert [r["id"] for r in data] == ["pq-001", "pq-002", "pq-003"]
        assert data[2]["voice"] == "echo" and data[0]["split"] == "train" and data[1]["speaker_id"] == 4
        assert all(r["status"] == "done" and r["sample_rate"] == 24000 and r["duration_s"] > 0 for r in data)
        assert all((out / r["path"]).exists() for r in data)


def test_a_second_signal_stops_at_once_and_leaves_no_partial_file_under_a_final_name(serve, tmp_path):
    server = serve("--latency", "30")
    out = tmp_path / "out"
    proc = start_batchtts(*run_args(write_csv(tmp_path / "m.csv", rows(6)), out, server, "--concurrency", "3"))
    wait_for(lambda: server.stats()["in_flight"] >= 3)
    proc.send_signal(signal.SIGINT)
    while '"stopping"' not in proc.stderr.readline():  # two signals sent at once may merge into one
        pass
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=10)  # far sooner than the 30 s the requests in flight would take
    assert proc.returncode == 130
    assert not [p for p in out.iterdir() if p.suffix == ".mp3"]
    entries = ledger_rows(out / "ledger.sqlite")
    assert entries == {}
    server.faults(latency=0)
    assert cli(*run_args(tmp_path / "m.csv", out, server)).returncode == 0
    assert_all_done(out, 6)


def test_off_a_terminal_progress_is_a_periodic_json_event(serve, tmp_path):
    server = serve("--latency", "0.1")
    out = tmp_path / "out"
    result = cli(*run_args(write_csv(tmp_path / "m.csv", rows(12)), out, server, "--concurrency", "2",
                                "--progress-interval", "0.15"))
    assert result.returncode == 0
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    progress = [e for e in events if e["event"] == "progress"]
    assert len(progress) >= 2 and progress[-1]["total"] == 12
    assert progress[0]["done"] <= progress[-1]["done"]
    summary = next(e for e in events if e["event"] == "summary")
    assert summary["requests"] == 12 and summary["done"] == 12 and summary["wall_s"] > 0
    assert "\r" not in result.stderr  # no progress bar off a terminal
