"""Where audio lands: safe names, atomic publication, and the lock that keeps runs apart.

Local output: audio is written under `.batchtts-partial/<ledger>/` inside the output folder (the same
filesystem, so the final rename is atomic), fsynced, then renamed to its final name. A final name
therefore only ever holds a complete file; what a crash leaves behind is in the partial folder and
is removed by the next run with the same ledger, in time proportional to what was in flight rather
than to the size of the folder. Each ledger (each shard) has its own partial folder and lock, so
shards can share one output folder.

Object storage (`s3://`, `gs://`, `hdfs://`, through `pyarrow.fs`): the audio is made in a local
scratch folder next to the ledger, uploaded under `PREFIX/.batchtts-partial/`, then moved to its
final key, which therefore never holds a partial object. The ledger is trusted for what is there:
listing millions of keys to check them on every rerun would cost more than the narration.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
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

import pyarrow.fs as pafs

from .config import redact_uri
from .errors import FolderLockedError, StorageError, UsageError

PARTIAL_DIR = ".batchtts-partial"
CHUNK_DIR = ".batchtts-chunks"
_RESERVED = re.compile(r"^(\.batchtts|ledger(-shard-\d+-of-\d+)?\.sqlite)", re.IGNORECASE)
_COPY_BUFFER = 1024 * 1024

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
        if PurePosixPath(value).parts[:1] and _RESERVED.match(PurePosixPath(value).parts[0]):
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
    """A local output folder. `ledger` names the run's ledger: its lock and partial folder are per ledger."""

    def __init__(self, root: Path, ledger: Path) -> None:
        self.root = root
        self.partial_dir = root / PARTIAL_DIR / _ledger_tag(ledger)
        # By the ledger's real path: one ledger reached through a symbolic link is still one lock.
        real = ledger.resolve()
        self.lock_path = real.parent / f".batchtts-{real.name}.lock"
        self._made: set[Path] = set()
        self._partials = itertools.count()

    def __str__(self) -> str:
        return str(self.root)

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
        """Hold an exclusive lock on the ledger so an overlapping run (cron) leaves at once."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.lock_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UsageError(f"cannot use output folder {self.root}: {exc.strerror}") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                raise FolderLockedError(
                    f"another batchtts run (pid {holder}) is using {self.lock_path.parent} with the same ledger; "
                    "this run exits without doing anything"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield
        finally:
            os.close(fd)

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
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        size = f.tell()
        final = self.root / relpath
        try:
            self._makedirs(final.parent)
            try:
                os.replace(partial, final)
            except FileNotFoundError:
                if not partial.exists():
                    self._restage(partial, f)
                self._remake(final.parent)
                os.replace(partial, final)
        finally:
            f.close()
        return Published(final, size, digest)

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
            shutil.copyfileobj(f, copy, _COPY_BUFFER)
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


def _store(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path a URI names; its credentials stay out of the error."""
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot use {redact_uri(uri)}: {str(exc).replace(uri, redact_uri(uri))}") from exc
    return fs, path


class ObjectStoreOutput(OutputFolder):
    """Audio under a prefix of an object store; partials, chunks and the lock stay in a local folder.
    The store is reached only when audio is written: a dry run, `status` and the resume check use
    the ledger alone."""

    def __init__(self, uri: str, ledger: Path) -> None:
        super().__init__(ledger.parent, ledger)
        self.uri = uri
        self._tag = self.partial_dir.name  # the ledger's own name for its staging prefix too

    @functools.cached_property
    def _resolved(self) -> tuple[pafs.FileSystem, str]:
        fs, path = _store(self.uri)
        return fs, path.rstrip("/")

    @property
    def fs(self) -> pafs.FileSystem:
        return self._resolved[0]

    @property
    def prefix(self) -> str:
        return self._resolved[1]

    @property
    def staging(self) -> str:
        return f"{self.prefix}/{PARTIAL_DIR}/{self._tag}"

    def __str__(self) -> str:
        return redact_uri(self.uri)

    def has(self, relpath: str, size: int | None) -> bool:
        if relpath.startswith(CHUNK_DIR + "/"):
            return super().has(relpath, size)
        return size is not None

    def clean_partials(self) -> int:
        """Also remove staging objects a crash left, and check the store takes writes, before any
        audio is bought that could not be stored."""
        count = super().clean_partials()
        check = f"{self.staging}/.write-check-{os.getpid()}"
        try:
            with self.fs.open_output_stream(check) as probe:
                probe.write(b"batchtts")
            leftovers = self.fs.get_file_info(pafs.FileSelector(self.staging, allow_not_found=True, recursive=True))
            files = [info.path for info in leftovers if info.type == pafs.FileType.File]
            for path in files:
                self.fs.delete_file(path)
        except OSError as exc:
            raise UsageError(f"cannot write to {self}: {exc}") from exc
        return count + sum(1 for path in files if path != check)

    def tidy(self) -> None:
        super().tidy()
        if "_resolved" not in self.__dict__:
            return  # the store was never reached: nothing was staged
        try:
            self.fs.delete_dir(self.staging)
        except OSError:
            pass  # never created, or the store is unreachable: the next run's clean_partials empties it

    def publish(self, partial: Path, f: BinaryIO, relpath: str) -> Published:
        """Upload to a staging key, then move to the final key: a reader sees the whole object or none."""
        if relpath.startswith(CHUNK_DIR + "/"):
            return super().publish(partial, f, relpath)
        f.flush()
        f.seek(0)
        final = f"{self.prefix}/{relpath}"
        try:
            digest, size = upload(f, self.fs, final, f"{self.staging}/{partial.name}")
        finally:
            f.close()
            partial.unlink(missing_ok=True)
        return Published(Path(relpath), size, digest)


def publish_file(local: Path, uri: str) -> None:
    """Put a finished local file at an object-store URI, whole or not at all."""
    fs, path = _store(uri)
    with open(local, "rb") as f:
        upload(f, fs, path, f"{path}.partial-{os.getpid()}")


def upload(f: BinaryIO, fs: pafs.FileSystem, final: str, staging: str) -> tuple[str, int]:
    """Copy `f` to `staging`, then move it to `final`; returns sha256 and size. Raises StorageError."""
    digest = hashlib.sha256()
    size = 0
    try:
        with fs.open_output_stream(staging) as out:
            while block := f.read(_COPY_BUFFER):
                digest.update(block)
                out.write(block)
                size += len(block)
        fs.move(staging, final)
    except OSError as exc:
        try:
            fs.delete_file(staging)
        except OSError:
            pass  # not there, or the store is unreachable: the next run's clean_partials removes it
        raise StorageError(f"upload to {final} failed: {exc}") from exc
    return digest.hexdigest(), size


def open_output(out: Path | str, ledger: Path) -> OutputFolder:
    return ObjectStoreOutput(out, ledger) if isinstance(out, str) else OutputFolder(out, ledger)
