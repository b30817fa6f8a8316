"""Off the happy path: a full disk, kill -9, faults nobody foresaw, output names that would escape or
destroy, ledgers that are not what they seem, and secrets a provider echoes back."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import miniaudio
import pytest
from conftest import (
    FAST_RETRY,
    KEY,
    cli,
    cli_env,
    error_message,
    ledger_count,
    ledger_rows,
    start_batchtts,
    wait_for,
    write_csv,
)

import batchtts
import batchtts as api
from batchtts import ledger as ledger_module
from batchtts.errors import EXIT_FAILED_ROWS, EXIT_HALTED, EXIT_INTERNAL
from batchtts.ledger import VERSION, Ledger
from batchtts.local import LocalSpeechProvider
from batchtts.pool import WorkerPool
from batchtts.providers import SpeechRequest

MODEL = "openai/gpt-4o-mini-tts"
FIXTURES = Path(__file__).parent / "fixtures"


def rows(n: int, words: str = "for the fault tests") -> list[dict[str, str]]:
    return [{"id": f"r{i:04d}", "text": f"Sentence number {i} {words}.", "voice": "alloy"} for i in range(n)]


def run_args(manifest: Path, out: Path, server, *extra: str | Path) -> list[str | Path]:
    return ["run", manifest, "--out", out, "--model", MODEL, "--base-url", server.url, *FAST_RETRY, *extra]


def refused(result: subprocess.CompletedProcess[str], server=None) -> str:
    """The run was refused before anything was sent: exit 2, a message, no traceback."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    if server is not None:
        assert server.stats()["requests"] == 0
    return error_message(result)


def done_files(out: Path, ledger: Path | None = None, unrecorded: int = 0) -> None:
    """Every file the ledger says is done is there, whole; every audio file there is in the ledger,
    but for at most `unrecorded` that landed while the ledger itself could not be written."""
    entries = ledger_rows(ledger or out / "ledger.sqlite")
    done = {e["path"] for e in entries.values() if e["status"] == "done"}
    for e in entries.values():
        if e["status"] == "done":
            data = (out / e["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == e["sha256"]
    audio = {p.name for p in out.iterdir() if p.suffix in (".mp3", ".wav")}
    assert done <= audio and len(audio - done) <= unrecorded, sorted(audio - done)


# --- a full disk ----------------------------------------------------------------------------------

def _in_a_mount_namespace(script: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `script` under sh as root of a private mount namespace: its tmpfs mounts are its own and
    vanish with it, whoever runs the tests."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) for a small private tmpfs")
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=10)
    if probe.returncode != 0:
        pytest.skip(f"this machine allows no private mount namespace: {probe.stderr.decode().strip()}")
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=timeout,
                          env=cli_env())


def test_a_full_disk_halts_the_run_cleanly_and_a_rerun_with_room_finishes(serve, tmp_path):
    server = serve("--latency", "0.01")
    manifest = write_csv(tmp_path / "m.csv", rows(400, "long enough to fill a small disk quickly with audio"))
    out, saved = tmp_path / "out", tmp_path / "saved"
    out.mkdir()
    command = f"{sys.executable} -m batchtts run {manifest} --out {out} --model {MODEL} --base-url {server.url} " \
              f"--format wav --concurrency 8 --log-format json {' '.join(FAST_RETRY)}"
    script = f"""
        mount -t tmpfs -o size=3m tmpfs {out} || exit 90
        date +%s.%N > {tmp_path}/first.start
        {command} > {tmp_path}/first.out 2> {tmp_path}/first.err; echo $? > {tmp_path}/first.rc
        date +%s.%N > {tmp_path}/first.end
        mkdir -p {saved}/first && cp -a {out}/. {saved}/first/
        mount -o remount,size=200m {out}
        {command} > {tmp_path}/second.out 2> {tmp_path}/second.err; echo $? > {tmp_path}/second.rc
        mkdir -p {saved}/second && cp -a {out}/. {saved}/second/
    """
    result = _in_a_mount_namespace(script)
    assert result.returncode != 90, result.stderr
    first_err = (tmp_path / "first.err").read_text()
    assert int((tmp_path / "first.rc").read_text()) == EXIT_HALTED, first_err
    assert "Traceback" not in first_err
    halted = [json.loads(line) for line in first_err.splitlines() if '"halted"' in line]
    assert halted and any(full in halted[0]["reason"] for full in ("No space left on device", "disk is full"))
    assert "what finished is recorded" in (tmp_path / "first.out").read_text()
    seconds = float((tmp_path / "first.end").read_text()) - float((tmp_path / "first.start").read_text())
    kept = [e for e in ledger_rows(saved / "first" / "ledger.sqlite").values() if e["status"] == "done"]
    assert 0 < len(kept) < 400
    print(f"disk full: exit {EXIT_HALTED} after {seconds:.2f} s, {len(kept)} rows kept, each with its whole file")
    # The ledger shares the full disk: when its own write is what fails, the files that landed just
    # before are not recorded (and are bought again): at most the rows in flight, 8 here.
    done_files(saved / "first", unrecorded=8)
    assert not list((saved / "first").glob(".batchtts-partial/*/*")), "half-written files left behind"

    assert int((tmp_path / "second.rc").read_text()) == 0, (tmp_path / "second.err").read_text()
    entries = ledger_rows(saved / "second" / "ledger.sqlite")
    assert len(entries) == 400 and all(e["status"] == "done" for e in entries.values())
    done_files(saved / "second")
    # What the first run kept was not bought again: only rows in flight at the halt were.
    successes = server.stats()["successes"]
    assert successes <= 400 + 2 * 8, successes


# --- kill -9 --------------------------------------------------------------------------------------

def test_kill_9_pays_again_only_for_rows_in_flight(serve, tmp_path):
    concurrency = 16
    server = serve("--latency", "0.005")
    manifest = write_csv(tmp_path / "m.csv", rows(600))
    out = tmp_path / "out"
    # wav: a header written last, over audio the audio checks read without an mp3 decoder's cost
    args = run_args(manifest, out, server, "--concurrency", str(concurrency), "--format", "wav")
    for kill in range(3):  # each after another 120 rows are recorded: a run well under way, with rows in flight
        proc = start_batchtts(*args)
        try:
            at_least = (kill + 1) * 120
            wait_for(lambda n=at_least: ledger_count(out / "ledger.sqlite") >= n, timeout=60, every=0.01)
        finally:
            proc.kill()
            proc.communicate(timeout=20)
    final = cli(*args, timeout=120)
    assert final.returncode == 0, final.stderr
    done_files(out)
    paid_twice = sum(n - 1 for n in server.successes_by_input().values() if n > 1)
    # A row is paid for twice only if its audio came back but the kill beat the ledger's record of
    # it. Audio is in flight until it is recorded, and at most `concurrency` rows are: per kill, at
    # most that many are bought again.
    assert paid_twice <= 3 * concurrency, paid_twice
    print(f"kill -9 three times at --concurrency {concurrency}: {paid_twice} rows paid twice")


# --- one row's fault is that row's -----------------------------------------------------------------

class _FaultyProvider(LocalSpeechProvider):
    """The embedded engine, but one text makes it raise what no code path expects."""

    @asynccontextmanager
    async def speak(self, request: SpeechRequest) -> AsyncIterator[object]:
        if "explode" in request.input:
            raise ValueError("an exception nobody foresaw")
        async with super().speak(request) as audio:
            yield audio


def test_an_unforeseen_exception_fails_its_row_only_and_the_run_goes_on(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", [
        {"id": "a", "text": "Fine words."}, {"id": "b", "text": "These explode."}, {"id": "c", "text": "More words."},
    ])
    job = api.Job(manifest=manifest, out=tmp_path / "out", defaults=api.Defaults(model="local/espeak-ng", voice="alloy"),
                  concurrency=2)
    result = api.run(job, provider=_FaultyProvider())
    assert result.exit_code == EXIT_FAILED_ROWS
    assert (result.counters.done, result.counters.failed) == (2, 1)
    entries = ledger_rows(tmp_path / "out" / "ledger.sqlite")
    assert entries["b"]["status"] == "failed" and entries["b"]["retryable"] == 1
    assert entries["b"]["error"] == "ValueError: an exception nobody foresaw"
    again = api.run(job)
    assert again.exit_code == 0 and again.counters.done == 1


def test_the_pool_never_hangs_when_a_handler_or_the_feed_raises():
    async def scenario(fail_on: int, feed_fails: bool) -> tuple[list[int], Exception | None]:
        handled: list[int] = []

        async def handle(item: int) -> None:
            await asyncio.sleep(0)
            if item == fail_on:
                raise OSError(28, "No space left on device")
            handled.append(item)

        async def items() -> AsyncIterator[int]:
            for i in range(1000):
                if feed_fails and i == 50:
                    raise RuntimeError("the manifest vanished")
                yield i

        pool: WorkerPool[int] = WorkerPool(4, handle)
        await asyncio.wait_for(pool.run(items()), timeout=10)
        return handled, pool.fault

    handled, fault = asyncio.run(scenario(fail_on=10, feed_fails=False))
    assert isinstance(fault, OSError) and len(handled) < 1000
    handled, fault = asyncio.run(scenario(fail_on=-1, feed_fails=True))
    assert isinstance(fault, RuntimeError) and len(handled) <= 50


# --- output names ---------------------------------------------------------------------------------

def test_a_row_cannot_write_over_the_ledger_or_its_companions(serve, tmp_path):
    server = serve()
    out = tmp_path / "out"
    ledger = out / "state.db"
    first = write_csv(tmp_path / "ok.csv", [{"id": "a", "text": "Hello.", "voice": "alloy"}])
    assert cli(*run_args(first, out, server, "--ledger", ledger)).returncode == 0
    before = ledger.read_bytes()
    for name in ("state.db", "STATE.db-wal", "state.db-shm", ".batchtts-state.db.lock"):
        bad = write_csv(tmp_path / "bad.csv", [{"id": "a", "text": "Hello.", "voice": "alloy"},
                                               {"id": "b", "text": "Oops.", "voice": "alloy", "output": name}])
        message = refused(cli(*run_args(bad, out, server, "--ledger", ledger)))
        assert "row 2 (id 'b')" in message, message
        assert "destroy" in message or "a name batchtts uses itself" in message, message
    assert ledger.read_bytes() == before
    assert server.stats()["requests"] == 1


def test_output_names_are_checked_against_the_disk_and_each_other_before_any_request(serve, tmp_path):
    server = serve()
    out = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    (out / "sub").symlink_to(elsewhere)
    (out / "taken.mp3").mkdir()
    (out / "plain").write_text("a file, not a folder")
    cases = {
        "sub/x.mp3": "leads out of the output folder through a symbolic link",
        "taken.mp3": "is a folder on disk",
        "plain/x.mp3": "'plain' is a file on disk",
        "n" * 300 + ".mp3": "bytes long",
    }
    for output, expected in cases.items():
        manifest = write_csv(tmp_path / "m.csv", [{"id": "a", "text": "Hello.", "voice": "alloy", "output": output}])
        assert expected in refused(cli(*run_args(manifest, out, server)), server)
    clash = write_csv(tmp_path / "m.csv", [
        {"id": "a", "text": "Hello.", "voice": "alloy", "output": "d.mp3"},
        {"id": "b", "text": "World.", "voice": "alloy", "output": "d.mp3/inner.mp3"},
    ])
    message = refused(cli(*run_args(clash, out, server)), server)
    assert "row 2 (id 'b'): writes into folder 'd.mp3', which another row writes as a file" in message
    assert not list(elsewhere.iterdir())


def test_a_symlinked_partial_folder_is_refused_not_emptied(serve, tmp_path):
    server = serve()
    out = tmp_path / "out"
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "precious").write_text("mine")
    out.mkdir()
    (out / ".batchtts-partial").symlink_to(keep)
    manifest = write_csv(tmp_path / "m.csv", [{"id": "a", "text": "Hello.", "voice": "alloy"}])
    assert "not a folder but a link" in refused(cli(*run_args(manifest, out, server)), server)
    assert (keep / "precious").read_text() == "mine"


def test_identical_long_rows_without_ids_buy_each_chunk_once(serve, tmp_path):
    server = serve()
    text = " ".join(f"This is sentence {i} of a long chapter." for i in range(12))
    manifest = write_csv(tmp_path / "m.csv", [{"text": text}, {"text": text}, {"text": "A short one."}])
    result = cli(*run_args(manifest, tmp_path / "out", server, "--voice", "alloy", "--chunk-chars", "120"))
    assert result.returncode == 0, result.stderr
    by_input = server.stats()["by_input"]
    assert by_input and max(by_input.values()) == 1, by_input
    assert len(ledger_rows(tmp_path / "out" / "ledger.sqlite")) == 2


# --- ledgers --------------------------------------------------------------------------------------

def test_a_ledger_reached_through_a_symlink_is_locked_as_one(serve, tmp_path):
    server = serve("--latency", "0.05")
    manifest = write_csv(tmp_path / "m.csv", rows(200))
    out = tmp_path / "out"
    out.mkdir()
    real = out / "ledger.sqlite"
    (tmp_path / "alias.sqlite").symlink_to(real)
    first = start_batchtts(*run_args(manifest, out, server, "--concurrency", "2"))
    try:
        wait_for(lambda: real.exists() and len(ledger_rows(real)) > 0)
        second = cli(*run_args(manifest, out, server, "--ledger", tmp_path / "alias.sqlite"))
        assert second.returncode == 75, second.stderr
        assert "another batchtts run" in error_message(second)
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=30)


def test_empty_foreign_and_damaged_ledgers_are_refused_and_left_as_they_are(serve, tmp_path):
    server = serve()
    manifest = write_csv(tmp_path / "m.csv", rows(3))
    out = tmp_path / "out"
    out.mkdir()
    empty = out / "empty.sqlite"
    empty.touch()
    assert "empty file" in refused(cli(*run_args(manifest, out, server, "--ledger", empty)), server)
    assert empty.stat().st_size == 0

    foreign = out / "notes.db"
    db = sqlite3.connect(foreign)
    db.execute("CREATE TABLE notes (body TEXT)")
    db.commit()
    db.close()
    before = foreign.read_bytes()
    assert "another program's SQLite database" in refused(
        cli(*run_args(manifest, out, server, "--ledger", foreign)), server)
    assert foreign.read_bytes() == before

    not_sqlite = out / "junk.sqlite"
    not_sqlite.write_bytes(b"this is no database at all" * 100)
    assert "not a database" in refused(cli(*run_args(manifest, out, server, "--ledger", not_sqlite)), server)

    ledger = out / "ledger.sqlite"
    # wav: a ledger of 400 rows without 400 mp3 files for the audio checks to decode
    assert cli(*run_args(write_csv(tmp_path / "big.csv", rows(400)), out, server, "--format", "wav")).returncode == 0
    requests = server.stats()["requests"]
    with open(ledger, "r+b") as f:  # damage pages past the header: the rows table's
        f.seek(8192)
        f.write(os.urandom(8192))
    for command in (run_args(manifest, out, server), ["status", out], ["export", out, "--to", tmp_path / "x.csv"]):
        result = cli(*command)
        assert result.returncode == 2, (command, result.stderr)
        assert "Traceback" not in result.stderr
        assert "ledger" in error_message(result)
    assert server.stats()["requests"] == requests


def test_a_read_only_ledger_is_refused_for_runs_and_read_by_status(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", [{"id": "a", "text": "Hello.", "voice": "alloy"}])
    out = tmp_path / "out"
    command = f"{sys.executable} -m batchtts"
    run = f"{command} run {manifest} --out {out} --model local/espeak-ng"
    script = f"""
        {run} > /dev/null 2>&1 || exit 91
        mount --bind {out} {out} && mount -o remount,ro,bind {out} || exit 90
        {run} > {tmp_path}/run.out 2> {tmp_path}/run.err; echo $? > {tmp_path}/run.rc
        {command} status {out} > {tmp_path}/status.out 2> {tmp_path}/status.err; echo $? > {tmp_path}/status.rc
    """
    result = _in_a_mount_namespace(script)
    assert result.returncode not in (90, 91), result.stderr
    assert int((tmp_path / "run.rc").read_text()) == 2
    err = (tmp_path / "run.err").read_text()
    assert "read-only" in err.lower() and "Traceback" not in err
    assert int((tmp_path / "status.rc").read_text()) == 0, (tmp_path / "status.err").read_text()
    assert "done 1" in (tmp_path / "status.out").read_text()


def schema(db: sqlite3.Connection) -> list[tuple[str, str, list[tuple[object, ...]]]]:
    """Every table and index, with its columns in order, as SQLite describes them."""
    objects = db.execute("SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY name")
    return [(kind, name, db.execute(f"PRAGMA {'table' if kind == 'table' else 'index'}_info({name})").fetchall())
            for kind, name in objects]


def test_a_ledger_made_at_a_version_in_one_step_is_the_ledger_its_upgrades_make():
    """New ledgers are made whole (ledger.create), earlier ones upgraded a version at a time: at every
    version both give the same tables, columns in the same order, and the same indexes and triggers."""
    for version in range(1, VERSION + 1):
        stepped, whole = sqlite3.connect(":memory:"), sqlite3.connect(":memory:")
        for number in range(1, version + 1):
            stepped.executescript(ledger_module.upgrade(number))
        whole.executescript("".join(t.create(version) for t in ledger_module.TABLES if t.since <= version))
        kinds = "SELECT type, name FROM sqlite_master ORDER BY name"
        assert schema(stepped) == schema(whole), version
        assert stepped.execute(kinds).fetchall() == whole.execute(kinds).fetchall(), version
        stepped.close()
        whole.close()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_ledger_of_every_earlier_schema_is_upgraded_and_trusted(tmp_path, version):
    out = tmp_path / "out"
    shutil.copytree(FIXTURES / "ledgers" / version, out)
    result = cli("run", FIXTURES / "ledgers" / "manifest.csv", "--out", out, "--model", "local/espeak-ng")
    assert result.returncode == 0, result.stderr
    assert "narrated 0 rows" in result.stdout and "2 already done" in result.stdout
    db = sqlite3.connect(out / "ledger.sqlite")
    fresh = Ledger(tmp_path / "fresh.sqlite")
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == VERSION
        assert {r[0] for r in db.execute("SELECT key FROM rows WHERE status = 'done'")} == {"greeting", "farewell"}
        assert schema(db) == schema(fresh.db)  # upgraded, it is the ledger a new run makes
        recorded = db.execute("SELECT out, model, format FROM runs ORDER BY id LIMIT 1").fetchone()
        assert recorded == (f"/tmp/lg{version}", "local/espeak-ng", "mp3")  # the settings, out of the logged config
    finally:
        db.close()
        fresh.close()
    for name in ("greeting.mp3", "farewell.wav"):
        decoded = miniaudio.decode_file(str(out / name))
        assert decoded.num_frames > 0.2 * decoded.sample_rate


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_status_and_export_read_a_ledger_of_an_earlier_schema_as_it_is(tmp_path, version):
    out = tmp_path / "out"
    shutil.copytree(FIXTURES / "ledgers" / version, out)
    written = (out / "ledger.sqlite").read_bytes()
    manifest = FIXTURES / "ledgers" / "manifest.csv"
    report = batchtts.status([out], manifest=manifest)
    assert (report["total"], report["done"], report["failed"], report["pending"]) == (2, 2, 0, 0)
    where, rows = batchtts.export([out], to=tmp_path / "results.csv", manifest=manifest)
    assert rows == 2 and where.read_text().count("done") == 2
    assert (out / "ledger.sqlite").read_bytes() == written  # readers never upgrade a ledger


# --- secrets --------------------------------------------------------------------------------------

class _EchoingHandler(BaseHTTPRequestHandler):
    """A provider that echoes the request's headers in its error body, as some gateways do."""

    def do_POST(self) -> None:  # noqa: N802 (the standard library's name)
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body = json.dumps({"error": {"code": 400, "message": f"bad request from {self.headers.get('Authorization')} "
                                     f"(api_key={KEY})"}}).encode()
        self.send_response(400)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_a_key_the_provider_echoes_is_written_nowhere(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoingHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/api/v1"
        manifest = write_csv(tmp_path / "m.csv", rows(3))
        out = tmp_path / "out"
        result = cli("run", manifest, "--out", out, "--model", MODEL, "--base-url", url, *FAST_RETRY)
        assert result.returncode == EXIT_FAILED_ROWS, result.stderr
        status = cli("status", out)
        exported = tmp_path / "results.csv"
        assert cli("export", out, "--to", exported).returncode == 0
        texts = {"stdout": result.stdout, "stderr": result.stderr, "status": status.stdout,
                 "export": exported.read_text(), "ledger": (out / "ledger.sqlite").read_bytes().decode("latin-1")}
        assert "[redacted]" in texts["status"]
        for name, text in texts.items():
            assert KEY not in text, name
            assert "0123456789abcdef" not in text, name
    finally:
        server.shutdown()
        server.server_close()


def test_a_fault_in_batchtts_itself_is_one_line_not_a_traceback(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import batchtts.cli
    import batchtts.results

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a fault nobody wrote a message for")

    monkeypatch.setattr(batchtts.results, "status", broken)
    result = CliRunner().invoke(batchtts.cli.main, ["status", str(tmp_path)])
    assert result.exit_code == EXIT_INTERNAL
    assert "Traceback" not in result.output
    assert "unexpected RuntimeError: a fault nobody wrote a message for" in result.output
    assert "please report it" in result.output


# --- folders removed under a run -------------------------------------------------------------------

@pytest.mark.parametrize("removed", ["staging folder", "output folder"])
def test_a_folder_removed_during_the_run_is_made_again_and_nothing_is_bought_twice(serve, tmp_path, removed):
    server = serve("--latency", "0.01")
    manifest = write_csv(tmp_path / "m.csv", rows(300))
    out, ledger = tmp_path / "out", tmp_path / "state" / "ledger.sqlite"
    target = out / ".batchtts-partial" if removed == "staging folder" else out
    proc = start_batchtts(*run_args(manifest, out, server, "--ledger", ledger, "--concurrency", "4"))
    try:
        wait_for(lambda: len(list(out.glob("*.mp3"))) >= 5, every=0.01)
        wait_for(lambda: _removed(target), every=0.001)
        assert len(ledger_rows(ledger)) < 300, "the run ended before the folder was removed"
    finally:
        stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    entries = ledger_rows(ledger)
    assert len(entries) == 300 and all(e["status"] == "done" for e in entries.values())
    assert server.stats()["successes"] == 300
    if removed == "staging folder":
        done_files(out, ledger)
    else:  # files published before the folder was removed are gone with it; the rest are there, whole
        published = {p.name for p in out.glob("*.mp3")}
        assert 0 < len(published) < 300
        for e in entries.values():
            if e["path"] in published:
                assert hashlib.sha256((out / e["path"]).read_bytes()).hexdigest() == e["sha256"]
    assert not list(out.glob(".batchtts-partial/*/*")), "half-written files left behind"


def _removed(folder: Path) -> bool:
    """Remove a folder a run is writing into; False when a file landed in it meanwhile."""
    try:
        shutil.rmtree(folder)
    except OSError:
        return False
    return True


def test_a_symlinked_chunk_folder_is_refused_before_any_request(serve, tmp_path):
    server = serve()
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    text = " ".join(f"This is sentence {i} of a long chapter." for i in range(12))
    manifest = write_csv(tmp_path / "m.csv", [{"id": "ch", "text": text, "voice": "alloy"}])
    for link in (out / ".batchtts-chunks", out / ".batchtts-chunks" / "00"):
        shutil.rmtree(out, ignore_errors=True)
        link.parent.mkdir(parents=True)
        elsewhere.mkdir(exist_ok=True)
        link.symlink_to(elsewhere)
        message = refused(cli(*run_args(manifest, out, server, "--chunk-chars", "100")), server)
        assert f"{link} is not a folder but a link" in message, message
        assert not list(elsewhere.iterdir())


def test_status_and_export_call_a_damaged_ledger_damaged_and_an_empty_one_empty(serve, tmp_path):
    server = serve()
    out = tmp_path / "out"
    # wav: a ledger of 300 rows without 300 mp3 files for the audio checks to decode
    assert cli(*run_args(write_csv(tmp_path / "m.csv", rows(300)), out, server, "--format", "wav")).returncode == 0
    requests = server.stats()["requests"]
    good = (out / "ledger.sqlite").read_bytes()
    for offset, expected in ((16384, "damaged"), (8192, "damaged"), (None, "empty file")):
        damaged = bytearray(good)
        if offset is None:
            damaged.clear()
        else:
            damaged[offset:offset + 4096] = os.urandom(4096)
        (out / "ledger.sqlite").write_bytes(damaged)
        for command in (["status", out / "ledger.sqlite"], ["status", out], ["export", out, "--to", tmp_path / "x.csv"],
                        run_args(tmp_path / "m.csv", out, server, "--format", "wav")):
            result = cli(*command)
            assert result.returncode == 2, (offset, command, result.stdout + result.stderr)
            assert "Traceback" not in result.stderr
            assert expected in error_message(result), (offset, command, error_message(result))
    assert server.stats()["requests"] == requests
    assert not (tmp_path / "x.csv").exists()


def test_a_temporary_disk_too_full_for_planning_is_a_message_not_a_fault(tmp_path):
    """Planning 200,000 rows spills its notes to TMPDIR: on a full one the dry run says so, exit 2."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [f"r-{i:06d}" for i in range(200_000)], "text": ["A line."] * 200_000}),
                   tmp_path / "m.parquet")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    result = _in_a_mount_namespace(f"""
        mount -t tmpfs -o size=256k tmpfs {scratch} || exit 90
        TMPDIR={scratch} {sys.executable} -m batchtts run {tmp_path / 'm.parquet'} --out {tmp_path / 'out'} \\
            --model {MODEL} --voice alloy --dry-run --log-format json
    """)
    assert result.returncode == 2, result.stderr
    assert "planning needs room for its temporary files" in result.stderr
    assert "No space left on device" in result.stderr and "Traceback" not in result.stderr


def test_a_run_into_a_folder_on_a_full_disk_is_refused_with_a_message(tmp_path):
    """The disk fills before a run starts: the lock's few bytes find no room, and the run says so."""
    write_csv(tmp_path / "m.csv", rows(3))
    out = tmp_path / "out"
    out.mkdir()
    result = _in_a_mount_namespace(f"""
        mount -t tmpfs -o size=256k tmpfs {out} || exit 90
        dd if=/dev/zero of={out}/fill bs=4k 2>/dev/null
        {sys.executable} -m batchtts run {tmp_path / 'm.csv'} --out {out} --model {MODEL} --voice alloy
    """)
    assert result.returncode == 2, result.stderr
    assert f"cannot use output folder {out}: No space left on device" in result.stderr
    assert "Traceback" not in result.stderr
