"""Rows' files read and made into the dataset's shape, in manifest order: in this process for a small
export, in worker processes (one a core) once it has many rows to convert, as each file costs
milliseconds of decoding and encoding and a dataset has millions. Files that are copied as they are
(already in the asked shape) stay in this process: sending them back from a worker costs more.

A worker reads the file itself (from the output folder or its object store), so neither the reading
nor the conversion waits on one process; at most a few files a worker are in flight, and they come
back in the order they went, so memory stays flat and the export is the same either way.
"""

from __future__ import annotations

import functools
import multiprocessing
import signal
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

from ..cores import cpus
from .shape import Audio, Shape, Unreadable, reshape

if TYPE_CHECKING:
    import pyarrow.fs as pafs

T = TypeVar("T")
IN_PROCESS = 500  # files converted here before workers are started: they cost a second to start
_IN_FLIGHT = 4  # files a worker


@dataclass(frozen=True)
class Source:
    """Where the rows' files are: a local folder, or an object-store URI (`s3://bucket/prefix`)."""

    root: str
    uri: bool = False

    def read(self, relpath: str) -> bytes:
        if not self.uri:
            return Path(self.root, relpath).read_bytes()
        fs, base = _store(self.root)
        with fs.open_input_file(f"{base.rstrip('/')}/{relpath}") as f:
            return f.read()


@dataclass(frozen=True)
class Conversion(Generic[T]):
    """A row's file to convert; `tag` comes back with its result."""

    tag: T
    relpath: str
    pcm: tuple[int, int] | None  # the rate and channels of a raw PCM file


def converted(jobs: Iterator[Conversion[T]], source: Source, shape: Shape, workers: int | None = None
              ) -> Iterator[tuple[T, Audio | str]]:
    """Each job's tag with its audio, or why its file could not be had, in the order of `jobs`.
    `workers`: processes to convert in (default: one a core; 1 converts here)."""
    count = workers or cpus()
    copied = 0
    for done, job in enumerate(jobs, start=1):
        audio = convert(source, shape, job.relpath, job.pcm)
        copied += isinstance(audio, Audio) and audio.copied
        yield job.tag, audio
        # Files copied as they are cost less than sending them back from a worker: those stay here.
        if count > 1 and done >= IN_PROCESS and copied < done / 2:
            yield from _in_workers(jobs, source, shape, count)
            return


def convert(source: Source, shape: Shape, relpath: str, pcm: tuple[int, int] | None) -> Audio | str:
    """The file's audio in `shape`, or why it could not be read or decoded."""
    try:
        return reshape(source.read(relpath), shape, pcm)
    except OSError as exc:
        return f"{relpath}: {exc.strerror or exc}"
    except Unreadable as exc:
        return f"{relpath}: {exc}"


def _in_workers(jobs: Iterator[Conversion[T]], source: Source, shape: Shape, workers: int
                ) -> Iterator[tuple[T, Audio | str]]:
    # Spawned, not forked: the parent holds SQLite connections and threads a fork would copy. A Ctrl-C
    # is the parent's to handle (it stops the workers): they ignore their own.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=signal.signal,
                             initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
        waiting: deque[tuple[T, Future[Audio | str]]] = deque()
        try:
            for job in jobs:
                waiting.append((job.tag, pool.submit(convert, source, shape, job.relpath, job.pcm)))
                if len(waiting) >= workers * _IN_FLIGHT:
                    tag, future = waiting.popleft()
                    yield tag, future.result()
            while waiting:
                tag, future = waiting.popleft()
                yield tag, future.result()
        finally:
            pool.shutdown(cancel_futures=True)


@functools.cache
def _store(uri: str) -> tuple[pafs.FileSystem, str]:
    """A process's filesystem for the URI, made once."""
    from ..store import _store as resolve

    return resolve(uri)
