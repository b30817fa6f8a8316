"""The results ledger: one SQLite row per manifest key, the record that makes every rerun resumable.

WAL mode with synchronous=NORMAL: a commit survives kill -9 (it is in the WAL before the call
returns) without an fsync. Commits are grouped: the first write of a transaction asks the caller
(`on_write`, the run's event loop) to commit soon, and every row that finishes before then joins
that commit, so finished rows reach the WAL within a turn of the event loop and a kill -9 costs
only the rows in flight. A row is written only after its audio file has been renamed into place,
so "done" in the ledger always names a complete file.

A ledger is only ever opened as one: an empty file, another program's database, a damaged or
read-only file is refused (LedgerError) and never modified.
"""

from __future__ import annotations

import functools
import json
import operator
import os
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, ParamSpec, TypeVar

from .config import Defaults, Job, Output
from .errors import LedgerError, SpeechError, UsageError
from .lexicon import COLUMNS as LEXICON_COLUMNS
from .lexicon import Entry as LexiconEntry
from .lexicon import Lexicon
from .manifest import Row
from .markup import Cast
from .redact import redact_uri
from .sharding import Shard, ledger_for, named_ledger, shard_of


@dataclass(frozen=True)
class Column:
    name: str
    sql: str  # type and constraints
    since: int = 1  # the schema version that added it
    index: str | None = None  # the name of an index on it, made when it is added


@dataclass(frozen=True)
class Table:
    """One table as code: the DDL of every schema version, the upserts and the readers come from it."""

    name: str
    key: str
    columns: tuple[Column, ...]
    since: int = 1
    index: tuple[str, str] | None = None  # an index's name and column
    constraint: str = ""  # a table constraint after the columns, such as a composite primary key
    # (kind, name, SQL) of what is made with it: the triggers that keep it, indexes they need
    derived: tuple[tuple[str, str, str], ...] = ()

    @functools.cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def upgrade(self, version: int) -> str:
        """The SQL that takes this table from schema `version - 1` to `version`."""
        if version < self.since:
            return ""
        if version == self.since:
            return self.create(version)
        return "".join(f"ALTER TABLE {self.name} ADD COLUMN {c.name} {c.sql};\n"
                       + (f"CREATE INDEX {c.index} ON {self.name} ({c.name});\n" if c.index else "")
                       for c in self.columns if c.since == version)

    def create(self, version: int) -> str:
        """The SQL that makes this table as schema `version` has it, in one step: its columns in the
        order the upgrades up to `version` leave them (each version's added at the end)."""
        columns = sorted((c for c in self.columns if c.since <= version), key=lambda c: max(c.since, self.since))
        body = ",\n    ".join([*(f"{c.name} {c.sql}" for c in columns), *([self.constraint] if self.constraint else [])])
        index = f"CREATE INDEX {self.index[0]} ON {self.name} ({self.index[1]});\n" if self.index else ""
        added = "".join(f"CREATE INDEX {c.index} ON {self.name} ({c.name});\n" for c in columns if c.index)
        derived = "".join(f"CREATE {kind} {name} {sql};\n" for kind, name, sql in self.derived)
        return f"CREATE TABLE {self.name} (\n    {body}\n);\n{index}{added}{derived}"


_STATUS = "TEXT NOT NULL CHECK (status IN ('done', 'failed'))"
_AUDIO = (  # what a file holds, for a row and for a chunk alike
    Column("path", "TEXT"), Column("bytes", "INTEGER"), Column("sha256", "TEXT"), Column("sample_rate", "INTEGER"),
    Column("channels", "INTEGER"), Column("duration_s", "REAL"),
)
_REQUEST = (  # how it was asked for
    Column("attempts", "INTEGER NOT NULL DEFAULT 0"), Column("http_status", "INTEGER"), Column("error", "TEXT"),
    Column("generation_id", "TEXT"), Column("latency_s", "REAL"),
)
_STAMPS = (Column("created_at", "TEXT NOT NULL"), Column("updated_at", "TEXT NOT NULL"))

ROWS = Table("rows", "key", (
    Column("key", "TEXT PRIMARY KEY"), Column("row_number", "INTEGER"), Column("fingerprint", "TEXT NOT NULL"),
    Column("status", _STATUS), Column("retryable", "INTEGER NOT NULL DEFAULT 0"), *_AUDIO,
    Column("model", "TEXT"), Column("voice", "TEXT"), Column("format", "TEXT"), Column("characters", "INTEGER"),
    *_REQUEST, *_STAMPS, Column("chunks", "INTEGER", since=2),
    # The voice the row took (`voice` is the manifest's, which may be a list or a pool: speakers.py);
    # the request its file answers (Row.request), by which identical rows find a file to copy; and
    # the row whose file it is a copy of, when it was not requested for this row.
    Column("speaker", "TEXT", since=7), Column("request", "TEXT", since=7, index="rows_request"),
    Column("copy_of", "TEXT", since=7),
), index=("rows_status", "status"))
CHUNKS = Table("chunks", "fingerprint", (
    Column("fingerprint", "TEXT PRIMARY KEY"), Column("row_key", "TEXT NOT NULL"),
    Column("chunk_index", "INTEGER NOT NULL"), Column("status", _STATUS),
    Column("retryable", "INTEGER NOT NULL DEFAULT 0"), *_AUDIO, Column("characters", "INTEGER"), *_REQUEST, *_STAMPS,
), since=2, index=("chunks_row", "row_key"))
RUNS = Table("runs", "id", (
    Column("id", "INTEGER PRIMARY KEY"), Column("started_at", "TEXT NOT NULL"), Column("finished_at", "TEXT"),
    Column("manifest", "TEXT"), Column("config", "TEXT"), Column("exit_code", "INTEGER"), Column("summary", "TEXT"),
    # The settings later commands read back (status, export, the next run's checks); `config` keeps
    # the whole configuration as it was, for people.
    Column("out", "TEXT", since=3), Column("model", "TEXT", since=3), Column("voice", "TEXT", since=3),
    Column("format", "TEXT", since=3), Column("speed", "REAL", since=3), Column("shard", "TEXT", since=3),
    # What shapes a row's words, voices and chunks, so that status and export plan rows as the run
    # did without its job file: the lexicon's entries (not its file, which may change or move) and
    # the [voices] cast as JSON, and the chunking.
    Column("lexicon", "TEXT", since=6), Column("voices", "TEXT", since=6), Column("chunk_chars", "INTEGER", since=6),
    Column("limits", "TEXT", since=6),
    # The manifest as the run planned it (its size, mtime and rows), recorded only when the ledger
    # then held nothing but that manifest's rows as they are: while the manifest is unchanged, status
    # counts the ledger's rows instead of planning every manifest row again (Planned).
    Column("manifest_bytes", "INTEGER", since=9), Column("manifest_mtime_ns", "INTEGER", since=9),
    Column("manifest_rows", "INTEGER", since=9),
    # The [output] shape every file was made into as it landed: part of what a row is (its fingerprint).
    Column("output_rate", "INTEGER", since=10), Column("output_channels", "INTEGER", since=10),
))
# One row per request sent (or local synthesis tried), for `batchtts report`: millions a night, so
# each is kept narrow (numbers, NULL for what does not apply; no text but the key and a short kind).
ATTEMPTS = Table("attempts", "rowid", (
    Column("run_id", "INTEGER", since=4), Column("started", "REAL NOT NULL", since=4),  # epoch s
    Column("latency_s", "REAL", since=4), Column("row_number", "INTEGER", since=4),
    Column("row_key", "TEXT", since=4), Column("chunk_index", "INTEGER", since=4),
    # An HTTP status, or the kind of fault of a request that got none ('no-answer', 'transport', ...).
    Column("status", "", since=4), Column("bytes", "INTEGER", since=4), Column("characters", "INTEGER", since=4),
    Column("retry_after", "REAL", since=4), Column("cost", "REAL", since=4),
    # The throttle's limits when the request went out: requests awaiting an answer, and requests a second.
    Column("concurrency", "INTEGER", since=4), Column("pace", "REAL", since=4),
), since=4, index=("attempts_run", "run_id"))
# A row's mastered file: made from the row's audio (its sha256 then) to a preset, and as measured.
MASTERED = Table("mastered", "key", (
    Column("key", "TEXT PRIMARY KEY"), Column("row_number", "INTEGER"), Column("status", _STATUS),
    Column("preset", "TEXT NOT NULL"), Column("source_sha256", "TEXT"), Column("path", "TEXT"), Column("bytes", "INTEGER"),
    Column("sha256", "TEXT"), Column("passed", "INTEGER"), Column("problems", "TEXT"), Column("error", "TEXT"),
    # The measurement of the file written (mastering.Measurement).
    Column("loudness_lufs", "REAL"), Column("rms_db", "REAL"), Column("peak_db", "REAL"), Column("true_peak_db", "REAL"),
    Column("noise_floor_db", "REAL"), Column("head_s", "REAL"), Column("tail_s", "REAL"), Column("room_tone_db", "REAL"),
    Column("length_s", "REAL"), Column("sample_rate", "INTEGER"), Column("channels", "INTEGER"),
    Column("container", "TEXT"), Column("bitrate_kbps", "INTEGER"), *_STAMPS,
), since=5)
# A row's file as the audio checks measured it when it landed (checks.Verdict), and how often the
# row was narrated again for being flagged. The record speaks for a file by its sha256: for the
# row's own while the row's sha256 is that one, and for an identical file (a copy) of another row.
CHECKS = Table("checks", "key", (
    Column("key", "TEXT PRIMARY KEY"), Column("fingerprint", "TEXT NOT NULL"), Column("sha256", "TEXT NOT NULL"),
    Column("duration_s", "REAL"), Column("chars_per_second", "REAL"), Column("lead_silence_s", "REAL"),
    Column("trail_silence_s", "REAL"), Column("max_inner_silence_s", "REAL"), Column("peak_db", "REAL"),
    Column("rms_db", "REAL"), Column("clipping", "REAL"), Column("wer", "REAL"),
    Column("flagged", "INTEGER NOT NULL DEFAULT 0"), Column("flag_reasons", "TEXT"),
    Column("redos", "INTEGER NOT NULL DEFAULT 0"), *_STAMPS,
), since=8, index=("checks_file", "sha256"))


def _check_of(r: str) -> str:
    """The checks record that speaks for the file of row `r` (an alias, or NEW or OLD in a trigger):
    its own record of that file; for a copy, the first record of the file it copies."""
    return (f"COALESCE((SELECT c.rowid FROM checks c WHERE c.key = {r}.key AND c.sha256 = {r}.sha256), "
            f"CASE WHEN {r}.copy_of IS NOT NULL THEN (SELECT MIN(c.rowid) FROM checks c WHERE c.sha256 = {r}.sha256) END)")


def _verdict_of(r: str) -> str:
    """What the checks say of the file of row `r`: 1 flagged, 0 passed, -1 not checked (or not done)."""
    return (f"CASE WHEN {r}.status = 'done' THEN COALESCE((SELECT c.flagged FROM checks c WHERE c.rowid = "
            f"{_check_of(r)}), -1) ELSE -1 END")


def _tally(r: str, sign: str = "") -> str:
    """What row `r` adds to its tally (`sign` "-": takes away): the tallies' key, then the sums."""
    key = (f"{r}.status AS status, {r}.retryable AS retryable, {r}.copy_of IS NOT NULL AS copied, "
           f"{_verdict_of(r)} AS verdict")
    return (f"{key}, {sign}1 AS rows, {sign}COALESCE({r}.bytes, 0) AS bytes, "
            f"{sign}CAST(ROUND(COALESCE({r}.duration_s, 0) * 1e6) AS INTEGER) AS audio_us, "
            f"{sign}COALESCE({r}.chunks, 1) AS requests")


_GROUP = "status, retryable, copied, verdict"
_SUMS = ("rows", "bytes", "audio_us", "requests")
_TALLY_INTO = f"INSERT INTO tallies ({_GROUP}, {', '.join(_SUMS)})"
_ADDED = f"ON CONFLICT DO UPDATE SET {', '.join(f'{c} = {c} + excluded.{c}' for c in _SUMS)}"
# The rows' counts and sums by status and by what the audio checks said of their files, kept by
# triggers as rows are recorded (and by `record_check` as a check lands): `status` of ten million
# rows reads these few records, not every row. A row taken away is added negated; durations are
# summed in whole microseconds, so that adding and taking away never drifts.
_ADD = f"{_TALLY_INTO} SELECT {_tally('NEW')} WHERE true {_ADDED};"  # WHERE: as SQLite asks of an upsert's SELECT
_TAKE = f"{_TALLY_INTO} SELECT {_tally('OLD', '-')} WHERE true {_ADDED};"
TALLIES = Table("tallies", "status", (
    Column("status", "TEXT NOT NULL"), Column("retryable", "INTEGER NOT NULL"),
    Column("copied", "INTEGER NOT NULL"),  # done as a copy of an identical request's file
    Column("verdict", "INTEGER NOT NULL"),  # _verdict_of the rows
    Column("rows", "INTEGER NOT NULL"), Column("bytes", "INTEGER NOT NULL"), Column("audio_us", "INTEGER NOT NULL"),
    Column("requests", "INTEGER NOT NULL"),  # a copy's: the requests it saved (a long row's chunks)
), since=11, constraint=f"PRIMARY KEY ({_GROUP})", derived=(
    ("TRIGGER", "rows_tally_insert", f"AFTER INSERT ON rows BEGIN {_ADD} END"),
    ("TRIGGER", "rows_tally_update", "AFTER UPDATE OF status, retryable, copy_of, bytes, duration_s, chunks, sha256 "
                                     f"ON rows BEGIN {_TAKE} {_ADD} END"),
    ("TRIGGER", "rows_tally_delete", f"AFTER DELETE ON rows BEGIN {_TAKE} END"),
    # The copies of a file, whose verdict a check of it gives; the flagged files, for status to name.
    ("INDEX", "rows_copied_file", "ON rows (sha256) WHERE copy_of IS NOT NULL"),
    ("INDEX", "checks_flagged", "ON checks (sha256) WHERE flagged"),
))
TABLES = (ROWS, RUNS, CHUNKS, ATTEMPTS, MASTERED, CHECKS, TALLIES)
VERSION = 11  # PRAGMA user_version records how far a file is
# The run settings schema 3 keeps in columns, as earlier schemas logged them in the config column:
# the upgrade copies them over, and a ledger read as it is (status, export) is read through them.
_LOGGED_SETTINGS = {
    "out": "json_extract(config, '$.out')", "model": "json_extract(config, '$.defaults.model')",
    "voice": "json_extract(config, '$.defaults.voice')", "format": "json_extract(config, '$.defaults.format')",
    "speed": "json_extract(config, '$.defaults.speed')",
    "shard": "json_extract(config, '$.shard.index') || '/' || json_extract(config, '$.shard.count')",
}
# The chunking schema 6 keeps in columns, as the config column logged it. The lexicon and the cast
# were logged as names alone: a run recorded before schema 6 is read as having neither.
_LOGGED_CHUNKING = {"chunk_chars": "json_extract(config, '$.chunk_chars')", "limits": "json_extract(config, '$.limits')"}
_BACKFILL = {  # data each upgrade carries over, after its DDL
    3: f"UPDATE runs SET {', '.join(f'{name} = {logged}' for name, logged in _LOGGED_SETTINGS.items())};",
    6: f"UPDATE runs SET {', '.join(f'{name} = {logged}' for name, logged in _LOGGED_CHUNKING.items())};",
    # Before speaker pools a row's voice was its speaker. Its request is left unknown (the tags its
    # file holds were not recorded): rows done before schema 7 are not copied from.
    7: "UPDATE rows SET speaker = voice;",
    # The rows recorded before, counted once (a full pass, at the first run to open the ledger).
    11: f"{_TALLY_INTO} SELECT {_GROUP}, {', '.join(f'SUM({c})' for c in _SUMS)} "
        f"FROM (SELECT {_tally('r')} FROM rows r) GROUP BY {_GROUP};",
}


def upgrade(version: int) -> str:
    """The SQL that takes a ledger from schema `version - 1` to `version`. A new ledger is made at
    VERSION in one step from the same tables (`create`), which leaves it as the upgrades would."""
    return "".join(table.upgrade(version) for table in TABLES) + _BACKFILL.get(version, "")


def create() -> str:
    """The SQL that makes a new, empty ledger of schema VERSION: each table made whole, not built up
    by every upgrade (which would take twice as long, for the same tables)."""
    return "".join(table.create(VERSION) for table in TABLES if table.since <= VERSION)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class Entry(NamedTuple):
    """What the resume rule needs of a row's record: a tuple, as a rerun reads millions."""

    fingerprint: str
    status: str
    retryable: int  # 1: a failure the next run tries again
    path: str | None
    bytes: int | None
    key: str


_ENTRY = ", ".join(Entry._fields)
_entry = functools.partial(tuple.__new__, Entry)  # a record as SQLite returns it, made an Entry without a Python call
_key = operator.itemgetter(len(Entry._fields) - 1)
_RANGES_AFTER = 64  # batches looked up key by key after a range of the key index held too many others
LOOKUP_BATCH = 1000  # keys a query asks for: within SQLite's limit of 32,766 parameters


@dataclass(frozen=True, slots=True)
class Stored:
    """An audio file as it landed: what the ledger keeps of it."""

    path: str  # relative to the output folder
    bytes: int
    sha256: str
    sample_rate: int | None
    channels: int | None
    duration_s: float | None


class Attempt(NamedTuple):
    """One request as it settled: the columns of `attempts` after run_id, in order (a tuple, so a
    night's millions cost the run little)."""

    started: float  # epoch s
    latency_s: float
    row_number: int
    row_key: str
    chunk_index: int | None
    status: int | str  # an HTTP status, or the kind of fault of a request that got none
    bytes: int | None
    characters: int
    retry_after: float | None
    cost: float | None
    concurrency: int | None
    pace: float | None


_ADD_ATTEMPT = f"INSERT INTO attempts ({', '.join(ATTEMPTS.names)}) VALUES ({', '.join('?' * len(ATTEMPTS.names))})"


@dataclass(frozen=True)
class Planned:
    """A manifest file as a run planned it: while its size and mtime stay so, its rows are these."""

    bytes: int
    mtime_ns: int
    rows: int

    @classmethod
    def of(cls, manifest: Path, rows: int) -> Planned:
        found = os.stat(manifest)
        return cls(found.st_size, found.st_mtime_ns, rows)

    def same_file(self, manifest: Path) -> bool:
        try:
            found = os.stat(manifest)
        except OSError:
            return False
        return (found.st_size, found.st_mtime_ns) == (self.bytes, self.mtime_ns)


@dataclass(frozen=True)
class RunSettings:
    """What a run was of: read back by status and export, and checked by the next run."""

    manifest: str | None
    out: str | None  # a local folder, or a store URI without its secrets
    defaults: Defaults
    shard: str | None = None
    started_at: str | None = None
    # What shapes a row's words, voices and chunks, as the job's settings of the same names: the
    # planner's, so that status and export plan rows as the run did. A run recorded before schema 6
    # has its chunking alone.
    lexicon: Lexicon = field(default_factory=Lexicon)
    voices: Cast = field(default_factory=Cast)
    chunk_chars: int | None = None
    limits: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, job: Job) -> RunSettings:
        out = redact_uri(job.out) if isinstance(job.out, str) else str(job.out)
        return cls(str(job.manifest.resolve()), out, job.defaults, str(job.shard) if job.shard is not None else None,
                   lexicon=job.lexicon, voices=job.voices, chunk_chars=job.chunk_chars, limits=job.limits)

    def shaping(self) -> tuple[str, str, int | None, str]:
        """The lexicon, the cast and the chunking as the runs table keeps them (JSON but the number)."""
        entries = [{name: getattr(entry, name) for name in _LEXICON_FIELDS} for entry in self.lexicon.entries]
        return (json.dumps(entries, ensure_ascii=False), json.dumps(self.voices.as_table(), ensure_ascii=False),
                self.chunk_chars, json.dumps(self.limits, ensure_ascii=False))


_SHAPING = "lexicon, voices, chunk_chars, limits"  # RunSettings.shaping()'s columns, in order
_LEXICON_FIELDS = (*LEXICON_COLUMNS, "where")  # an entry's settings, and the file and line it came from


def _shaping(path: Path, lexicon: str | None, voices: str | None, chunk_chars: int | None,
             limits: str | None) -> dict[str, Any]:
    """RunSettings' lexicon, cast and chunking from their columns (NULL: none recorded)."""
    try:
        return {"lexicon": Lexicon(LexiconEntry(**entry) for entry in json.loads(lexicon or "[]")),
                "voices": Cast(json.loads(voices or "{}"), where="[voices]"),
                "chunk_chars": chunk_chars, "limits": dict(json.loads(limits or "{}"))}
    except (ValueError, TypeError, UsageError) as exc:
        raise LedgerError(f"ledger {path}: the last run's lexicon, [voices] or chunking cannot be read back ({exc}): "
                          "pass --job to plan rows with the job file's") from exc


P = ParamSpec("P")
R = TypeVar("R")


def _guarded(method: Callable[P, R]) -> Callable[P, R]:
    """SQLite's own errors leave a Ledger method as a LedgerError that says what to do."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except sqlite3.Error as exc:
            ledger = args[0]
            assert isinstance(ledger, Ledger)
            raise LedgerError(describe(ledger.path, exc)) from exc

    return wrapper


def describe(path: Path, exc: sqlite3.Error) -> str:
    """SQLite's message, and what the user can do about it."""
    text = str(exc)
    if "malformed" in text or "corrupt" in text:
        advice = "it is damaged: restore it from a backup, or move it away to start afresh (every row is then narrated again)"
    elif "not a database" in text:
        advice = "it is not a batchtts ledger (not an SQLite database): name another --ledger file"
    elif "readonly" in text or "read-only" in text:
        advice = "it is read-only here: status and export can read it; make it (and its folder) writable to run"
    elif "full" in text:
        advice = "the disk is full: free some space and run again to resume"
    elif "unable to open" in text:
        advice = "check that its folder exists and is writable"
    else:
        advice = "check the file and its folder"
    return f"ledger {path}: {text}: {advice}"


class Ledger:
    def __init__(self, path: Path, readonly: bool = False, on_write: Callable[[], None] | None = None) -> None:
        self.path = path
        self.on_write = on_write
        if not readonly:
            _check_writable(path)
        try:
            if readonly:
                self.db = connect_readonly(path)
                _check_ours(path, self.db)
            else:
                if not path.exists():
                    _create(path)
                self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
                _check_ours(path, self.db)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")
                self._migrate()
            self.db.execute("PRAGMA busy_timeout=5000")
        except sqlite3.Error as exc:
            raise LedgerError(describe(path, exc)) from exc
        except OSError as exc:
            raise LedgerError(f"cannot open ledger {path}: {exc.strerror or exc}") from exc
        self._in_transaction = False
        self.run_id: int | None = None  # the run this connection records, once started
        self._attempts: list[tuple[Any, ...]] = []
        self._ranges_after = 0  # lookups to go before keys are read as a range again (_entries)

    @classmethod
    def open_existing(cls, path: Path) -> Ledger:
        if not path.exists():
            raise UsageError(f"no ledger at {path}: run the job first, or give the path of its ledger file")
        return cls(path, readonly=True)

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > VERSION:
            raise LedgerError(f"ledger {self.path} was written by a newer batchtts (schema {version})")
        for number in range(version + 1, VERSION + 1):
            self.db.executescript(f"BEGIN; {upgrade(number)} PRAGMA user_version={number}; COMMIT;")

    @_guarded
    def lookup(self, key: str) -> Entry | None:
        found = self.db.execute(f"SELECT {_ENTRY} FROM rows WHERE key = ?", (key,)).fetchone()
        return _entry(found) if found else None

    @_guarded
    def lookup_many(self, keys: Sequence[str]) -> dict[str, Entry]:
        """`lookup` of many keys, one query per LOOKUP_BATCH of them: a rerun of millions of rows
        asks the ledger thousands of times, not millions."""
        found: dict[str, Entry] = {}
        for start in range(0, len(keys), LOOKUP_BATCH):
            entries = list(map(_entry, self._entries(keys[start:start + LOOKUP_BATCH])))
            found.update(zip(map(_key, entries), entries, strict=True))
        return found

    def _entries(self, keys: Sequence[str]) -> list[tuple[Any, ...]]:
        """The records of some keys. Keys close together in the key index (a manifest in key order,
        as datasets' ids mostly are) are read as one range of it, a third cheaper than a search for
        each; keys spread over it are searched for, and ranges not tried again for a while."""
        if self._ranges_after or len(keys) < 2:
            self._ranges_after = max(0, self._ranges_after - 1)
        else:
            most = 2 * len(keys)
            ranged = self.db.execute(f"SELECT {_ENTRY} FROM rows WHERE key BETWEEN ? AND ? LIMIT ?",
                                     (min(keys), max(keys), most)).fetchall()
            if len(ranged) < most:
                wanted = set(keys)
                return [entry for entry in ranged if entry[-1] in wanted]
            self._ranges_after = _RANGES_AFTER
        return self.db.execute(f"SELECT {_ENTRY} FROM rows WHERE key IN ({', '.join('?' * len(keys))})",
                               keys).fetchall()

    def record_done(self, row: Row, audio: Stored, attempts: int, latency_s: float | None,
                    generation_id: str | None, chunks: int | None = None) -> None:
        """The row's file is in place: the record that lets every later run skip it."""
        self._record_row(row, "done", audio, attempts=attempts, http_status=200, latency_s=latency_s,
                         generation_id=generation_id, chunks=chunks)

    def record_copy(self, row: Row, audio: Stored, source: str, chunks: int | None) -> None:
        """The row's file is in place, a copy of the file of row `source`, which answers the same request."""
        self._record_row(row, "done", audio, chunks=chunks, copy_of=source)

    def record_failed(self, row: Row, error: SpeechError, attempts: int, retryable: bool,
                      chunks: int | None = None, where: str = "", copy_of: str | None = None) -> None:
        """Why the row has no file; `retryable` rows are tried again by the next run. `copy_of`: the
        row whose failure it shares, as a copy of its request."""
        self._record_row(row, "failed", None, retryable=int(retryable), attempts=attempts, http_status=error.status,
                         error=where + error.message, chunks=chunks, copy_of=copy_of)

    def record_chunk_done(self, row: Row, index: int, text: str, audio: Stored, attempts: int,
                          latency_s: float | None, generation_id: str | None, voice: str | None = None) -> None:
        self._record_chunk(row, index, text, voice, "done", audio, attempts=attempts, http_status=200,
                           latency_s=latency_s, generation_id=generation_id)

    def record_chunk_failed(self, row: Row, index: int, text: str, error: SpeechError, attempts: int,
                            retryable: bool, voice: str | None = None) -> None:
        self._record_chunk(row, index, text, voice, "failed", None, retryable=int(retryable), attempts=attempts,
                           http_status=error.status, error=error.message)

    def _record_row(self, row: Row, status: str, audio: Stored | None, **values: Any) -> None:
        self._upsert(ROWS, {
            "key": row.key, "row_number": row.number, "fingerprint": row.fingerprint, "status": status,
            "model": row.model, "voice": row.pool or row.voice, "speaker": row.voice, "request": row.request,
            "format": row.format, "characters": len(row.text), **_audio(audio), **values,
        })

    def _record_chunk(self, row: Row, index: int, text: str, voice: str | None, status: str, audio: Stored | None,
                      **values: Any) -> None:
        """`voice`: the chunk's own, when voice markup gives it one."""
        self._upsert(CHUNKS, {
            "fingerprint": row.chunk_fingerprint(text, voice), "row_key": row.key, "chunk_index": index,
            "status": status, "characters": len(text), **_audio(audio), **values,
        })

    @_guarded
    def record_attempt(self, attempt: Attempt) -> None:
        """Held until the next group commit, which inserts them all in one statement: a request costs
        the ledger no statement of its own."""
        self._write()
        self._attempts.append((self.run_id, *attempt))

    def _write(self) -> None:
        """The first write since a commit opens the transaction and asks for the (group) commit."""
        if not self._in_transaction:
            self.db.execute("BEGIN")
            self._in_transaction = True
            if self.on_write is not None:
                self.on_write()

    @_guarded
    def _upsert(self, table: Table, values: dict[str, Any]) -> None:
        """Insert or replace one record; attempts add up while the fingerprint stays the same, and
        columns not given are reset to their defaults."""
        self._write()
        stamp = now()
        values = {**dict.fromkeys(table.names), "retryable": 0, "attempts": 0, **values,
                  "created_at": stamp, "updated_at": stamp}
        names = table.names
        updates = ", ".join(f"{c} = excluded.{c}" for c in names if c not in (table.key, "created_at", "attempts"))
        self.db.execute(
            f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))}) "
            f"ON CONFLICT({table.key}) DO UPDATE SET {updates}, attempts = CASE "
            f"WHEN {table.name}.fingerprint = excluded.fingerprint THEN {table.name}.attempts + excluded.attempts "
            f"ELSE excluded.attempts END",
            [values[c] for c in names],
        )

    @_guarded
    def commit(self) -> None:
        if self._in_transaction:
            if self._attempts:
                self.db.executemany(_ADD_ATTEMPT, self._attempts)
                self._attempts = []
            self._in_transaction = False
            self.db.execute("COMMIT")

    @_guarded
    def chunk(self, fingerprint: str) -> dict[str, Any] | None:
        return self._get(CHUNKS, fingerprint)

    @_guarded
    def get(self, key: str) -> dict[str, Any] | None:
        return self._get(ROWS, key)

    @_guarded
    def done_with(self, request: str, besides: str, limit: int = 4) -> list[tuple[str, str, int]]:
        """Rows other than `besides` done with this request: (key, path, bytes) of a few, to copy."""
        if self.version < 7:
            return []
        return self.db.execute("SELECT key, path, bytes FROM rows WHERE request = ? AND status = 'done' AND key != ? "
                               "LIMIT ?", (request, besides, limit)).fetchall()

    @_guarded
    def copyable(self) -> bool:
        """Whether any row is recorded with its request, for identical rows to copy its file."""
        return self.version >= 7 and bool(
            self.db.execute("SELECT EXISTS (SELECT 1 FROM rows WHERE request IS NOT NULL)").fetchone()[0])

    @_guarded
    def copies(self) -> tuple[int, int]:
        """Rows done as copies of an identical row's file, and the requests that saved (a long row's chunks)."""
        if self.version < 7:
            return 0, 0
        counted = "SUM(rows), SUM(requests) FROM tallies WHERE status = 'done' AND copied" if self.tallied else \
            "COUNT(*), SUM(COALESCE(chunks, 1)) FROM rows WHERE status = 'done' AND copy_of IS NOT NULL"
        rows, saved = self.db.execute(f"SELECT {counted}").fetchone()
        return rows or 0, saved or 0

    @_guarded
    def done_rows(self) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
        """Each row done, in manifest order, with its mastered record (None when it has none): what
        mastering and QC go through."""
        columns = "key, row_number, path, bytes, sha256, format, sample_rate, channels, duration_s"
        done = self.db.execute(f"SELECT {columns} FROM rows WHERE status = 'done' ORDER BY row_number")
        names = [d[0] for d in done.description]
        rows = [dict(zip(names, r, strict=True)) for r in done]
        return [(row, self._get(MASTERED, row["key"])) for row in rows]

    @_guarded
    def record_mastered(self, key: str, **values: Any) -> None:
        """What mastering made of a row, or why it could not: replaces what it made before."""
        self._write()
        stamp = now()
        record = {**dict.fromkeys(MASTERED.names), **values, "key": key, "created_at": stamp, "updated_at": stamp}
        names = MASTERED.names
        updates = ", ".join(f"{c} = excluded.{c}" for c in names if c not in ("key", "created_at"))
        self.db.execute(
            f"INSERT INTO mastered ({', '.join(names)}) VALUES ({', '.join('?' * len(names))}) "
            f"ON CONFLICT(key) DO UPDATE SET {updates}",
            [record[c] for c in names],
        )

    @_guarded
    def record_check(self, row: Row, sha256: str, verdict: dict[str, Any], redo: bool = False) -> None:
        """The audio checks' verdict on a file of the row (checks.Verdict.record), in place of the one
        before. `redo`: the file is a take of the flagged row narrated again, and counts against its
        redos; otherwise the row's redos stand while its fingerprint does."""
        self._write()
        stamp = now()
        record = {**dict.fromkeys(CHECKS.names), **verdict, "key": row.key, "fingerprint": row.fingerprint,
                  "sha256": sha256, "redos": int(redo), "created_at": stamp, "updated_at": stamp}
        names = CHECKS.names
        updates = ", ".join(f"{c} = excluded.{c}" for c in names if c not in ("key", "created_at", "redos"))
        # The rows whose verdict this record may change, the row's own and the copies of its file (as
        # it was and as it is), move from their tally to the one of their verdict now.
        before = self.db.execute("SELECT sha256 FROM checks WHERE key = ?", (row.key,)).fetchone()
        spoken = ("FROM rows r WHERE r.key IN (SELECT ? UNION SELECT key FROM rows WHERE copy_of IS NOT NULL "
                  "AND sha256 IN (?, ?))")
        moved = (row.key, sha256, before[0] if before else sha256)
        if self.tallied:
            self.db.execute(f"{_TALLY_INTO} SELECT {_tally('r', '-')} {spoken} {_ADDED}", moved)
        self.db.execute(
            f"INSERT INTO checks ({', '.join(names)}) VALUES ({', '.join('?' * len(names))}) "
            f"ON CONFLICT(key) DO UPDATE SET {updates}, redos = CASE WHEN checks.fingerprint = excluded.fingerprint "
            "THEN checks.redos + excluded.redos ELSE excluded.redos END",
            [record[c] for c in names],
        )
        if self.tallied:
            self.db.execute(f"{_TALLY_INTO} SELECT {_tally('r')} {spoken} {_ADDED}", moved)

    @_guarded
    def checked(self, key: str) -> dict[str, Any] | None:
        """The checks' verdict on the row's file as it is now: the row's own record of that file, or for
        a copy the first record of the file it copies; None when the row is not done, or its file was
        not checked."""
        return self.checked_many([key]).get(key)

    @_guarded
    def checked_many(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """`checked` of many keys together, by the row's key (a copy's verdict is its source's)."""
        if self.version < CHECKS.since:
            return {}
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(keys), LOOKUP_BATCH):
            batch = keys[start:start + LOOKUP_BATCH]
            # `+r.status`: the keys' index finds the rows; by the status index, SQLite would read every row done.
            cur = self.db.execute(f"SELECT r.key AS row_key, v.* FROM rows r JOIN checks v ON v.rowid = {_check_of('r')} "
                                  f"WHERE r.key IN ({', '.join('?' * len(batch))}) AND +r.status = 'done'", batch)
            names = [d[0] for d in cur.description][1:]
            for row_key, *values in cur:
                found[row_key] = dict(zip(names, values, strict=True))
        return found

    @_guarded
    def flags(self, limit: int | None = None) -> tuple[int, int, list[dict[str, Any]]]:
        """Rows done whose file was checked, those flagged, and the first `limit` of these with why."""
        if self.version < CHECKS.since:
            return 0, 0, []
        if self.tallied:
            checked, flagged = self.db.execute("SELECT TOTAL(rows) FILTER (WHERE verdict >= 0), TOTAL(rows) "
                                               "FILTER (WHERE verdict = 1) FROM tallies WHERE status = 'done'").fetchone()
            # The rows of the flagged files only: the own rows of flagged records, and the copies of their files.
            among = ("AND r.key IN (SELECT key FROM checks WHERE flagged UNION SELECT key FROM rows "
                     "WHERE copy_of IS NOT NULL AND sha256 IN (SELECT sha256 FROM checks WHERE flagged))")
        else:
            checked, flagged = self.db.execute(
                f"SELECT COUNT(*), TOTAL(v.flagged) FROM rows r JOIN checks v ON v.rowid = {_check_of('r')} "
                "WHERE r.status = 'done'").fetchone()
            among = ""
        if not flagged:
            return int(checked), 0, []
        cur = self.db.execute(f"SELECT r.key, r.row_number, v.flag_reasons, v.redos FROM rows r JOIN checks v "
                              f"ON v.rowid = {_check_of('r')} WHERE r.status = 'done' AND v.flagged = 1 {among} "
                              "ORDER BY r.row_number" + (f" LIMIT {int(limit)}" if limit else ""))
        names = [d[0] for d in cur.description]
        return int(checked), int(flagged), [dict(zip(names, r, strict=True)) for r in cur]

    def _get(self, table: Table, key: str) -> dict[str, Any] | None:
        """One record; from a ledger of an earlier schema (read as it is), the columns it has."""
        return self._get_many(table, [key]).get(key)

    def _get_many(self, table: Table, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Records by key, one query per LOOKUP_BATCH keys."""
        version = self.version
        if table.since > version:
            return {}
        names = tuple(c.name for c in table.columns if c.since <= version)
        at = names.index(table.key)
        older = names != table.names  # a ledger of an earlier schema: the columns it lacks are None
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(keys), LOOKUP_BATCH):
            batch = keys[start:start + LOOKUP_BATCH]
            query = f"SELECT {', '.join(names)} FROM {table.name} WHERE {table.key} IN ({', '.join('?' * len(batch))})"
            for values in self.db.execute(query, batch):
                record = dict(zip(names, values, strict=True))
                found[values[at]] = {**dict.fromkeys(table.names), **record} if older else record
        return found

    @_guarded
    def get_many(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """`get` of many keys together."""
        return self._get_many(ROWS, keys)

    @_guarded
    def mastered_many(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The records of the rows' mastered files, by key."""
        return self._get_many(MASTERED, keys)

    @functools.cached_property
    def version(self) -> int:
        """The schema version of the file: the latest once a run opened it, earlier if only read."""
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    @property
    def tallied(self) -> bool:
        """Whether the rows' counts and sums are kept in the tallies table (schema 11 on)."""
        return self.version >= TALLIES.since

    @_guarded
    def start_run(self, settings: RunSettings, config: dict[str, Any]) -> int:
        self.commit()
        defaults = settings.defaults
        cur = self.db.execute(
            f"INSERT INTO runs (started_at, manifest, config, out, model, voice, format, speed, shard, {_SHAPING}, "
            "output_rate, output_channels) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (now(), settings.manifest, json.dumps(config, default=str), settings.out, defaults.model, defaults.voice,
             defaults.format, defaults.speed, settings.shard, *settings.shaping(), defaults.output.sample_rate,
             defaults.output.channels),
        )
        assert cur.lastrowid is not None
        self.run_id = cur.lastrowid
        return cur.lastrowid

    @_guarded
    def record_planned(self, run_id: int, planned: Planned) -> None:
        """The manifest the run planned, and found the ledger to hold only rows of, as they are."""
        self.commit()
        self.db.execute("UPDATE runs SET manifest_bytes = ?, manifest_mtime_ns = ?, manifest_rows = ? WHERE id = ?",
                        (planned.bytes, planned.mtime_ns, planned.rows, run_id))

    @_guarded
    def planned(self) -> Planned | None:
        """What the newest run recorded with `record_planned`, if it did."""
        if self.version < 9:
            return None
        found = self.db.execute("SELECT manifest_bytes, manifest_mtime_ns, manifest_rows FROM runs "
                                "ORDER BY id DESC LIMIT 1").fetchone()
        return Planned(*found) if found is not None and None not in found else None

    @_guarded
    def row_count(self) -> int:
        """The rows recorded: from the tallies (before schema 11, counted; a pass over ten million
        rows' index takes seconds)."""
        counted = "TOTAL(rows) FROM tallies" if self.tallied else "COUNT(*) FROM rows"
        return int(self.db.execute(f"SELECT {counted}").fetchone()[0])

    @_guarded
    def counts(self) -> tuple[int, int, int]:
        """Rows done, failed, and of those failed, retried by the next run: from the tallies (before
        schema 11, counted on the status index)."""
        if self.tallied:
            done, failed, retried = self.db.execute(
                "SELECT TOTAL(rows) FILTER (WHERE status = 'done'), TOTAL(rows) FILTER (WHERE status = 'failed'), "
                "TOTAL(rows) FILTER (WHERE status = 'failed' AND retryable) FROM tallies").fetchone()
            done, failed, retried = int(done), int(failed), int(retried)
        else:
            done, failed = (int(self.db.execute("SELECT COUNT(*) FROM rows WHERE status = ?", (status,)).fetchone()[0])
                            for status in ("done", "failed"))
            retried = self.db.execute("SELECT COUNT(*) FROM rows WHERE status = 'failed' AND retryable").fetchone()[0]
        # Read through the key index too, as planning every row would: the two agree, or the file is damaged.
        keyed = int(self.db.execute("SELECT COUNT(*) FROM rows WHERE key >= ''").fetchone()[0])
        if keyed != done + failed:
            raise LedgerError(f"ledger {self.path}: its index of keys holds {keyed:,} rows where it records {done + failed:,}: "
                              "it is damaged: restore it from a backup, or move it away to start afresh (every row is "
                              "then narrated again)")
        return done, failed, int(retried)

    @_guarded
    def finish_run(self, run_id: int, exit_code: int, summary: dict[str, Any]) -> None:
        self.commit()
        self.db.execute(
            "UPDATE runs SET finished_at = ?, exit_code = ?, summary = ? WHERE id = ?",
            (now(), exit_code, json.dumps(summary), run_id),
        )

    @_guarded
    def last_run(self) -> RunSettings | None:
        """The newest run's settings; from a ledger of an earlier schema, read only, as it logged them."""
        settings = ", ".join(_LOGGED_SETTINGS if self.version >= 3 else _LOGGED_SETTINGS.values())
        shaping = _SHAPING if self.version >= 6 else f"NULL, NULL, {', '.join(_LOGGED_CHUNKING.values())}"
        output = "output_rate, output_channels" if self.version >= 10 else "NULL, NULL"
        found = self.db.execute(
            f"SELECT manifest, {settings}, started_at, {output}, {shaping} FROM runs ORDER BY id DESC LIMIT 1").fetchone()
        if found is None:
            return None
        manifest, out, model, voice, fmt, speed, shard, started_at, rate, channels, *shaped = found
        defaults = Defaults(model, voice, fmt or Defaults.format, speed, Output(rate, channels))
        return RunSettings(manifest, out, defaults, shard, started_at, **_shaping(self.path, *shaped))

    def check_place(self, job: Job) -> None:
        """A ledger is trusted for what is in the bucket it recorded: refuse to read it as another's."""
        if not isinstance(job.out, str):
            return  # a local folder is checked file by file

        def place(uri: str) -> str:  # the bucket and prefix, without options such as the endpoint
            return uri.partition("?")[0].rstrip("/")

        last = self.last_run()
        recorded = last.out or "" if last is not None else ""
        here = redact_uri(job.out)
        if recorded and place(recorded) != place(here):
            raise UsageError(
                f"{job.ledger_path} records the audio of {place(recorded)}, not of {place(here)}: it would take that "
                "audio as already here. Give each place a ledger of its own (--ledger)"
            )

    @_guarded
    def totals(self) -> dict[str, dict[str, float]]:
        summed = "SUM(rows), SUM(bytes), SUM(audio_us) / 1e6 FROM tallies GROUP BY status HAVING SUM(rows)" \
            if self.tallied else "COUNT(*), SUM(bytes), SUM(duration_s) FROM rows GROUP BY status"
        return {status: {"rows": n, "bytes": b or 0, "duration_s": d or 0.0}
                for status, n, b, d in self.db.execute(f"SELECT status, {summed}")}

    @_guarded
    def failures(self, limit: int | None = None) -> list[dict[str, Any]]:
        cur = self.db.execute(
            "SELECT key, row_number, http_status, error, attempts, retryable FROM rows "
            "WHERE status = 'failed' ORDER BY row_number" + (f" LIMIT {int(limit)}" if limit else "")
        )
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur]

    def close(self) -> None:
        """Commit what is pending and close; the connection is closed even when the commit fails."""
        try:
            self.commit()
        finally:
            self.db.close()

    def remove(self) -> None:
        """Delete the closed ledger's files."""
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)


def _audio(audio: Stored | None) -> dict[str, Any]:
    return asdict(audio) if audio is not None else {}


def connect_readonly(path: Path) -> sqlite3.Connection:
    """Open a ledger to read it, changing nothing. Where the folder is writable the connection may
    write but refuses to (query_only), so that SQLite, closing the last connection, removes the -wal
    and -shm files that reading a ledger in WAL mode makes. A read-only folder cannot hold them:
    there, with no run writing (none could), the ledger is read as immutable."""
    uri = path.resolve().as_uri()
    if os.access(path, os.W_OK) and os.access(path.parent, os.W_OK):
        db = sqlite3.connect(f"{uri}?mode=rw", uri=True, check_same_thread=False)
        db.execute("PRAGMA query_only = ON")
        return db
    db = sqlite3.connect(f"{uri}?mode=ro", uri=True, check_same_thread=False)
    try:
        db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        return db
    except sqlite3.OperationalError:
        db.close()
        if os.access(path.parent, os.W_OK):
            raise
    return sqlite3.connect(f"{uri}?immutable=1", uri=True, check_same_thread=False)


def _create(path: Path) -> None:
    """Make a new ledger beside `path` and rename it into place: a ledger file is never seen empty
    or half set up, even by a run killed while creating it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = path.with_name(f".{path.name}.new-{os.getpid()}")
    new.unlink(missing_ok=True)
    db = sqlite3.connect(new, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        # One transaction: the file is seen by no one before it is renamed, and one commit syncs the disk.
        db.executescript(f"BEGIN; {create()} PRAGMA user_version={VERSION}; COMMIT;")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    for suffix in ("-wal", "-shm"):
        Path(f"{new}{suffix}").unlink(missing_ok=True)
    os.replace(new, path)


def _check_writable(path: Path) -> None:
    """Refuse, before SQLite touches it, a file no run should write: empty (never a ledger: SQLite
    would take it as new and every row would be bought again) or read-only."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return
    except OSError as exc:
        raise LedgerError(f"cannot open ledger {path}: {exc.strerror}") from exc
    if size == 0:
        raise _empty_file(path)
    if not os.access(path, os.W_OK) or not os.access(path.parent, os.W_OK | os.X_OK):
        raise LedgerError(f"ledger {path} is read-only here: status and export can read it; make it (and its "
                          "folder) writable to run")


def _empty_file(path: Path) -> LedgerError:
    return LedgerError(f"ledger {path} is an empty file, not a ledger batchtts wrote: remove it to start "
                       "afresh, or name the right --ledger file")


def _check_ours(path: Path, db: sqlite3.Connection) -> None:
    """Refuse another program's SQLite database before any table is added to it."""
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if tables and not ({"rows", "runs"} <= tables and version > 0):
        raise LedgerError(f"{path} is another program's SQLite database (tables: {', '.join(sorted(tables))}), "
                          "not a batchtts ledger: name another --ledger file")


@dataclass(frozen=True)
class Usage:
    runs: bool  # a run got as far as starting: the ledger speaks for its job
    rows: bool  # rows are recorded: audio was paid for


def usage(path: Path) -> Usage | None:
    """What a file holds as a ledger; None when it is not one (not SQLite, another program's database).
    An empty, damaged or unreadable file raises LedgerError: called "no ledger", it would send the
    user looking for another one instead of restoring this one."""
    if path.stat().st_size == 0:
        raise _empty_file(path)
    try:
        db = connect_readonly(path)
        try:
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not tables:
                return Usage(runs=False, rows=False)  # created, not yet set up
            if not {"runs", "rows"} <= tables:
                return None
            return Usage(runs=db.execute("SELECT EXISTS (SELECT 1 FROM runs)").fetchone()[0] == 1,
                         rows=db.execute("SELECT EXISTS (SELECT 1 FROM rows)").fetchone()[0] == 1)
        finally:
            db.close()
    except sqlite3.Error as exc:
        if getattr(exc, "sqlite_errorname", None) == "SQLITE_NOTADB":
            return None
        raise LedgerError(describe(path, exc)) from exc


def _in_use(named: Path, listed: Sequence[Path] | None = None) -> dict[Path, tuple[Shard | None, Usage]]:
    """The ledger named and its shards' beside it, each with a run, and what they hold; `listed`: the
    folder's files already listed, not listed again."""
    candidates: dict[Path, Shard | None] = {named: None} if named.is_file() else {}
    prefix = f"{named.stem}-shard-"
    beside = _beside(named.parent, prefix, named.suffix) if listed is None else \
        [p for p in listed if p.name.startswith(prefix) and p.name.endswith(named.suffix)]
    for path in beside:
        parent, shard = named_ledger(path)
        # An empty shard's file holds nothing to speak for: it is passed over here, and refused by
        # whatever names it (its shard's run, status or export given the file).
        if shard is not None and parent == named and ledger_for(named, shard) == path and path.stat().st_size:
            candidates[path] = shard
    found = {path: (shard, usage(path)) for path, shard in candidates.items()}
    return {path: (shard, used) for path, (shard, used) in found.items() if used is not None and used.runs}


def _beside(folder: Path, prefix: str, suffix: str) -> list[Path]:
    """The files of the folder whose names start and end so, from one pass over its entries, a
    comparison each: the folder may hold millions of audio files."""
    try:
        with os.scandir(folder) as entries:
            return sorted(folder / e.name for e in entries if e.name.startswith(prefix) and e.name.endswith(suffix))
    except OSError:  # not there, or not to be listed: no shard beside it
        return []


def holds_rows(named: Path) -> bool:
    """Whether a job's own ledger holds rows: then it is the job's only ledger that does (a run
    refuses shards beside it, check_layout), and readers need not list its folder for shards'."""
    return named.is_file() and (used := usage(named)) is not None and used.rows


def ledger_family(named: Path, listed: Sequence[Path] | None = None) -> dict[Path, Shard | None]:
    """The ledgers of one job in use: the one named, and its shards' beside it (among `listed`, the
    folder's ledger files, when the caller has listed them)."""
    return {path: shard for path, (shard, _) in _in_use(named, listed).items()}


def _layout(shard: Shard | None) -> int | None:
    """How a job is split: its number of shards, None when it is not."""
    return None if shard is None else shard.count


def check_layout(named: Path, shard: Shard | None, listed: Sequence[Path] | None = None) -> None:
    """Refuse a run whose shard layout differs from the ledgers its job already has: the rows they
    hold would be looked up in another ledger, not found, and narrated (and paid for) again.
    `listed`: the ledger files of the folder, when the caller has listed it."""
    clash = {
        f"{theirs.count} shards" if theirs is not None else "no shards"
        for theirs, used in _in_use(named, listed).values()
        if _layout(theirs) != _layout(shard) and used.rows
    }
    if clash:
        mine = f"shard {shard}" if shard is not None else "not sharded"
        raise UsageError(
            f"{named.parent} holds ledgers of this job run with {' and '.join(sorted(clash))}; this run is "
            f"{mine}, so the rows they hold would be narrated again. Keep the layout the job started with "
            "(the same N in --shard I/N or --shards N), or move those ledgers away"
        )


class LedgerSet:
    """Several ledgers read as one: the shards of a job, for `status` and `export`.

    When the ledgers are shards of one count, a key is looked up in its shard's ledger only. As a
    whole job (a folder, or a job file, was named), the rows of shards that have no ledger yet count
    as pending; as named files, the view is those shards' rows.
    """

    def __init__(self, ledgers: list[Ledger], whole_job: bool = False) -> None:
        self.ledgers = ledgers
        self.path = ledgers[0].path
        self.whole_job = whole_job
        self.count: int | None = None
        self._by_shard: dict[int, Ledger] = {}
        shards = {ledger: named_ledger(ledger.path)[1] for ledger in ledgers}
        if len({_layout(s) for s in shards.values()}) > 1:
            names = ", ".join(ledger.path.name for ledger in ledgers)
            raise UsageError(f"these ledgers are of different shard layouts ({names}): name the ledgers of one")
        for ledger, shard in shards.items():
            if shard is not None:
                if shard.index in self._by_shard:
                    raise UsageError(f"two ledgers hold shard {shard}: {self._by_shard[shard.index].path} and {ledger.path}")
                self._by_shard[shard.index] = ledger
                self.count = shard.count

    @property
    def missing_shards(self) -> list[int]:
        """Shards of the job with no ledger yet (none started, or not on this disk)."""
        if self.count is None or not self.whole_job:
            return []
        return [i for i in range(self.count) if i not in self._by_shard]

    @property
    def in_view(self) -> Callable[[str], bool] | None:
        """`owns`, or None when every row is in view: for a planner, which then plans batches of
        plain rows at once (columnar.py)."""
        return None if self.count is None or self.whole_job else self.owns

    def owns(self, key: str) -> bool:
        """Whether the key's row is in view: every row of a whole job, else those of the shards named."""
        return self.count is None or self.whole_job or shard_of(key, self.count) in self._by_shard

    def _for(self, key: str) -> list[Ledger]:
        if self.count is None:
            return self.ledgers
        ledger = self._by_shard.get(shard_of(key, self.count))
        return [ledger] if ledger is not None else []

    def lookup(self, key: str) -> Entry | None:
        return next((e for ledger in self._for(key) if (e := ledger.lookup(key)) is not None), None)

    def lookup_many(self, keys: Sequence[str]) -> dict[str, Entry]:
        """Each key looked up in its shard's ledger (every ledger when they are not shards)."""
        return self._many(keys, Ledger.lookup_many)

    def _many(self, keys: Sequence[str], read: Callable[[Ledger, Sequence[str]], dict[str, R]]) -> dict[str, R]:
        """Records of many keys, each from its shard's ledger (the first that has it, when they are not shards)."""
        found: dict[str, R] = {}
        if self.count is None:
            for ledger in self.ledgers:
                found.update(read(ledger, [k for k in keys if k not in found]))
            return found
        by_ledger: dict[Ledger, list[str]] = {}
        for key in keys:
            for ledger in self._for(key):
                by_ledger.setdefault(ledger, []).append(key)
        for ledger, mine in by_ledger.items():
            found.update(read(ledger, mine))
        return found

    def get_many(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        return self._many(keys, Ledger.get_many)

    def mastered_many(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        return self._many(keys, Ledger.mastered_many)

    def checked_many(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        return self._many(keys, Ledger.checked_many)

    def chunk(self, fingerprint: str) -> dict[str, Any] | None:
        return next((c for ledger in self.ledgers if (c := ledger.chunk(fingerprint)) is not None), None)

    def copies(self) -> tuple[int, int]:
        counts = [ledger.copies() for ledger in self.ledgers]
        return sum(rows for rows, _ in counts), sum(saved for _, saved in counts)

    def checked(self, key: str) -> dict[str, Any] | None:
        return next((c for ledger in self._for(key) if (c := ledger.checked(key)) is not None), None)

    def flags(self, limit: int | None = None) -> tuple[int, int, list[dict[str, Any]]]:
        found = [ledger.flags(limit) for ledger in self.ledgers]
        rows = sorted((row for _, _, listed in found for row in listed), key=lambda f: f["row_number"] or 0)
        return sum(c for c, _, _ in found), sum(f for _, f, _ in found), rows[:limit] if limit else rows

    def last_run(self) -> RunSettings | None:
        """The newest run any of the ledgers recorded: it names the manifest and defaults."""
        runs = [r for ledger in self.ledgers if (r := ledger.last_run()) is not None]
        return max(runs, key=lambda r: r.started_at or "", default=None)

    def totals(self) -> dict[str, dict[str, float]]:
        merged: dict[str, dict[str, float]] = {}
        for ledger in self.ledgers:
            for status, values in ledger.totals().items():
                into = merged.setdefault(status, {"rows": 0, "bytes": 0, "duration_s": 0.0})
                for name, value in values.items():
                    into[name] += value
        return merged

    def failures(self, limit: int | None = None) -> list[dict[str, Any]]:
        found = [f for ledger in self.ledgers for f in ledger.failures(limit)]
        found.sort(key=lambda f: f["row_number"] or 0)
        return found[:limit] if limit else found

    def close(self) -> None:
        for ledger in self.ledgers:
            ledger.close()
