"""The lock that keeps runs apart: one run per ledger at a time; an overlapping one (cron firing
while the last run is still going) leaves at once, naming the process that holds it.

An advisory lock (flock) on a file beside the ledger, found by the ledger's real path, so a ledger
reached through a symbolic link is still one lock. The kernel drops it when its holder dies, even
by kill -9: a lock is never left behind.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import FolderLockedError, UsageError


def lock_path(ledger: Path) -> Path:
    real = ledger.resolve()
    return real.parent / f".batchtts-{real.name}.lock"


@contextmanager
def hold(path: Path, root: Path) -> Iterator[None]:
    """Hold the lock at `path` while the body runs; `root`, the output folder, is made first."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise UsageError(f"cannot use output folder {root}: {exc.strerror}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise FolderLockedError(
                f"another batchtts run (pid {holder}) is using {path.parent} with the same ledger; "
                "this run exits without doing anything"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)
