"""Which recorded files are still in a local output folder: one listing of each folder, not a look per row.

A rerun of a finished job asks, for every row the ledger records as done, whether its file is still
there as recorded. Asked with a `stat` per row, a job of ten million rows pays ten million system
calls. `Listing` lists each folder rows write into once (`os.scandir`: names and types, from the
directory entries alone on Linux) and keeps 48 bits of a hash of each regular file's name in 4
bytes: 16 bits say which of 65,536 runs holds it, and the run holds the next 32, sorted. A folder of
ten million files costs 40 MB for the length of the plan (80 MB for the moment it is listed, as
each of 16 parts of the full hashes is sorted and cut down in turn), and a name is looked for by a
binary search of its run, a batch of names at once. A name not there is taken for one that is once
in 2^48 / (files listed): once in 28 million at ten million files (`--verify-files` looks at every
file, so it is not fooled).

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
_RUN_BITS = 16  # a hash's first bits, which say the run that holds it
_PART_BITS = 4  # of those, the first: the listing is sorted a sixteenth at a time
_RUNS = 1 << _RUN_BITS
_PARTS = 1 << _PART_BITS
_RUN_SHIFT = 64 - _RUN_BITS  # a hash shifted by this is its run
_KEPT_SHIFT = _RUN_SHIFT - 32  # ... and by this, its run and the 32 bits kept (a uint32 keeps those)


class Listing:
    """The regular files of a local output folder, listed once per folder as they are asked for."""

    def __init__(self, root: os.PathLike[str] | str, verify: bool = False, keep: tuple[str, ...] = ()) -> None:
        self._root = os.path.join(root, "")
        self.verify = verify
        self._keep = keep  # endings of the files whose names are kept as they are (`kept`)
        self._folders: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # (where each run starts, the runs)
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
        by_folder: dict[str, list[int]] = {}
        for i, (relpath, _) in enumerate(files):
            by_folder.setdefault(relpath.rpartition("/")[0], []).append(i)
        found = [False] * len(files)
        for folder, indices in by_folder.items():
            listed = self._find(folder, [files[i][0].rpartition("/")[2] for i in indices])
            for i, there in zip(indices, listed.tolist(), strict=True):
                found[i] = there and self._size_ok(*files[i])
        return found

    def have_all(self, names: Sequence[str], sizes: Sequence[int | None]) -> bool:
        """Whether every one of these files of the top folder is there (as `have` says of each): a
        rerun's batch of a thousand rows done, asked in one go."""
        if not names:
            return True
        if None in sizes or not bool(self._find("", names).all()):
            return False
        first = self._asked + 1
        self._asked += len(names)
        if self.verify:
            looked = range(len(names))
        else:  # the files whose turn it is, one in SAMPLE_EVERY counted over every file asked about
            looked = range(-first % SAMPLE_EVERY, len(names), SAMPLE_EVERY)
        return all(self._size_right(names[i], sizes[i]) for i in looked)

    def _find(self, folder: str, names: Sequence[str]) -> np.ndarray:
        """Which of these names of files of one folder are in its listing: a binary search of each
        name's run, all the names' searches a step at a time."""
        import numpy as np  # loaded when files are looked for: `status` and a dry run into a new folder do without

        starts, hashes = self._listed(folder)
        wanted = np.fromiter(map(hash64, names), np.uint64, len(names))
        run = (wanted >> np.uint64(_RUN_SHIFT)).astype(np.intp)
        value = (wanted >> np.uint64(_KEPT_SHIFT)).astype(np.uint32)
        low, end = starts[run], starts[run + 1]
        high = end.copy()
        last = max(len(hashes) - 1, 0)
        while (searching := low < high).any():
            middle = (low + high) >> 1
            below = hashes[np.minimum(middle, last)] < value
            low = np.where(searching & below, middle + 1, low)
            high = np.where(searching & ~below, middle, high)
        return (low < end) & (hashes[np.minimum(low, last)] == value) if len(hashes) else np.zeros(len(names), bool)

    def _size_ok(self, relpath: str, size: int | None) -> bool:
        if size is None:
            return False
        self._asked += 1
        if not self.verify and self._asked % SAMPLE_EVERY:
            return True
        return self._size_right(relpath, size)

    def _size_right(self, relpath: str, size: int | None) -> bool:
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

    def _listed(self, folder: str) -> tuple[np.ndarray, np.ndarray]:
        """The listing of one folder's regular files: where each run starts (and the end), and the
        runs (empty when the folder is not there)."""
        import numpy as np

        if folder not in self._folders:
            parts = [array.array("Q") for _ in range(_PARTS)]
            folders: list[str] = []
            kept: list[str] = []
            try:
                with os.scandir(self._root + folder if folder else self._root) as entries:
                    for entry in entries:
                        if entry.is_file():
                            name = entry.name
                            value = hash64(name)
                            parts[value >> (64 - _PART_BITS)].append(value)
                            if self._keep and name.endswith(self._keep):
                                kept.append(name)
                        elif entry.is_dir(follow_symlinks=False):
                            folders.append(entry.name)
            except OSError:  # not there, or not a folder: no file or folder in it is there
                pass
            hashes = np.empty(sum(map(len, parts)), np.uint32)
            counts = np.zeros(_RUNS, np.intp)
            at = 0
            for index, part in enumerate(parts):
                full = np.frombuffer(part, np.uint64)
                full.sort()  # in place: by run, then by the bits kept
                hashes[at:at + len(full)] = full >> np.uint64(_KEPT_SHIFT)  # the bits kept, in order
                counts += np.bincount((full >> np.uint64(_RUN_SHIFT)).astype(np.intp), minlength=_RUNS)
                at += len(full)
                del full
                parts[index] = array.array("Q")  # its 8 bytes a file given back before the next part is sorted
            starts = np.zeros(_RUNS + 1, np.intp)
            np.cumsum(counts, out=starts[1:])
            self._folders[folder] = (starts, hashes)
            self._subfolders[folder] = frozenset(folders)
            self._kept[folder] = kept
        return self._folders[folder]
