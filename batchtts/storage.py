"""Where audio lands in a local output folder: atomic publication, and the folder's upkeep.

Audio is written under `.batchtts-partial/<ledger>/` inside the output folder (the same
filesystem, so the final rename is atomic), fsynced, then renamed to its final name. A final name
therefore only ever holds a complete file; what a crash leaves behind is in the partial folder and
is removed by the next run with the same ledger, in time proportional to what was in flight rather
than to the size of the folder. Each ledger (each shard) has its own partial folder and lock, so
shards can share one output folder.

An object store plugs in under the same interface (`store.py`); the lock is `lock.py`'s.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .errors import UsageError
from .lock import Held, hold, lock_path
from .names import CHUNK_DIR, PARTIAL_DIR

COPY_BUFFER = 1024 * 1024
_PUBLISH_ATTEMPTS = 5


@dataclass(frozen=True)
class Published:
    path: Path
    bytes: int
    sha256: str


class OutputFolder:
    """A local output folder. `ledger` names the run's ledger: its lock and partial folder are per ledger."""

    def __init__(self, root: Path, ledger: Path) -> None:
        self.root = root
        self._prefix = os.path.join(root, "")  # a string: a rerun asks for every row's file, and a Path costs µs
        self.partial_dir = root / PARTIAL_DIR / _ledger_tag(ledger)
        self.lock_path = lock_path(ledger)
        self._made: set[Path] = set()
        self._partials = itertools.count()

    def __str__(self) -> str:
        return str(self.root)

    def path_of(self, relpath: str) -> Path:
        return self.root / relpath

    def has(self, relpath: str, size: int | None) -> bool:
        """True if the file is there with the size the ledger recorded."""
        try:
            return size is not None and os.stat(self._prefix + relpath).st_size == size
        except OSError:
            return False

    def lock(self) -> contextlib.AbstractContextManager[Held]:
        """Hold an exclusive lock on the ledger so an overlapping run (cron) leaves at once."""
        return hold(self.lock_path, self.root)

    def clean_partials(self) -> int:
        """Remove what interrupted runs left half-written; returns how many files. Before that, refuse
        batchtts's own folders when they are links or files: audio written through a link lands
        outside the output folder, and emptying one deletes what is not batchtts's."""
        chunks = self.root / CHUNK_DIR
        kept = {self.partial_dir.parent: "its half-written files there and empties it",
                self.partial_dir: "its half-written files there and empties it",
                chunks: "the chunks of long rows there"}
        if chunks.is_dir() and not chunks.is_symlink():
            kept.update((sub, "the chunks of long rows there") for sub in chunks.iterdir() if sub.is_symlink())
        for folder, use in kept.items():
            if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
                raise UsageError(f"{folder} is not a folder but a link or a file: batchtts keeps {use}; remove it")
        if not self.partial_dir.exists():
            return 0
        count = sum(1 for _ in self.partial_dir.iterdir())
        shutil.rmtree(self.partial_dir)
        self._made.discard(self.partial_dir)
        return count

    def tidy(self) -> None:
        """Remove the partial folder (and its parent, when no other shard uses it) once a run leaves it empty."""
        for folder in (self.partial_dir, self.partial_dir.parent):
            try:
                folder.rmdir()
                self._made.discard(folder)
            except OSError:
                return  # absent, or still holding files a cancelled run (or another shard) left

    def open_partial(self) -> tuple[Path, BinaryIO]:
        self._makedirs(self.partial_dir)
        path = self.partial_dir / f"{os.getpid()}-{next(self._partials)}"
        # A buffer the size of a typical short row: one write call per file instead of one per chunk.
        try:
            return path, open(path, "w+b", buffering=256 * 1024)
        except FileNotFoundError:
            self._remake(self.partial_dir)
            return path, open(path, "w+b", buffering=256 * 1024)

    def publish(self, partial: Path, f: BinaryIO, relpath: str) -> Published:
        """fsync, hash and rename into place. Blocking: call it from a worker thread."""
        f.flush()
        os.fsync(f.fileno())
        f.seek(0)
        digest = hashlib.file_digest(f, "sha256").hexdigest()  # type: ignore[arg-type]  # open() made it: it has readinto
        size = f.tell()
        final = self.root / relpath
        try:
            self._makedirs(final.parent)
            for attempt in range(_PUBLISH_ATTEMPTS):
                try:
                    os.replace(partial, final)
                    break
                except FileNotFoundError:
                    if attempt == _PUBLISH_ATTEMPTS - 1:
                        raise
                    # A folder was removed under the run (a cleanup, an rm -rf that may still be going
                    # on): put back what it took, from the file still open, and try again.
                    with contextlib.suppress(FileNotFoundError):
                        if not partial.exists():
                            self._restage(partial, f)
                        self._remake(final.parent)
        finally:
            f.close()
        return Published(final, size, digest)

    def copy(self, source: str, relpath: str, size: int, sha256: str) -> Published:
        """Put the file at `source` (of `size` bytes and `sha256`, as recorded) at `relpath` too, as
        publish puts a file: a hard link made aside and renamed into place, or where the file system
        takes no link (another file system mounted under the folder, one without links) a copy of its
        bytes, fsynced. Blocking: call it from a worker thread."""
        self._makedirs(self.partial_dir)
        partial = self.partial_dir / f"{os.getpid()}-{next(self._partials)}"
        final = self.root / relpath
        try:
            try:
                os.link(self.root / source, partial)
            except OSError as exc:
                if isinstance(exc, FileNotFoundError):
                    raise
                shutil.copyfile(self.root / source, partial)
                with open(partial, "rb") as f:
                    os.fsync(f.fileno())
            self._makedirs(final.parent)
            os.replace(partial, final)
        finally:
            partial.unlink(missing_ok=True)  # there still when `relpath` was already a link to the file
        return Published(final, size, sha256)

    def _makedirs(self, folder: Path) -> None:
        if folder not in self._made:
            folder.mkdir(parents=True, exist_ok=True)
            self._made.add(folder)

    def _remake(self, folder: Path) -> None:
        """Make again a folder this run made and something removed since (a cleanup, an `rm -rf`):
        without it, every row left in the run would be bought and then thrown away."""
        self._made.discard(folder)
        self._makedirs(folder)

    def _restage(self, partial: Path, f: BinaryIO) -> None:
        """Write the audio again where its partial file was, from the file still open: the partial
        folder was removed with the file in it, and the audio is paid for."""
        self._remake(partial.parent)
        f.seek(0)
        with open(partial, "wb") as copy:
            shutil.copyfileobj(f, copy, COPY_BUFFER)
            copy.flush()
            os.fsync(copy.fileno())

    @staticmethod
    def discard(partial: Path, f: BinaryIO) -> None:
        """Throw a partial file away. Closing flushes its buffer, which fails on a full disk: that data
        is being thrown away anyway, and the file must go all the same."""
        try:
            with contextlib.suppress(OSError):
                f.close()
        finally:
            partial.unlink(missing_ok=True)


def _ledger_tag(ledger: Path) -> str:
    """Names a ledger's partial folder: its name, and a hash of its full real path so that two jobs
    with ledgers of the same name elsewhere never share (and clean out) one partial folder."""
    real = ledger.resolve()
    return f"{real.stem}-{hashlib.sha256(str(real).encode()).hexdigest()[:8]}"


def open_output(out: Path | str, ledger: Path) -> OutputFolder:
    """The local folder, or for a URI the object store (its module loaded only then)."""
    if isinstance(out, str):
        from .store import ObjectStoreOutput

        return ObjectStoreOutput(out, ledger)
    return OutputFolder(out, ledger)
