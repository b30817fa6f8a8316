"""Identical requests bought once: rows with the same request (`Row.request`: model, voice, words,
format, speed, provider options, the [output] shape, and the tags written into the file) share one file.

Within a run, the first row taken on with a request is narrated and each later one copies its file;
across runs, a row whose request a done row of the ledger answers copies that row's file (`Copy`
work: a hard link, or a copy of the bytes where the file system or the store takes no link). Each
copy has its own ledger entry: done, with the source's sha256 and duration, and `copy_of` naming
the row it came from; or failed, with the source's reason, when the source failed in the same run.

`Firsts` is the run's record of the first row taken on with each request: the plan's first pass
fills it in manifest order and the feed's second pass reads it back, so both count the same copies
and the budget takes copies for free. Millions of rows would hold hundreds of megabytes of it in a
dict, and a table indexed by a random hash takes a read and a write of the disk per row once it
outgrows its cache. So a Bloom filter (16 MB) answers the plan's common question, "is this request
new?", for almost every row, and the records go to a temporary SQLite file in sorted batches (some
40 bytes a row on disk); only a row the filter may have seen before is looked up there, as is every
row of the feed, which goes at the pace of the requests. Closing removes the file.
"""

from __future__ import annotations

import mmap
import sqlite3
from collections.abc import Sequence
from itertools import compress

from .config import Output
from .manifest import CANONICAL, Row

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
        self.bits = mmap.mmap(-1, _FILTER_BITS >> 3)  # anonymous memory: zero pages until written

    def add(self, hashed: int) -> bool:
        """Add the hash; whether it may have been added before. Two probes, from two stretches of
        the hash's bits: in Python, each probe costs as much as a lookup saved."""
        bits = self.bits
        one, two = hashed & _MASK, (hashed >> 27) & _MASK
        byte_one, bit_one, byte_two, bit_two = one >> 3, 1 << (one & 7), two >> 3, 1 << (two & 7)
        seen = bits[byte_one] & bit_one and bits[byte_two] & bit_two
        bits[byte_one] |= bit_one
        bits[byte_two] |= bit_two
        return bool(seen)

    def close(self) -> None:
        self.bits.close()


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

    def take_many(self, hashed: Sequence[int], numbers: Sequence[int], keys: Sequence[str]) -> list[str | None]:
        """`take` for a batch of rows in manifest order, by their `request_hash`: the filter is asked
        for all of them at once, and only the rows it may have seen (or that repeat a request earlier
        in the batch) are looked up, one by one, in order."""
        import numpy as np

        values = np.array(hashed, dtype=np.int64)
        one, two = values & _MASK, (values >> 27) & _MASK
        bits = np.frombuffer(self._filter.bits, dtype=np.uint8)
        try:
            maybe = ((bits[one >> 3] >> (one & 7).astype(np.uint8)) & (bits[two >> 3] >> (two & 7).astype(np.uint8)) & 1
                     ).astype(bool)
            repeated = np.ones(len(values), dtype=bool)
            repeated[np.unique(values, return_index=True)[1]] = False
            maybe |= repeated
            np.bitwise_or.at(bits, one >> 3, np.left_shift(1, one & 7).astype(np.uint8))
            np.bitwise_or.at(bits, two >> 3, np.left_shift(1, two & 7).astype(np.uint8))
        finally:
            del bits  # the filter's memory is unmapped on close: no view of it may outlive this
        new = (~maybe).tolist()
        # A new request repeats no row before it in the batch, so the new ones are recorded first.
        self._held.update(zip(compress(hashed, new), zip(compress(numbers, new), compress(keys, new), strict=True),
                              strict=True))
        sources: list[str | None] = [None] * len(new)
        for index in np.flatnonzero(maybe).tolist():
            first = self._find(hashed[index])
            if first is None:
                self._held[hashed[index]] = (numbers[index], keys[index])
            elif first[0] < numbers[index] and first[1] != keys[index]:
                sources[index] = first[1]
        if len(self._held) >= self._batch:
            self._write()
        return sources

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
