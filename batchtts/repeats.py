"""Many 8-byte hashes in bounded memory: which repeat, and which of a few are among them.

Checking a manifest keeps a hash of each row's id and file name, to find rows that share one. Held
in memory that is 8 bytes a row for each, and sorting them to find repeats needs as much again: at
ten million rows, hundreds of MB. `Hashes` keeps up to SPILL_AT of them in memory; past that it
spills them to temporary files, one per range of hash values (PARTS ranges), so that every copy of
a value lands in the same file and each file is read back and sorted on its own: memory stays at
SPILL_AT hashes however long the manifest, and the disk holds 8 bytes a row until `close`.
"""

from __future__ import annotations

import array
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import IO

SPILL_AT = 1 << 20  # hashes kept in memory before they go to disk: 8 MB
PARTS = 64  # files the spilled hashes are split over, by their top 6 bits
_SHIFT = 64 - 6


class Hashes:
    """8-byte hashes, added one at a time; spilled to disk past SPILL_AT."""

    def __init__(self, spill_at: int = SPILL_AT) -> None:
        self._memory = array.array("Q")
        self._spill_at = spill_at
        self._parts: list[IO[bytes]] | None = None

    def __len__(self) -> int:
        return len(self._memory) + (sum(part.tell() for part in self._parts) // 8 if self._parts else 0)

    def append(self, value: int) -> None:
        self._memory.append(value)
        if len(self._memory) >= self._spill_at:
            self._spill()

    def extend(self, values: Iterable[int]) -> None:
        self._memory.extend(values)
        if len(self._memory) >= self._spill_at:
            self._spill()

    def _spill(self) -> None:
        import numpy as np

        if self._parts is None:
            self._parts = [tempfile.TemporaryFile(prefix="batchtts-hashes-") for _ in range(PARTS)]
        values = np.sort(np.frombuffer(self._memory, np.uint64))  # sorted, each part's values lie together
        bounds = np.searchsorted(values >> np.uint64(_SHIFT), np.arange(PARTS + 1, dtype=np.uint64)).tolist()
        for index, part in enumerate(self._parts):
            part.write(values[bounds[index]:bounds[index + 1]].tobytes())
        del values
        self._memory = array.array("Q")

    def _chunks(self) -> Iterator[array.array[int]]:
        """The hashes, a part at a time: every copy of a value in the same part."""
        if self._parts is None:
            yield self._memory
            return
        self._spill()
        for part in self._parts:
            part.seek(0)
            chunk = array.array("Q")
            chunk.frombytes(part.read())
            part.seek(0, 2)
            yield chunk

    def repeats(self, duplicates: Callable[[array.array[int], int], tuple[set[int], int]],
                keep: int = 10_000) -> tuple[set[int], int]:
        """How many hashes repeat an earlier one, and (up to `keep` of) the repeated hashes, each part
        counted by `duplicates(part, keep)`."""
        found: set[int] = set()
        count = 0
        for chunk in self._chunks():
            some, many = duplicates(chunk, keep - len(found))
            found |= some
            count += many
        return found, count

    def among(self, values: Iterable[int]) -> set[int]:
        """Those of `values` that are among the hashes."""
        wanted = set(values)
        found: set[int] = set()
        if not wanted:
            return found
        for chunk in self._chunks():
            found.update(value for value in chunk if value in wanted)
        return found

    def close(self) -> None:
        """Remove the spilled files."""
        for part in self._parts or ():
            part.close()
        self._parts = None
        self._memory = array.array("Q")
