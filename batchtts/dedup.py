"""Identical requests bought once: rows with the same request (`Row.request`: model, voice, words,
format, speed, provider options, and the tags written into the file) share one file.

Within a run, the first row taken on with a request is narrated and each later one copies its file;
across runs, a row whose request a done row of the ledger answers copies that row's file (`Copy`
work: a hard link, or a copy of the bytes where the file system or the store takes no link). Each
copy has its own ledger entry: done, with the source's sha256 and duration, and `copy_of` naming
the row it came from; or failed, with the source's reason, when the source failed in the same run.

`Firsts` is the run's record of the first row taken on with each request: the plan's first pass
fills it in manifest order and the feed's second pass reads it back, so both count the same copies
and the budget takes copies for free. Millions of rows would hold hundreds of megabytes of it in a
dict: it lives in a temporary SQLite file instead (some 40 bytes a row on disk, a few MB of memory),
which closing removes.
"""

from __future__ import annotations

import sqlite3

from .manifest import Row


def _hashed(request: str) -> int:
    """64 bits of a request's hex digest, as SQLite's signed integer key. Two requests that share
    them (a chance of a few in a million among 10^7 rows) cost only a count: the narrator copies a
    file recorded with the very same request, or narrates the row."""
    return int(request[:16], 16) - (1 << 63)


class Firsts:
    """The first row taken on with each request, by its number and key."""

    def __init__(self) -> None:
        self._db = sqlite3.connect("", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode = OFF")
        self._db.execute("CREATE TABLE firsts (request INTEGER PRIMARY KEY, number INTEGER NOT NULL, key TEXT NOT NULL)")
        self._db.execute("BEGIN")  # never committed: one transaction spares a write per row

    def take(self, row: Row) -> str | None:
        """The key of the row taken on before this one with its request; None when there is none (this
        row is then the first), or it has this row's key (an identical row without id: one file is
        named for both)."""
        hashed = _hashed(row.request)
        if self._db.execute("INSERT OR IGNORE INTO firsts VALUES (?, ?, ?)", (hashed, row.number, row.key)).rowcount:
            return None
        number, key = self._db.execute("SELECT number, key FROM firsts WHERE request = ?", (hashed,)).fetchone()
        return None if number >= row.number or key == row.key else str(key)

    def drop(self, row: Row) -> None:
        """The row is not taken on after all (the budget passes it over): it is no row's source."""
        self._db.execute("DELETE FROM firsts WHERE request = ? AND number = ?", (_hashed(row.request), row.number))

    def close(self) -> None:
        self._db.close()
