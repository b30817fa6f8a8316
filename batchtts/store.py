"""Audio in an object store (`s3://`, `gs://`, `hdfs://`, through `pyarrow.fs`).

The audio is made in a local scratch folder next to the ledger, uploaded under
`PREFIX/.batchtts-partial/`, then moved to its final key, which therefore never holds a partial
object. The ledger is trusted for what is there: listing millions of keys to check them on every
rerun would cost more than the narration.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import BinaryIO

import pyarrow.fs as pafs

from .errors import StorageError, UsageError
from .names import CHUNK_DIR, PARTIAL_DIR
from .redact import redact_uri
from .storage import COPY_BUFFER, OutputFolder, Published


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

    def copy(self, source: str, relpath: str, size: int, sha256: str) -> Published:
        """Copy an object within the store (objects take no links): the store makes the new object
        whole or not at all."""
        final = f"{self.prefix}/{relpath}"
        try:
            self.fs.copy_file(f"{self.prefix}/{source}", final)
        except OSError as exc:
            raise StorageError(f"copy to {final} failed: {exc}") from exc
        return Published(Path(relpath), size, sha256)


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
            while block := f.read(COPY_BUFFER):
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
