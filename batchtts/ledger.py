"""The results ledger: one SQLite row per manifest key, the record that makes every rerun resumable.

WAL mode with synchronous=NORMAL: a commit survives kill -9 (it is in the WAL before the call
returns) without an fsync. Commits are grouped: the first write of a transaction asks the caller
(`on_write`, the runner's event loop) to commit soon, and every row that finishes before then joins
that commit, so finished rows reach the WAL within a turn of the event loop and a kill -9 costs
only the rows in flight. A row is written only after its audio file has been renamed into place,
so "done" in the ledger always names a complete file.

A ledger is only ever opened as one: an empty file, another program's database, a damaged or
read-only file is refused (LedgerError) and never modified.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from .errors import LedgerError, UsageError
from .sharding import Shard, ledger_for, named_ledger, shard_of

# Each entry upgrades the schema by one version; PRAGMA user_version records how far a file is.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE rows (
        key           TEXT PRIMARY KEY,
        row_number    INTEGER,
        fingerprint   TEXT NOT NULL,
        status        TEXT NOT NULL CHECK (status IN ('done', 'failed')),
        retryable     INTEGER NOT NULL DEFAULT 0,
        path          TEXT,
        bytes         INTEGER,
        sha256        TEXT,
        sample_rate   INTEGER,
        channels      INTEGER,
        duration_s    REAL,
        model         TEXT,
        voice         TEXT,
        format        TEXT,
        characters    INTEGER,
        attempts      INTEGER NOT NULL DEFAULT 0,
        http_status   INTEGER,
        error         TEXT,
        generation_id TEXT,
        latency_s     REAL,
        created_at    TEXT NOT NULL,
        updated_at    TEXT NOT NULL
    );
    CREATE INDEX rows_status ON rows (status);
    CREATE TABLE runs (
        id          INTEGER PRIMARY KEY,
        started_at  TEXT NOT NULL,
        finished_at TEXT,
        manifest    TEXT,
        config      TEXT,
        exit_code   INTEGER,
        summary     TEXT
    );
    """,
    """
    ALTER TABLE rows ADD COLUMN chunks INTEGER;
    CREATE TABLE chunks (
        fingerprint   TEXT PRIMARY KEY,
        row_key       TEXT NOT NULL,
        chunk_index   INTEGER NOT NULL,
        status        TEXT NOT NULL CHECK (status IN ('done', 'failed')),
        retryable     INTEGER NOT NULL DEFAULT 0,
        path          TEXT,
        bytes         INTEGER,
        sha256        TEXT,
        sample_rate   INTEGER,
        channels      INTEGER,
        duration_s    REAL,
        characters    INTEGER,
        attempts      INTEGER NOT NULL DEFAULT 0,
        http_status   INTEGER,
        error         TEXT,
        generation_id TEXT,
        latency_s     REAL,
        created_at    TEXT NOT NULL,
        updated_at    TEXT NOT NULL
    );
    CREATE INDEX chunks_row ON chunks (row_key);
    """,
)

COLUMNS = (
    "key", "row_number", "fingerprint", "status", "retryable", "path", "bytes", "sha256", "sample_rate",
    "channels", "duration_s", "model", "voice", "format", "characters", "attempts", "http_status", "error",
    "generation_id", "latency_s", "chunks", "created_at", "updated_at",
)
CHUNK_COLUMNS = (
    "fingerprint", "row_key", "chunk_index", "status", "retryable", "path", "bytes", "sha256", "sample_rate",
    "channels", "duration_s", "characters", "attempts", "http_status", "error", "generation_id", "latency_s",
    "created_at", "updated_at",
)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True, slots=True)
class Entry:
    fingerprint: str
    status: str
    retryable: bool
    path: str | None
    bytes: int | None


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

    @classmethod
    def open_existing(cls, path: Path) -> Ledger:
        if not path.exists():
            raise UsageError(f"no ledger at {path}: run the job first, or give the path of its ledger file")
        return cls(path, readonly=True)

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise LedgerError(f"ledger {self.path} was written by a newer batchtts (schema {version})")
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            self.db.executescript(f"BEGIN; {script}; PRAGMA user_version={number}; COMMIT;")

    @_guarded
    def lookup(self, key: str) -> Entry | None:
        found = self.db.execute(
            "SELECT fingerprint, status, retryable, path, bytes FROM rows WHERE key = ?", (key,)
        ).fetchone()
        return Entry(found[0], found[1], bool(found[2]), found[3], found[4]) if found else None

    @_guarded
    def record(self, **values: Any) -> None:
        """Insert or replace one key's row; attempts add up while the fingerprint stays the same."""
        self._upsert("rows", "key", COLUMNS, values)

    @_guarded
    def record_chunk(self, **values: Any) -> None:
        self._upsert("chunks", "fingerprint", CHUNK_COLUMNS, values)

    def _upsert(self, table: str, key: str, columns: tuple[str, ...], values: dict[str, Any]) -> None:
        if not self._in_transaction:
            self.db.execute("BEGIN")
            self._in_transaction = True
            if self.on_write is not None:
                self.on_write()
        stamp = now()
        values = {**values, "created_at": stamp, "updated_at": stamp}
        names = [c for c in columns if c in values]
        updates = ", ".join(f"{c} = excluded.{c}" for c in names if c not in (key, "created_at", "attempts"))
        self.db.execute(
            f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))}) "
            f"ON CONFLICT({key}) DO UPDATE SET {updates}, attempts = CASE "
            f"WHEN {table}.fingerprint = excluded.fingerprint THEN {table}.attempts + excluded.attempts "
            f"ELSE excluded.attempts END",
            [values[c] for c in names],
        )

    @_guarded
    def commit(self) -> None:
        if self._in_transaction:
            self._in_transaction = False
            self.db.execute("COMMIT")

    @_guarded
    def chunk(self, fingerprint: str) -> dict[str, Any] | None:
        found = self.db.execute(
            f"SELECT {', '.join(CHUNK_COLUMNS)} FROM chunks WHERE fingerprint = ?", (fingerprint,)
        ).fetchone()
        return dict(zip(CHUNK_COLUMNS, found, strict=True)) if found else None

    @_guarded
    def start_run(self, manifest: Path, config: dict[str, Any]) -> int:
        self.commit()
        cur = self.db.execute(
            "INSERT INTO runs (started_at, manifest, config) VALUES (?, ?, ?)",
            (now(), str(manifest), json.dumps(config, default=str)),
        )
        return int(cur.lastrowid)

    @_guarded
    def finish_run(self, run_id: int, exit_code: int, summary: dict[str, Any]) -> None:
        self.commit()
        self.db.execute(
            "UPDATE runs SET finished_at = ?, exit_code = ?, summary = ? WHERE id = ?",
            (now(), exit_code, json.dumps(summary), run_id),
        )

    @_guarded
    def last_run(self) -> dict[str, Any] | None:
        found = self.db.execute("SELECT manifest, config, started_at FROM runs ORDER BY id DESC LIMIT 1").fetchone()
        return {"manifest": found[0], "config": json.loads(found[1] or "{}"), "started_at": found[2]} if found else None

    @_guarded
    def totals(self) -> dict[str, dict[str, float]]:
        return {
            status: {"rows": n, "bytes": b or 0, "duration_s": d or 0.0}
            for status, n, b, d in self.db.execute(
                "SELECT status, COUNT(*), SUM(bytes), SUM(duration_s) FROM rows GROUP BY status"
            )
        }

    @_guarded
    def failures(self, limit: int | None = None) -> list[dict[str, Any]]:
        cur = self.db.execute(
            "SELECT key, row_number, http_status, error, attempts, retryable FROM rows "
            "WHERE status = 'failed' ORDER BY row_number" + (f" LIMIT {int(limit)}" if limit else "")
        )
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur]

    @_guarded
    def get(self, key: str) -> dict[str, Any] | None:
        found = self.db.execute(f"SELECT {', '.join(COLUMNS)} FROM rows WHERE key = ?", (key,)).fetchone()
        return dict(zip(COLUMNS, found, strict=True)) if found else None

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


def connect_readonly(path: Path) -> sqlite3.Connection:
    """Open a ledger to read it, changing nothing. A ledger in WAL mode needs its -shm file, which a
    read-only folder cannot hold: there, with no run writing (none could), it is read as immutable."""
    uri = path.resolve().as_uri()
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
        for number, script in enumerate(MIGRATIONS, start=1):
            db.executescript(f"BEGIN; {script}; PRAGMA user_version={number}; COMMIT;")
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


def _in_use(named: Path) -> dict[Path, tuple[Shard | None, Usage]]:
    """The ledger named and its shards' beside it, each with a run, and what they hold."""
    candidates: dict[Path, Shard | None] = {named: None} if named.is_file() else {}
    pattern = f"{glob.escape(named.stem)}-shard-*-of-*{glob.escape(named.suffix)}"
    for path in sorted(named.parent.glob(pattern)):
        parent, shard = named_ledger(path)
        # An empty shard's file holds nothing to speak for: it is passed over here, and refused by
        # whatever names it (its shard's run, status or export given the file).
        if shard is not None and parent == named and ledger_for(named, shard) == path and path.stat().st_size:
            candidates[path] = shard
    found = {path: (shard, usage(path)) for path, shard in candidates.items()}
    return {path: (shard, used) for path, (shard, used) in found.items() if used is not None and used.runs}


def ledger_family(named: Path) -> dict[Path, Shard | None]:
    """The ledgers of one job in use: the one named, and its shards' beside it."""
    return {path: shard for path, (shard, _) in _in_use(named).items()}


def _layout(shard: Shard | None) -> int | None:
    """How a job is split: its number of shards, None when it is not."""
    return None if shard is None else shard.count


def check_layout(named: Path, shard: Shard | None) -> None:
    """Refuse a run whose shard layout differs from the ledgers its job already has: the rows they
    hold would be looked up in another ledger, not found, and narrated (and paid for) again."""
    clash = {
        f"{theirs.count} shards" if theirs is not None else "no shards"
        for theirs, used in _in_use(named).values()
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

    def get(self, key: str) -> dict[str, Any] | None:
        return next((e for ledger in self._for(key) if (e := ledger.get(key)) is not None), None)

    def chunk(self, fingerprint: str) -> dict[str, Any] | None:
        return next((c for ledger in self.ledgers if (c := ledger.chunk(fingerprint)) is not None), None)

    def last_run(self) -> dict[str, Any] | None:
        """The newest run any of the ledgers recorded: it names the manifest and defaults."""
        runs = [r for ledger in self.ledgers if (r := ledger.last_run()) is not None]
        return max(runs, key=lambda r: r["started_at"] or "", default=None)

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
