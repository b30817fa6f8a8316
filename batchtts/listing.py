"""Which recorded files are still in a local output folder: one listing of each folder, not a look per row.

A rerun of a finished job asks, for every row the ledger records as done, whether its file is still
there as recorded. Asked with a `stat` per row, a job of ten million rows pays ten million system
calls. `Listing` lists each folder rows write into once (`os.scandir`: names and types, from the
directory entries alone on Linux) and keeps an 8-byte hash of each regular file's name in sorted
arrays of a million, so a folder of ten million files costs 80 MB for the length of the plan.

A name in the listing says the file is there and is a file (a folder or a socket of that name is
not). Its size is the ledger's record, trusted: one file in SAMPLE_EVERY has its size looked at too,
and once one is found not as recorded, every file after it is. `verify` (`run --verify-files`)
looks at every file's size, as a full check. Batchtts itself publishes files whole (written aside,
then renamed), so a file of another size is one something else changed.
"""

from __future__ import annotations

import array
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .names import hash64

if TYPE_CHECKING:
    import numpy as np

SAMPLE_EVERY = 64  # files, of those listed, whose size is looked at without --verify-files
_RUN = 1 << 20  # file names hashed into one sorted array (8 MB); a folder of more has several


class Listing:
    """The regular files of a local output folder, listed once per folder as they are asked for."""

    def __init__(self, root: os.PathLike[str] | str, verify: bool = False, keep: tuple[str, ...] = ()) -> None:
        self._root = os.path.join(root, "")
        self.verify = verify
        self._keep = keep  # endings of the files whose names are kept as they are (`kept`)
        self._folders: dict[str, list[np.ndarray]] = {}
        self._subfolders: dict[str, frozenset[str]] = {}
        self._kept: dict[str, list[str]] = {}
        self._asked = 0
        self._expected: dict[tuple[str, int | None], bool] = {}

    def has(self, relpath: str, size: int | None) -> bool:
        """True if the file is in its folder's listing (and, when looked at, of the size recorded)."""
        known = self._expected.get((relpath, size))
        return self.have([(relpath, size)])[0] if known is None else known

    def expect(self, files: Sequence[tuple[str, int | None]]) -> None:
        """Look for the files `has` is about to be asked about, together (the next call forgets these)."""
        self._expected = dict(zip(files, self.have(files), strict=True))

    def have(self, files: Sequence[tuple[str, int | None]]) -> list[bool]:
        """`has` for many files at once: one search of each folder's listing per call."""
        import numpy as np  # loaded when files are looked for: `status` and a dry run into a new folder do without

        by_folder: dict[str, list[int]] = {}
        for i, (relpath, _) in enumerate(files):
            by_folder.setdefault(relpath.rpartition("/")[0], []).append(i)
        found = [False] * len(files)
        for folder, indices in by_folder.items():
            wanted = np.fromiter((hash64(files[i][0].rpartition("/")[2]) for i in indices), np.uint64, len(indices))
            listed = np.zeros(len(indices), bool)
            for names in self._listed(folder):
                at = np.minimum(np.searchsorted(names, wanted), len(names) - 1)
                listed |= names[at] == wanted
            for i, there in zip(indices, listed.tolist(), strict=True):
                found[i] = there and self._size_ok(*files[i])
        return found

    def _size_ok(self, relpath: str, size: int | None) -> bool:
        if size is None:
            return False
        self._asked += 1
        if not self.verify and self._asked % SAMPLE_EVERY:
            return True
        try:
            ok = os.stat(self._root + relpath).st_size == size
        except OSError:
            ok = False
        if not ok:
            self.verify = True  # something changed files behind the ledger's back: look at every one from here on
        return ok

    def subfolders(self, folder: str) -> frozenset[str]:
        """The folders (not links to folders) in one folder, from the same listing as its files."""
        self._listed(folder)
        return self._subfolders[folder]

    def kept(self, folder: str = "") -> list[str]:
        """The names of the files in one folder that end as `keep` says, from the same listing: a
        run's ledgers beside its audio, found without listing ten million files again."""
        self._listed(folder)
        return self._kept[folder]

    def _listed(self, folder: str) -> list[np.ndarray]:
        """The hashes of the regular files' names in one folder, in sorted runs of up to _RUN (none
        when it is not there): an array grown to ten million would need twice its size as it grows."""

        if folder not in self._folders:
            runs: list[np.ndarray] = []
            hashes = array.array("Q")
            folders: list[str] = []
            kept: list[str] = []
            try:
                with os.scandir(self._root + folder if folder else self._root) as entries:
                    for entry in entries:
                        if entry.is_file():
                            hashes.append(hash64(entry.name))
                            if self._keep and entry.name.endswith(self._keep):
                                kept.append(entry.name)
                            if len(hashes) == _RUN:
                                runs.append(_sorted(hashes))
                                hashes = array.array("Q")
                        elif entry.is_dir(follow_symlinks=False):
                            folders.append(entry.name)
            except OSError:  # not there, or not a folder: no file or folder in it is there
                pass
            if hashes:
                runs.append(_sorted(hashes))
            self._folders[folder] = runs
            self._subfolders[folder] = frozenset(folders)
            self._kept[folder] = kept
        return self._folders[folder]


def _sorted(hashes: array.array[int]) -> np.ndarray:
    import numpy as np

    run = np.frombuffer(hashes, np.uint64)
    run.sort()  # in place: the array's memory, 8 bytes a file
    return run
