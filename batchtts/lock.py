"""The lock that keeps runs apart: one run per ledger at a time; an overlapping one (cron firing
while the last run is still going) leaves at once, naming the process that holds it.

An advisory lock (flock) on a file beside the ledger, found by the ledger's real path, so a ledger
reached through a symbolic link is still one lock. The kernel drops it when its holder dies, even
by kill -9: a lock is never left behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import FolderLockedError, UsageError


def lock_path(ledger: Path) -> Path:
    real = ledger.resolve()
    return real.parent / f".batchtts-{real.name}.lock"


class Held:
    """A lock held, and what taking it made: a start refused before any work undoes both."""

    def __init__(self, path: Path, made: list[Path]) -> None:
        self.path = path
        self.made = made

    def undo(self) -> None:
        """Remove the lock file and the folders taking it made, where nothing else has come into them."""
        if not self.made:
            return  # the folder was there: its lock file stays, as after any run
        self.path.unlink(missing_ok=True)
        for folder in reversed(self.made):
            with contextlib.suppress(OSError):  # not empty: something else came into it
                folder.rmdir()


# A `status` asking whether a run is going holds a shared lock for a few microseconds: a run starting
# at that instant tries again for this long before it takes the lock for another run's.
_PATIENCE = 0.05


def _take(fd: int) -> bool:
    deadline = time.monotonic() + _PATIENCE
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)


@contextmanager
def hold(path: Path, root: Path) -> Iterator[Held]:
    """Hold the lock at `path` while the body runs; `root`, the output folder, is made first."""
    made = sorted({p for folder in (root, path.parent) for p in (folder, *folder.parents) if not p.exists()},
                  key=lambda p: len(p.parts))
    try:
        root.mkdir(parents=True, exist_ok=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise _unusable(root, exc) from exc
    try:
        if not _take(fd):
            holder = _pid_in(fd) or "unknown"
            raise FolderLockedError(
                f"another batchtts run (pid {holder}) is using {path.parent} with the same ledger; "
                "this run exits without doing anything"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except OSError as exc:  # a disk too full for the few bytes of a pid
            raise _unusable(root, exc) from exc
        yield Held(path, made)
    finally:
        os.close(fd)


def _unusable(root: Path, exc: OSError) -> UsageError:
    return UsageError(f"cannot use output folder {root}: {exc.strerror}")


def _pid_in(fd: int) -> str:
    """The pid the holder wrote into the lock file, as written."""
    return os.pread(fd, 64, 0).decode(errors="replace").strip()


def holder(ledger: Path) -> int | None:
    """The process of the run that holds the ledger now, or None: the lock itself is asked (a shared
    lock taken and let go at once; `hold` gives a run starting at that instant a moment to get it),
    so a pid left in the file by a run killed long ago, or alive in another container, never counts.
    0 when a run holds it but its pid cannot be read."""
    try:
        fd = os.open(lock_path(ledger), os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _pid_in(fd)
            return int(pid) if pid.isdigit() else 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
