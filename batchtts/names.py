"""File names: which files the rows of a manifest may write, checked before the first request.

A row's id or `output` is checked as text when the manifest is read (`unsafe_reason`), and a key
that cannot name a file as it is gets a safe name (`safe_name`). `OutputChecks` then checks the
whole set of names against each other and against the real file system: a name too
long for it, a file of one row that is a folder of another, a folder that leads out of the output
folder through a symbolic link, a folder standing where a file must go, or one of the files
batchtts itself keeps there (the ledger, its -wal and -shm, the lock). Each would fail only after
the audio was bought, or worse, overwrite the ledger with audio.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from .errors import ManifestError, ManifestProblem
from .repeats import Hashes

if TYPE_CHECKING:
    from .listing import Listing
    from .manifest import Row

PARTIAL_DIR = ".batchtts-partial"
CHUNK_DIR = ".batchtts-chunks"
MASTERED_DIR = "mastered"  # the mastered copies of the narrated files
_RESERVED = re.compile(r"^(\.batchtts|ledger(-shard-\d+-of-\d+)?\.sqlite)", re.IGNORECASE)

_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_DRIVE = re.compile(r"^[A-Za-z]:")
_SEPARATORS = re.compile(r"[\\/]")
MAX_NAME = 120  # characters of a key kept in its file name; a hash of 10 follows a changed one


def unsafe_reason(value: str, allow_folders: bool = False) -> str | None:
    """Why `value` may not name a file under the output folder, or None if it may."""
    if "\x00" in value:
        return "contains a NUL character"
    if value.startswith(("/", "\\")):
        return f"{value!r} is an absolute path"
    if _DRIVE.match(value):
        return f"{value!r} starts with a drive letter"
    if ".." in value and ".." in _SEPARATORS.split(value):
        return f"{value!r} climbs out of the output folder with '..'"
    if allow_folders:
        if "\\" in value:
            return f"{value!r} contains a backslash: separate folders with '/'"
        top, *below = PurePosixPath(value).parts or ("",)
        if _RESERVED.match(top) or (below and top.lower() == MASTERED_DIR):
            return f"{value!r} is a name batchtts uses itself"
    return None


def normalise_relpath(value: str) -> str:
    return str(PurePosixPath(value))


def safe_name(key: str) -> str:
    """A file name for a key; keys that had to be changed get a hash so two keys never share a name."""
    name = _UNSAFE_CHARS.sub("_", key)
    if name == key and not name.startswith(".") and len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{name.lstrip('.')[:MAX_NAME]}-{digest}"


def chunk_path(fingerprint: str, fmt: str) -> str:
    """Chunks of long rows are kept by content, so an edited chapter asks again only for the pieces
    that changed."""
    return f"{CHUNK_DIR}/{fingerprint[:2]}/{fingerprint}.{fmt}"


def hash64(value: str) -> int:
    """An 8-byte hash of a key or a file name: enough to find repeats among millions in little memory.
    Python's own string hash (SipHash, 64 bits, keyed anew in each process), which a string keeps once
    made: these hashes never leave the process that made them."""
    return hash(value) & 0xFFFF_FFFF_FFFF_FFFF


_LEDGER_COMPANIONS = ("", "-wal", "-shm", "-journal")


def owned_files(root: Path, ledger: Path, lock: Path) -> dict[str, str]:
    """The files batchtts keeps under `root`, by their casefolded relative name: what each one is."""
    owned: dict[str, str] = {}
    for path, what in [*((Path(f"{ledger}{s}"), "the ledger's own file") for s in _LEDGER_COMPANIONS),
                       (lock, "the ledger's lock file")]:
        for base in {os.path.abspath(root), os.path.realpath(root)}:
            for candidate in {os.path.abspath(path), os.path.realpath(path)}:
                if candidate.startswith(base + os.sep):
                    owned[PurePosixPath(os.path.relpath(candidate, base)).as_posix().casefold()] = what
    return owned


class OutputChecks:
    """Sees every row's file name in one pass (`see`), then says what is wrong (`raise_problems`).

    Memory: 8 bytes a row for the file names (on disk past a million rows: repeats.py), and a
    dictionary of the folders rows write into (few, in practice); the file system is asked once per
    folder and once per row left to do."""

    shown = ManifestError.shown

    def __init__(self, root: Path | None, owned: dict[str, str], listing: Listing | None = None) -> None:
        self.root = root  # None for object-store output: only the names are checked
        self.owned = owned
        self._listing = listing  # root's: the plan's listing of its files, which lists its folders too
        self.problems: list[ManifestProblem] = []
        self.total = 0
        self._files = Hashes()  # spilled to disk past a million rows (repeats.py)
        self._folders: dict[int, tuple[str, Row]] = {}  # hash -> (folder, first row writing into it)
        self._folder_verdicts: dict[str, str | None] = {}
        self._name_max = self._path_max = 0
        if root is not None:
            self._real_root = os.path.realpath(root)
            self._name_max, self._path_max = _limits(root)
            self._root_bytes = len(os.fsencode(os.fspath(root) + os.sep))

    def _problem(self, row: Row, message: str) -> None:
        self.total += 1
        if len(self.problems) < self.shown:
            self.problems.append(ManifestProblem(row.number, message, row.id))

    def see(self, row: Row, pending: bool) -> None:
        """Every row, done or not; `pending` rows (to be written this run) are also checked on disk."""
        relpath = row.relpath
        folded = relpath.casefold()
        if (what := self.owned.get(folded)) is not None:
            self._problem(row, f"output {relpath!r} is {what}: writing audio there would destroy it")
            return
        self._files.append(hash64(folded))
        parts = relpath.split("/")
        for depth in range(1, len(parts)):
            folder = "/".join(parts[:depth])
            self._folders.setdefault(hash64(folder.casefold()), (folder, row))
        if self.root is None:
            return
        if too_long := self._too_long(relpath):
            self._problem(row, too_long)
        elif pending and (on_disk := self._on_disk(relpath)):
            self._problem(row, on_disk)

    def fits_plain(self, relpaths: list[str]) -> bool:
        """Whether `see` would find nothing wrong on disk with these names of files in the output
        folder itself (no folders): none too long, none a folder there now."""
        if self.root is None:
            return True
        longest = max(map(len, relpaths), default=0)
        if 4 * longest > self._name_max or self._root_bytes + 4 * longest >= self._path_max:
            return False
        return self._subfolders("").isdisjoint(relpaths)

    def see_named(self, folded: list[str]) -> None:
        """`see` of rows once `fits_plain` has passed their names and none is a file batchtts keeps:
        only the names are kept, to find files of one row that are folders of another."""
        self._files.extend(map(hash64, folded))

    def _too_long(self, relpath: str) -> str | None:
        if 4 * len(relpath) <= self._name_max and self._root_bytes + 4 * len(relpath) < self._path_max:
            return None  # no UTF-8 character takes more than 4 bytes: short enough without encoding it
        for part in relpath.split("/"):
            if len(os.fsencode(part)) > self._name_max:
                return (f"output name {part[:40]!r}… is {len(os.fsencode(part))} bytes long; this file system takes "
                        f"at most {self._name_max}")
        if self._root_bytes + len(os.fsencode(relpath)) >= self._path_max:
            return f"output path {relpath[:40]!r}… is too long for this file system (at most {self._path_max} bytes)"
        return None

    def _on_disk(self, relpath: str) -> str | None:
        assert self.root is not None
        parent = relpath.rpartition("/")[0]
        if parent:
            if parent not in self._folder_verdicts:
                self._folder_verdicts[parent] = self._folder_problem(parent)
            if (verdict := self._folder_verdicts[parent]) is not None:
                return verdict
        if relpath.rpartition("/")[2] in self._subfolders(parent):
            return f"output {relpath!r} is a folder on disk: the audio file cannot take its place"
        return None

    def _subfolders(self, folder: str) -> frozenset[str]:
        """The folders (not links to folders) in one folder of the output: one listing of it, not a
        look per row, whatever the number of rows writing there."""
        assert self._listing is not None
        return self._listing.subfolders(folder)

    def _folder_problem(self, folder: str) -> str | None:
        assert self.root is not None
        real = os.path.realpath(self.root / folder)
        if real != self._real_root and not real.startswith(self._real_root + os.sep):
            return f"folder {folder!r} leads out of the output folder through a symbolic link (to {real})"
        here = self.root
        for part in folder.split("/"):
            here = here / part
            if os.path.exists(here) and not os.path.isdir(here):
                return f"{here.relative_to(self.root).as_posix()!r} is a file on disk, not a folder"
        return None

    def raise_problems(self, path: Path) -> None:
        """Raise ManifestError for what `see` found, and for files of one row that are folders of another."""
        try:
            clashes = self._files.among(self._folders) if self._folders else set()
        finally:
            self._files.close()
        for key in sorted(clashes):
            folder, row = self._folders[key]
            self._problem(row, f"writes into folder {folder!r}, which another row writes as a file")
        if self.total:
            self.problems.sort(key=lambda p: p.row or 0)
            raise ManifestError(str(path), self.problems, self.total)


def _limits(root: Path) -> tuple[int, int]:
    """The longest file name and path the output folder's file system takes."""
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return os.pathconf(probe, "PC_NAME_MAX"), os.pathconf(probe, "PC_PATH_MAX")
    except (OSError, ValueError):
        return 255, 4096
