"""The output folder: safe names, atomic publication of audio files, and the lock that keeps runs apart.

Audio is written under `.batchtts-partial/` inside the output folder (the same filesystem, so the
final rename is atomic), fsynced, then renamed to its final name. A final name therefore only ever
holds a complete file; what a crash leaves behind is in the partial folder and is removed by the
next run, in time proportional to what was in flight rather than to the size of the folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from .errors import FolderLockedError, UsageError

PARTIAL_DIR = ".batchtts-partial"
CHUNK_DIR = ".batchtts-chunks"
LOCK_FILE = ".batchtts.lock"
RESERVED_NAMES = frozenset({
    PARTIAL_DIR, CHUNK_DIR, LOCK_FILE, "ledger.sqlite", "ledger.sqlite-wal", "ledger.sqlite-shm",
})

_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_DRIVE = re.compile(r"^[A-Za-z]:")
_MAX_NAME = 120


def unsafe_reason(value: str, allow_folders: bool = False) -> str | None:
    """Why `value` may not name a file under the output folder, or None if it may."""
    if "\x00" in value:
        return "contains a NUL character"
    if value.startswith(("/", "\\")):
        return f"{value!r} is an absolute path"
    if _DRIVE.match(value):
        return f"{value!r} starts with a drive letter"
    parts = re.split(r"[\\/]", value)
    if ".." in parts:
        return f"{value!r} climbs out of the output folder with '..'"
    if allow_folders:
        if "\\" in value:
            return f"{value!r} contains a backslash: separate folders with '/'"
        if PurePosixPath(value).parts[:1] and PurePosixPath(value).parts[0].casefold() in RESERVED_NAMES:
            return f"{value!r} is a name batchtts uses itself"
    return None


def normalise_relpath(value: str) -> str:
    return str(PurePosixPath(value))


def safe_name(key: str) -> str:
    """A file name for a key; keys that had to be changed get a hash so two keys never share a name."""
    name = _UNSAFE_CHARS.sub("_", key)
    if name == key and not name.startswith(".") and len(name) <= _MAX_NAME:
        return name
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{name.lstrip('.')[:_MAX_NAME]}-{digest}"


def chunk_path(fingerprint: str, fmt: str) -> str:
    """Chunks of long rows are kept by content, so an edited chapter asks again only for the pieces
    that changed."""
    return f"{CHUNK_DIR}/{fingerprint[:2]}/{fingerprint}.{fmt}"


@dataclass(frozen=True)
class Published:
    path: Path
    bytes: int
    sha256: str


class OutputFolder:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.partial_dir = root / PARTIAL_DIR
        self._made: set[Path] = set()
        self._partials = itertools.count()

    def path_of(self, relpath: str) -> Path:
        return self.root / relpath

    def has(self, relpath: str, size: int | None) -> bool:
        """True if the file is there with the size the ledger recorded."""
        try:
            return size is not None and os.stat(self.root / relpath).st_size == size
        except OSError:
            return False

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold an exclusive lock on the folder so an overlapping run (cron) leaves at once."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UsageError(f"cannot use output folder {self.root}: {exc.strerror}") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                raise FolderLockedError(
                    f"another batchtts run (pid {holder}) is using {self.root}; this run exits without doing anything"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield
        finally:
            os.close(fd)

    def clean_partials(self) -> int:
        """Remove what interrupted runs left half-written; returns how many files."""
        if not self.partial_dir.exists():
            return 0
        count = sum(1 for _ in self.partial_dir.iterdir())
        shutil.rmtree(self.partial_dir)
        self._made.discard(self.partial_dir)
        return count

    def tidy(self) -> None:
        """Remove the partial folder once a run leaves it empty."""
        try:
            self.partial_dir.rmdir()
            self._made.discard(self.partial_dir)
        except OSError:
            pass  # absent, or still holding files a cancelled run left: the next run removes them

    def open_partial(self) -> tuple[Path, BinaryIO]:
        self._makedirs(self.partial_dir)
        path = self.partial_dir / f"{os.getpid()}-{next(self._partials)}"
        # A buffer the size of a typical short row: one write call per file instead of one per chunk.
        return path, open(path, "w+b", buffering=256 * 1024)

    def publish(self, partial: Path, f: BinaryIO, relpath: str) -> Published:
        """fsync, hash and rename into place. Blocking: call it from a worker thread."""
        f.flush()
        os.fsync(f.fileno())
        f.seek(0)
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        size = f.tell()
        f.close()
        final = self.root / relpath
        self._makedirs(final.parent)
        os.replace(partial, final)
        return Published(final, size, digest)

    def _makedirs(self, folder: Path) -> None:
        if folder not in self._made:
            folder.mkdir(parents=True, exist_ok=True)
            self._made.add(folder)

    @staticmethod
    def discard(partial: Path, f: BinaryIO) -> None:
        f.close()
        partial.unlink(missing_ok=True)
