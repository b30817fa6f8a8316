"""The work a run hands its workers: a whole row, one chunk of a long row, a long row to stitch (from
the Parts on disk), a row whose request another row makes (its file copied), a row the budget passes
over, or one that cannot be narrated as written. The plan makes them; the narrator does them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from .chunking import Chunk
from .errors import SpeechError
from .manifest import Row


@dataclass(frozen=True)
class Part:
    """One chunk's audio file, and whether a paragraph (rather than a sentence) ends before it, or
    the pause voice markup asks for there."""

    path: Path
    paragraph_before: bool
    sample_rate: int | None = None
    channels: int | None = None
    pause: float | None = None


@dataclass
class Assembly:
    """A long row on its way: its chunks, the ones already on disk, and what is still out."""

    row: Row
    chunks: list[Chunk]
    parts: list[Part | None]
    remaining: int
    started: float = field(default_factory=time.monotonic)
    attempts: int = 0
    failure: tuple[int, SpeechError] | None = None
    abandoned: bool = False


@dataclass(frozen=True)
class ChunkJob:
    assembly: Assembly
    index: int


@dataclass(frozen=True)
class PassedOver:
    """A row the budget cannot take under any run: recorded as failed, with why, and tried again by
    the next run (under a raised cap, it goes through)."""

    row: Row
    reason: str


@dataclass(frozen=True)
class Unreadable:
    """A row that cannot be narrated as written (its voice markup is broken): recorded as failed for
    good, with where, and tried again once its text changes."""

    row: Row
    reason: str


@dataclass(frozen=True)
class Copy:
    """A row whose request (`Row.request`) row `source` makes: its file is copied, not bought again.
    `fresh`: the source is narrated by this run (its failure is the copy's too), not done before.
    `work`: the row's own, should the source not have the file after all."""

    row: Row
    source: str
    fresh: bool
    work: tuple[WorkItem, ...]


WorkItem = Row | ChunkJob | Assembly | Copy | PassedOver | Unreadable


def row_of(item: WorkItem) -> Row:
    if isinstance(item, ChunkJob):
        return item.assembly.row
    if isinstance(item, (Assembly, Copy, PassedOver, Unreadable)):
        return item.row
    return item


def characters(item: WorkItem) -> int:
    """Characters one work item sends: a whole row, one chunk, or none for stitching alone."""
    if isinstance(item, Row):
        return len(item.spoken)
    if isinstance(item, ChunkJob):
        return len(item.assembly.chunks[item.index].text)
    return 0
