"""What every dataset layout is given and shares: a sample (a row's audio and what is said in it),
the size of a shard, and tar shards that appear whole, one after another.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..errors import UsageError
from .shape import Audio
from .sink import Sink

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", re.IGNORECASE)
_UNITS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_MAX_NAME = 120


@dataclass(frozen=True)
class Sample:
    """One row as a dataset holds it."""

    name: str  # its files' name without the suffix: the row's key, made safe for every layout (`sample_name`)
    split: str
    text: str
    audio: Audio
    # What is said of it besides its audio, as NeMo's and WebDataset's JSON and the Parquet columns
    # carry it: id, text, normalized_text (when the manifest has the column), speaker, duration,
    # sample_rate, then the manifest's other columns.
    fields: dict[str, Any]

    @property
    def filename(self) -> str:
        return f"{self.name}.{self.audio.format}"


def sample_name(key: str) -> str:
    """A name for a row's files that every layout takes: letters, digits, '_' and '-' (no '.':
    WebDataset and NeMo's tarred datasets take the name up to the first '.' as the sample's key). A
    key that had to be changed gets a hash of itself, so two keys never share a name."""
    name = _UNSAFE.sub("_", key)
    if name == key and len(name) <= _MAX_NAME:
        return name
    return f"{name[:_MAX_NAME]}-{hashlib.sha256(key.encode('utf-8', 'surrogatepass')).hexdigest()[:10]}"


@dataclass(frozen=True)
class ShardSize:
    """Rows a shard, or bytes of audio a shard: whichever is given."""

    rows: int | None = None
    bytes: int | None = None

    @classmethod
    def parse(cls, text: str) -> ShardSize:
        """`1000` rows, or a size: `500MB`, `1GB` (powers of 1000), `512MiB` (of 1024)."""
        if text.strip().isdigit():
            rows = int(text)
            if rows < 1:
                raise UsageError("--shard-size takes at least 1 row")
            return cls(rows=rows)
        match = _SIZE.fullmatch(text)
        if match is None:
            raise UsageError(f"--shard-size takes a number of rows (1000) or a size (500MB, 1GB), not {text!r}")
        number, unit, binary = match.groups()
        size = int(float(number) * (1024 if binary else 1000) ** _UNITS[unit.upper()])
        if size < 1:
            raise UsageError(f"--shard-size {text!r} is under a byte")
        return cls(bytes=size)

    def full(self, rows: int, size: int) -> bool:
        return (self.rows is not None and rows >= self.rows) or (self.bytes is not None and size >= self.bytes)

    def __str__(self) -> str:
        return f"{self.rows} rows" if self.rows is not None else f"{self.bytes:,} bytes"


class Layout(ABC):
    """A trainer's layout, written a sample at a time."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    @abstractmethod
    def add(self, sample: Sample) -> None: ...

    @abstractmethod
    def close(self) -> list[str]:
        """Write what indexes the samples (manifests, metadata, the shards' final names); returns
        the files a trainer is pointed at."""


class TarShards:
    """A split's tar files, filled in turn: each is made aside and put in place when full, so a tar
    under its name is complete. `name(i)` names the i-th; `on_close(i)` is told when it is in place."""

    def __init__(self, sink: Sink, name: Callable[[int], str], size: ShardSize, mtime: int,
                 on_close: Callable[[int], None] | None = None) -> None:
        self.sink, self.name, self.size, self.mtime, self.on_close = sink, name, size, mtime, on_close
        self.count = 0  # shards put in place
        self._local: Path | None = None
        self._file: IO[bytes] | None = None
        self._tar: tarfile.TarFile | None = None
        self._rows = self._bytes = 0

    def add(self, members: list[tuple[str, bytes]]) -> int:
        """Put one sample's files, together, in the current shard; returns its number."""
        if self._tar is not None and self.size.full(self._rows, self._bytes):
            self._finish()
        if self._tar is None:
            self._local = self.sink.scratch(".tar")
            self._file = open(self._local, "wb")
            self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
            self._rows = self._bytes = 0
        for member, data in members:
            info = tarfile.TarInfo(member)
            info.size, info.mtime, info.mode = len(data), self.mtime, 0o644
            self._tar.addfile(info, io.BytesIO(data))
            self._bytes += len(data)
        self._rows += 1
        return self.count

    def close(self) -> int:
        """Put the last shard in place; returns how many there are."""
        if self._tar is not None:
            self._finish()
        return self.count

    def _finish(self) -> None:
        assert self._tar is not None and self._file is not None and self._local is not None
        self._tar.close()
        self._file.close()
        self._tar = self._file = None
        self.sink.put(self._local, self.name(self.count))
        if self.on_close is not None:
            self.on_close(self.count)
        self.count += 1
