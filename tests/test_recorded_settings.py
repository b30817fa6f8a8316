"""A run records in its ledger what shapes its rows' words and voices (the lexicon's entries, the
[voices] cast, the chunking), so `status`, `export` and `audiobook` given just the output folder
count its rows as it narrated them; a job given still wins, and a ledger of the schema before is
read as it is, then upgraded by the next run."""

from __future__ import annotations

import csv
import json
import sqlite3
from pathlib import Path

import av
import pytest
from conftest import cli, error_message, ledger_rows, write_csv

import batchtts
from batchtts.config import load_job
from batchtts.ledger import TABLES, VERSION, Ledger, upgrade

ROWS = [  # two the lexicon changes (one keyed by its content), one the cast changes, one neither
    {"id": "ch-1", "title": "One", "track": "1", "text": "Doctor Nguyen opens the book."},
    {"title": "Two", "track": "2", "text": "Nguyen walks home in the rain."},
    {"id": "ch-3", "title": "Three", "track": "3", "text": '<voice name="Alice">Good evening.</voice> The night falls.'},
    {"title": "Four", "track": "4", "text": "A plain closing line."},
]
JOB = """manifest = "m.csv"
out = "out"
chunk_chars = 400
[defaults]
model = "local/espeak-ng"
voice = "alloy"
[lexicon]
file = "words.csv"
entries = [{ pattern = "rain", replacement = "drizzle", language = "en", voice = "alloy" }]
[voices]
Alice = { "local/" = "nova", "openai/" = "shimmer" }
"""
CHANGED = 3  # rows whose words or voices the lexicon and the cast change


def narrate(folder: Path) -> tuple[Path, Path]:
    """A run of the job; returns the job file and the output folder."""
    folder.mkdir(parents=True, exist_ok=True)
    write_csv(folder / "m.csv", ROWS)
    (folder / "words.csv").write_text("pattern,replacement\nNguyen,Win\n", encoding="utf-8")
    job = folder / "job.toml"
    job.write_text(JOB, encoding="utf-8")
    result = cli("run", job)
    assert result.returncode == 0, result.stderr
    assert "narrated 4 rows" in result.stdout
    return job, folder / "out"


@pytest.fixture(scope="module")
def narrated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One run the tests that only read it share."""
    return narrate(tmp_path_factory.mktemp("recorded"))


def status(*args: str | Path) -> dict[str, object]:
    result = cli("status", *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def counts(report: dict[str, object]) -> tuple[object, ...]:
    return report["total"], report["done"], report["failed"], report["pending"]


def plain_job(folder: Path) -> Path:
    """The same job without its lexicon and cast: the rows as written."""
    plain = folder / "plain.toml"
    plain.write_text(JOB.split("[lexicon]")[0], encoding="utf-8")
    return plain


def test_the_run_records_the_lexicon_s_entries_the_cast_and_the_chunking(narrated):
    job_file, out = narrated
    job = load_job(job_file)
    ledger = Ledger.open_existing(out / "ledger.sqlite")
    try:
        recorded = ledger.last_run()
    finally:
        ledger.close()
    assert recorded is not None
    assert recorded.lexicon == job.lexicon and len(recorded.lexicon) == 2  # each entry, with its scope
    assert recorded.voices == job.voices
    assert (recorded.chunk_chars, recorded.limits) == (400, {})
    assert recorded.defaults == job.defaults


def test_status_without_the_job_counts_every_row_done(narrated):
    job_file, out = narrated
    assert counts(status(out)) == (4, 4, 0, 0)
    assert counts(status(out / "ledger.sqlite")) == (4, 4, 0, 0)
    assert batchtts.status([out])["pending"] == 0  # the library, as the CLI
    # The settings matter: read with a job that has neither lexicon nor cast, the rows they change
    # are not the ones narrated. A job given wins over what the run recorded.
    assert counts(status(out, "--job", plain_job(job_file.parent))) == (4, 4 - CHANGED, 0, CHANGED)
    assert counts(status(out, "--job", job_file)) == (4, 4, 0, 0)


def test_export_without_the_job_lists_every_row_done_with_its_file(narrated, tmp_path):
    _, out = narrated
    result = cli("export", out, "--to", tmp_path / "results.csv")
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "results.csv", newline="", encoding="utf-8") as f:
        records = list(csv.DictReader(f))
    assert [r["text"] for r in records] == [row["text"] for row in ROWS]
    assert [r["status"] for r in records] == ["done"] * 4
    recorded = {r["path"]: r for r in ledger_rows(out / "ledger.sqlite").values()}
    assert sorted(recorded) == sorted(r["path"] for r in records)
    for r in records:
        assert int(r["bytes"]) == recorded[r["path"]]["bytes"] == (out / r["path"]).stat().st_size
        with av.open(str(out / r["path"])) as container:  # each a file of speech, as long as recorded
            stream = container.streams.audio[0]
            heard = sum(frame.samples for frame in container.decode(stream)) / stream.rate
        assert heard == pytest.approx(float(r["duration_s"]), abs=0.1) and heard > 0.5


def test_audiobook_without_the_job_takes_every_chapter(narrated, tmp_path):
    _, out = narrated
    book = tmp_path / "Book.m4b"
    result = cli("audiobook", out, "--to", book)
    assert result.returncode == 0, result.stderr
    assert f"wrote {book}: 4 chapters" in result.stdout and "left out" not in result.stdout
    with av.open(str(book)) as container:
        assert [c["metadata"]["title"] for c in container.chapters()] == ["One", "Two", "Three", "Four"]


def test_a_lexicon_edited_or_moved_since_counts_as_the_run_said_it_without_the_job(tmp_path):
    job, out = narrate(tmp_path)
    (tmp_path / "words.csv").write_text("pattern,replacement\nNguyen,Wen\n", encoding="utf-8")
    assert counts(status(out)) == (4, 4, 0, 0)  # the ledger's view: the run's own entries
    assert counts(status(out, "--job", job)) == (4, 2, 0, 2)  # what the next run would do
    (tmp_path / "words.csv").rename(tmp_path / "moved.csv")
    assert counts(status(out)) == (4, 4, 0, 0)
    result = cli("export", out, "--to", tmp_path / "results.jsonl")
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "results.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["status"] for line in lines] == ["done"] * 4


def schema(db: sqlite3.Connection) -> list[tuple[str, str, list[tuple[object, ...]]]]:
    """Every table and index, with its columns in order, as SQLite describes them."""
    objects = db.execute("SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY name")
    return [(kind, name, db.execute(f"PRAGMA {'table' if kind == 'table' else 'index'}_info({name})").fetchall())
            for kind, name in objects]


BEFORE = 5  # the schema before the one that records the lexicon, the cast and the chunking


def test_a_ledger_of_the_schema_before_is_read_as_it_is_and_upgraded_by_the_next_run(tmp_path):
    job, out = narrate(tmp_path)
    ledger = out / "ledger.sqlite"
    db = sqlite3.connect(ledger, isolation_level=None)
    try:  # the ledger as schema 5 wrote it, before the run settings: what later schemas added, taken away
        for table in TABLES:  # first what later tables made on the tables they keep count of
            for kind, name, _ in table.derived if table.since > BEFORE else ():
                db.execute(f"DROP {kind} {name}")
        for table in TABLES:
            if table.since > BEFORE:
                db.execute(f"DROP TABLE {table.name}")
            for column in (c for c in table.columns if c.since > BEFORE and table.since <= BEFORE):
                if column.index:
                    db.execute(f"DROP INDEX {column.index}")
                db.execute(f"ALTER TABLE {table.name} DROP COLUMN {column.name}")
        db.execute(f"PRAGMA user_version = {BEFORE}")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        made = sqlite3.connect(tmp_path / "before.sqlite", isolation_level=None)
        for number in range(1, BEFORE + 1):
            made.executescript(f"BEGIN; {upgrade(number)} PRAGMA user_version={number}; COMMIT;")
        assert schema(db) == schema(made)
        made.close()
    finally:
        db.close()
    written = ledger.read_bytes()

    # Read as it is: the run recorded no lexicon nor cast, so the rows they change count as pending;
    # the job given counts them done.
    assert counts(status(out)) == (4, 4 - CHANGED, 0, CHANGED)
    assert counts(status(out, "--job", job)) == (4, 4, 0, 0)
    assert ledger.read_bytes() == written  # readers never upgrade a ledger

    result = cli("run", job)
    assert result.returncode == 0, result.stderr
    assert "narrated 0 rows" in result.stdout and "4 already done" in result.stdout
    Ledger(tmp_path / "fresh.sqlite").close()
    db, fresh = sqlite3.connect(ledger), sqlite3.connect(tmp_path / "fresh.sqlite")
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == VERSION
        assert schema(db) == schema(fresh)  # upgraded, it is the ledger a new run makes
        first, second = db.execute("SELECT chunk_chars, lexicon FROM runs ORDER BY id").fetchall()
        assert first == (400, None)  # the chunking, out of the logged config; the lexicon was never kept
        assert json.loads(second[1])[0]["pattern"] == "Nguyen"
    finally:
        db.close()
        fresh.close()
    assert counts(status(out)) == (4, 4, 0, 0)  # the run that upgraded it recorded its settings


@pytest.mark.parametrize("damage", ["lexicon = 'not JSON'", "lexicon = '[{\"pattern\": \"\"}]'", "voices = '[1]'"])
def test_recorded_settings_that_cannot_be_read_back_are_a_message_and_the_job_still_reads(tmp_path, damage):
    job, out = narrate(tmp_path)
    db = sqlite3.connect(out / "ledger.sqlite", isolation_level=None)
    try:
        db.execute(f"UPDATE runs SET {damage}")
    finally:
        db.close()
    result = cli("status", out)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "the last run's lexicon, [voices] or chunking cannot be read back" in error_message(result)
    assert "pass --job" in error_message(result)
    assert counts(status(out, "--job", job)) == (4, 4, 0, 0)
