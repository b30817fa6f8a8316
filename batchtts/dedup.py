"""Identical requests bought once: rows with the same request (`Row.request`: model, voice, words,
format, speed, provider options, the [output] shape, and the tags written into the file) share one file.

Within a run, the first row taken on with a request is narrated and each later one copies its file;
across runs, a row whose request a done row of the ledger answers copies that row's file (`Copy`
work: a hard link, or a copy of the bytes where the file system or the store takes no link). Each
copy has its own ledger entry: done, with the source's sha256 and duration, and `copy_of` naming
the row it came from; or failed, with the source's reason, when the source failed in the same run.

The run keeps a record of the first row taken on with each request: the plan's first pass fills it
in manifest order and the feed's second pass reads it back, so both count the same copies. Millions
of rows would hold hundreds of megabytes of it in a dict, and a table indexed by a random hash takes
a read and a write of the disk per row once it outgrows its cache. Two records serve:

- `Repeats`, for a plan with no budget, where no decision waits on whether a row is a copy: each
  row is noted as it is taken on (36 bytes, spilled to disk), and the copies are found after the
  pass by sorting the notes once, part by part. This is what keeps planning ten million rows cheap.
- `Firsts`, for a plan with a budget, which takes copies for free and so must know at each row: a
  Bloom filter (16 MB) answers "is this request new?" for almost every row, and the records go to a
  temporary SQLite file in sorted batches (some 40 bytes a row on disk); only a row the filter may
  have seen before is looked up there, as is every row of the feed.

Closing either removes its files.
"""

from __future__ import annotations

import array
import mmap
import sqlite3
import tempfile
from collections.abc import Iterator, Sequence
from typing import IO, TYPE_CHECKING

from .config import Output
from .manifest import CANONICAL, Row
from .rownumbers import RowNumbers

if TYPE_CHECKING:
    import numpy as np

# The filter's size, fixed: a new request is looked up for nothing about 2 times in 100 at 10^7
# requests and 13 in 100 at 3 x 10^7 (the lookups cost time, never a wrong answer). Its pages are
# all touched within the first few thousand rows: 16 MB of a run's memory.
_FILTER_BITS = 1 << 27
_MASK = _FILTER_BITS - 1
_BATCH = 1 << 16  # records held in memory before they are written together, in key order


def _hashed(row: Row) -> int:
    options = CANONICAL.encode(row.provider_options) if row.provider_options else None
    return request_hash(row.model, row.voice, row.spoken, row.format, row.speed, options, row.shape,
                        tuple(sorted(row.tags.items())))


def request_hash(model: str, voice: str, spoken: str, fmt: str, speed: float | None, options: str | None,
                 shape: Output, tags: tuple[tuple[str, str], ...]) -> int:
    """64 bits of what a row's request is made of (`options` as canonical JSON, `tags` sorted):
    Python's own hash, keyed anew in each process, as the record lives and dies with the run (the
    SHA-256 of `Row.request` costs more than the rest of the record). Two requests that share them
    (a chance of a few in a million among 10^7 rows) cost only a count: the narrator copies a file
    recorded with the very same request, or narrates the row."""
    return hash((model, voice, spoken, fmt, speed, options, shape, tags))


class _Filter:
    """A Bloom filter of 64-bit hashes: no false "new", a few false "seen"."""

    def __init__(self) -> None:
        self._bits = mmap.mmap(-1, _FILTER_BITS >> 3)  # anonymous memory: zero pages until written

    def add(self, hashed: int) -> bool:
        """Add the hash; whether it may have been added before. Two probes, from two stretches of
        the hash's bits: in Python, each probe costs as much as a lookup saved."""
        bits = self._bits
        one, two = hashed & _MASK, (hashed >> 27) & _MASK
        byte_one, bit_one, byte_two, bit_two = one >> 3, 1 << (one & 7), two >> 3, 1 << (two & 7)
        seen = bits[byte_one] & bit_one and bits[byte_two] & bit_two
        bits[byte_one] |= bit_one
        bits[byte_two] |= bit_two
        return bool(seen)

    def close(self) -> None:
        self._bits.close()


class Firsts:
    """The first row taken on with each request, by its number and key."""

    def __init__(self, batch: int = _BATCH) -> None:
        self._batch = batch
        self._db = sqlite3.connect("", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode = OFF")
        self._db.execute("CREATE TABLE firsts (request INTEGER PRIMARY KEY, number INTEGER NOT NULL, key TEXT NOT NULL)")
        self._db.execute("BEGIN")  # never committed: one transaction spares a write per batch
        self._filter = _Filter()
        self._held: dict[int, tuple[int, str]] = {}  # records not written yet

    def take(self, row: Row) -> str | None:
        """The key of the row taken on before this one with its request; None when there is none (this
        row is then the first), or it has this row's key (an identical row without id: one file is
        named for both)."""
        hashed = _hashed(row)
        first = self._find(hashed) if self._filter.add(hashed) else None
        if first is None:
            self._held[hashed] = (row.number, row.key)
            if len(self._held) >= self._batch:
                self._write()
            return None
        number, key = first
        return None if number >= row.number or key == row.key else key

    def _find(self, hashed: int) -> tuple[int, str] | None:
        if (held := self._held.get(hashed)) is not None:
            return held
        found = self._db.execute("SELECT number, key FROM firsts WHERE request = ?", (hashed,)).fetchone()
        return None if found is None else (int(found[0]), str(found[1]))

    def _write(self) -> None:
        self._db.executemany("INSERT OR IGNORE INTO firsts VALUES (?, ?, ?)",
                             ((hashed, *first) for hashed, first in sorted(self._held.items())))
        self._held.clear()

    def drop(self, row: Row) -> None:
        """The row is not taken on after all (the budget passes it over): it is no row's source."""
        hashed = _hashed(row)
        if self._held.get(hashed, (None,))[0] == row.number:
            del self._held[hashed]
        else:
            self._db.execute("DELETE FROM firsts WHERE request = ? AND number = ?", (hashed, row.number))

    def close(self) -> None:
        self._db.close()
        self._filter.close()


_SPILL_AT = 1 << 16  # records of `Repeats` held in memory before they go to disk
_PARTS = 16  # files they are split over, by the top 4 bits of the request's hash
_RECORD = [("request", "<i8"), ("number", "<i8"), ("key", "<i8"), ("model", "<u4"), ("requests", "<u4"),
           ("characters", "<i8")]


class Repeats:
    """The same answers as `Firsts` for a plan with no budget, where no decision waits on whether a
    row is a copy: the plan's first pass only notes each row taken on (its request's and its key's
    hashes, its number, and what it would send), 36 bytes a row spilled to disk in 16 parts by
    request; `settle` then sorts each part once, finds the rows that repeat an earlier row's request
    (a copy, unless it has that row's key) and says what the plan counted for them that a copy does
    not send. The feed's second pass asks `take` again and gets the source's key for each copy: the
    copies are kept by row number, and the sources' keys as the feed meets them, in a temporary
    SQLite file. Memory holds a batch of notes while planning and one part's (a sixteenth) while
    settling; a request repeated by millions of rows puts all of them in one part."""

    def __init__(self, spill_at: int = _SPILL_AT) -> None:
        self._spill_at = spill_at
        self._columns: dict[str, array.array[int]] = {name: array.array("q" if kind == "<i8" else "I")
                                                      for name, kind in _RECORD}
        self._parts: list[IO[bytes]] | None = None
        self._models: dict[str, int] = {}
        self._db: sqlite3.Connection | None = None  # once settled: the copies, and the sources' keys
        self._sources = RowNumbers()

    def take(self, row: Row, requests: int = 1, characters: int = 0) -> str | None:
        """While planning, note the row (taken on, sending `requests` of `characters`) and answer None;
        once settled, the key of the row whose file this row copies, or None."""
        if self._db is not None:
            return self._source(row)
        self.take_many([_hashed(row)], [row.number], [row.key], [row.model], [requests], [characters])
        return None

    def take_many(self, hashed: Sequence[int], numbers: Sequence[int], keys: Sequence[str], models: Sequence[str],
                  requests: Sequence[int], characters: Sequence[int]) -> None:
        """`take` of a batch of rows while planning, by their `request_hash`."""
        columns = self._columns
        columns["request"].extend(hashed)
        columns["number"].extend(numbers)
        columns["key"].extend(map(hash, keys))
        index = self._models
        columns["model"].extend(index[m] if m in index else index.setdefault(m, len(index)) for m in models)
        columns["requests"].extend(requests)
        columns["characters"].extend(characters)
        if len(columns["number"]) >= self._spill_at:
            self._spill()

    def _records(self) -> np.ndarray:
        import numpy as np

        columns = self._columns
        records = np.empty(len(columns["number"]), dtype=_RECORD)
        for name, values in columns.items():
            records[name] = np.frombuffer(values, dtype=records.dtype[name])
        self._columns = {name: array.array(values.typecode) for name, values in columns.items()}
        return records

    def _spill(self) -> None:
        if self._parts is None:
            self._parts = [tempfile.TemporaryFile(prefix="batchtts-repeats-") for _ in range(_PARTS)]
        records = self._records()
        part_of = (records["request"] >> 60) & (_PARTS - 1)
        for index, part in enumerate(self._parts):
            part.write(records[part_of == index].tobytes())

    def _chunks(self) -> Iterator[np.ndarray]:
        """The records, a part at a time: every row with a request in the same part."""
        import numpy as np

        if self._parts is None:
            yield self._records()
            return
        self._spill()
        for part in self._parts:
            part.seek(0)
            yield np.frombuffer(part.read(), dtype=_RECORD)
            part.close()
        self._parts = None

    def settle(self) -> dict[str, tuple[int, int, int]]:
        """Find the copies; per model, how many, the requests they save, and the characters they do
        not send (the plan counted each as a row to narrate)."""
        import numpy as np

        names = list(self._models)
        saved = np.zeros((len(names), 3), dtype=np.int64)
        self._db = db = sqlite3.connect("", check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode = OFF")
        db.execute("CREATE TABLE copies (number INTEGER PRIMARY KEY, source INTEGER NOT NULL, request INTEGER NOT NULL)")
        db.execute("CREATE TABLE sources (number INTEGER PRIMARY KEY, key TEXT NOT NULL)")
        db.execute("BEGIN")  # never committed: one transaction spares a write per part
        for records in self._chunks():
            if not len(records):
                continue
            records = records[np.lexsort((records["number"], records["request"]))]
            starts = np.r_[True, records["request"][1:] != records["request"][:-1]]
            first = np.flatnonzero(starts)[np.cumsum(starts) - 1]  # each row's first row with its request
            copy = ~starts & (records["key"] != records["key"][first])
            copies = records[copy]
            np.add.at(saved, copies["model"], np.stack([np.ones(len(copies), np.int64), copies["requests"],
                                                        copies["characters"]], axis=1))
            sources = records["number"][first[copy]]
            db.executemany("INSERT INTO copies VALUES (?, ?, ?)",
                           zip(copies["number"].tolist(), sources.tolist(), copies["request"].tolist(), strict=True))
            for source in np.unique(sources).tolist():
                self._sources.add(source)
        return {name: (int(n), int(r), int(c)) for name, (n, r, c) in zip(names, saved.tolist(), strict=True) if n}

    def _source(self, row: Row) -> str | None:
        assert self._db is not None
        if row.number in self._sources:  # a later row copies this one's file: its key is kept for it
            self._db.execute("INSERT OR REPLACE INTO sources VALUES (?, ?)", (row.number, row.key))
        found = self._db.execute("SELECT source, request FROM copies WHERE number = ?", (row.number,)).fetchone()
        if found is None or found[1] != _hashed(row):  # a row edited since the plan is narrated, not copied
            return None
        key = self._db.execute("SELECT key FROM sources WHERE number = ?", (found[0],)).fetchone()
        return None if key is None else str(key[0])

    def close(self) -> None:
        if self._parts is not None:
            for part in self._parts:
                part.close()
            self._parts = None
        if self._db is not None:
            self._db.close()
