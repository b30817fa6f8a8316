"""Where a dataset is written: a local folder, or a prefix of an object store (`s3://`, `gs://`,
through `pyarrow.fs`, as the runner's output).

Every file appears whole under its name or not at all. It is made aside, in a scratch folder (inside
the dataset's folder, so the rename into place is atomic; a temporary folder for an object store),
then renamed into place, or uploaded to a staging key and moved to its own. A shard whose name
waits on how many there will be (`train-00000-of-00004.parquet`) is kept under the staging name
(`stage`) until the last is written (`publish`).

A dataset goes into a new, or empty, folder: files of an earlier export (more shards, other splits)
would be read as part of this one.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from ..errors import UsageError
from ..names import PARTIAL_DIR
from ..redact import redact_uri
from ..store import _store, upload

SCRATCH = ".batchtts-export"


class Sink:
    def __init__(self, to: Path | str) -> None:
        self.to = to
        self._names = itertools.count()
        self._made: set[Path] = set()
        if isinstance(to, Path):
            self.fs: pafs.FileSystem | None = None
            self.base = ""
            self.scratch_dir = to / SCRATCH
        else:
            self.fs, base = _store(to)
            self.base = base.rstrip("/")
            self.staging = f"{self.base}/{PARTIAL_DIR}/export-{uuid.uuid4().hex[:12]}"
            self.scratch_dir = Path(tempfile.mkdtemp(prefix="batchtts-dataset-"))

    def __str__(self) -> str:
        return str(self.to) if isinstance(self.to, Path) else redact_uri(self.to)

    def where(self, relpath: str) -> str:
        """How a file of the dataset is named to people."""
        if isinstance(self.to, Path):
            return str(self.to / relpath)
        base, _, _ = redact_uri(self.to).partition("?")
        return f"{base.rstrip('/')}/{relpath}"

    def open(self) -> None:
        """Refuse a folder that holds anything; make the scratch folder."""
        try:
            if isinstance(self.to, Path):
                if self.to.exists() and (not self.to.is_dir() or any(self.to.iterdir())):
                    raise UsageError(f"{self} is not an empty folder: export a dataset into a new one")
                self.scratch_dir.mkdir(parents=True, exist_ok=True)
                return
            assert self.fs is not None
            found = self.fs.get_file_info(pafs.FileSelector(self.base, allow_not_found=True))
        except OSError as exc:
            raise UsageError(f"cannot write to {self}: {exc.strerror or exc}") from exc
        if found:
            raise UsageError(f"{self} is not empty: export a dataset under a new prefix")

    def scratch(self, suffix: str = "") -> Path:
        """A new local file name to make a file under, before it is put in place."""
        return self.scratch_dir / f"{next(self._names)}{suffix}"

    def put(self, local: Path, relpath: str) -> None:
        """Put a finished local file (made under `scratch`) in place; the local file is gone after."""
        try:
            if self.fs is None:
                final = Path(self.to) / relpath
                self._makedirs(final.parent)
                os.replace(local, final)
                return
            with open(local, "rb") as f:
                upload(f, self.fs, f"{self.base}/{relpath}", f"{self.staging}/{local.name}")
            local.unlink()
        except OSError as exc:
            raise UsageError(f"cannot write {self.where(relpath)}: {exc.strerror or exc}") from exc

    def put_bytes(self, data: bytes, relpath: str) -> None:
        if self.fs is not None:
            upload(io.BytesIO(data), self.fs, f"{self.base}/{relpath}", f"{self.staging}/{next(self._names)}")
            return
        local = self.scratch()
        try:
            local.write_bytes(data)
        except OSError as exc:
            raise UsageError(f"cannot write {self.where(relpath)}: {exc.strerror or exc}") from exc
        self.put(local, relpath)

    def stage(self, local: Path) -> str:
        """Keep a finished file under a name of its own until `publish` names it; returns that name."""
        if self.fs is None:
            return str(local)
        staged = f"{self.staging}/{local.name}"
        with open(local, "rb") as f:
            upload(f, self.fs, staged, f"{staged}.partial")
        local.unlink()
        return staged

    def publish(self, staged: str, relpath: str) -> None:
        if self.fs is None:
            self.put(Path(staged), relpath)
            return
        try:
            self.fs.move(staged, f"{self.base}/{relpath}")
        except OSError as exc:
            raise UsageError(f"cannot write {self.where(relpath)}: {exc}") from exc

    def close(self) -> None:
        """Remove the scratch folder and the staging prefix, with what a failed export left there."""
        shutil.rmtree(self.scratch_dir, ignore_errors=True)
        if self.fs is not None:
            with contextlib.suppress(OSError):
                self.fs.delete_dir(self.staging)

    def _makedirs(self, folder: Path) -> None:
        if folder not in self._made:
            folder.mkdir(parents=True, exist_ok=True)
            self._made.add(folder)
