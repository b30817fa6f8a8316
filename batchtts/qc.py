"""QC: a job's audio measured on disk and held to a store's spec, file by file.

    from batchtts.qc import check_files
    for f in check_files("out/book"):                        # the mastered files, each to its preset
        print(f.row, f.passed, f.problems)
    failing = [f for f in check_files("out/book", "acx") if not f.passed]

A job that masters is checked by its mastered files: a row without one (never mastered, mastering
failed, or narrated again since) fails. A job that does not is checked by its narrated files, against
the preset named. Every file is decoded and measured afresh, several at once: what the ledger
recorded when the file was made is not taken on trust.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cores import cpus
from .decoding import PcmShape
from .errors import UsageError
from .mastering import (
    MEASUREMENTS,
    MasteringError,
    Measurement,
    MemoryBudget,
    check,
    measure_file,
    memory_for,
    preset,
)
from .results import open_context


@dataclass(frozen=True)
class FileCheck:
    """One file measured and held to a preset: `measurement` is None when there was nothing to measure."""

    row: int | None
    id: str
    path: str | None  # relative to the output folder
    preset: str
    measurement: Measurement | None
    problems: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        measured = self.measurement.as_dict() if self.measurement is not None else dict.fromkeys(MEASUREMENTS)
        return {"row": self.row, "id": self.id, "path": self.path, "preset": self.preset, "passed": self.passed,
                "problems": list(self.problems), **measured}


@dataclass(frozen=True)
class _Planned:
    """A file to measure, or a row that fails without one (`problem`)."""

    row: int | None
    id: str
    path: str | None
    preset: str
    pcm: PcmShape | None = None
    problem: str | None = None
    memory: int = 0  # what measuring it is expected to hold


def check_files(target: Path | str, preset_name: str | None = None) -> Iterator[FileCheck]:
    """Each row done in an output folder (or ledger file), in manifest order, its file measured and
    checked: the mastered file against its own preset (or `preset_name`), or, for a job that does
    not master, the narrated file against `preset_name`."""
    planned, root = _plan(Path(target), preset_name)
    budget = MemoryBudget()
    with ThreadPoolExecutor(max_workers=cpus(), thread_name_prefix="batchtts-qc") as pool:
        try:
            yield from pool.map(lambda p: _check(p, root, budget), planned)
        finally:
            pool.shutdown(cancel_futures=True)


def _plan(target: Path, preset_name: str | None) -> tuple[list[_Planned], Path]:
    """What to measure, read from the ledgers before any file is: they are closed while it is."""
    if preset_name is not None:
        preset(preset_name)  # an unknown name is refused before anything is read
    ctx = open_context([str(target)], None, None)
    try:
        if not isinstance(ctx.out, Path):
            raise UsageError("qc measures local files: the audio of this ledger is in an object store")
        done = sorted((pair for ledger in ctx.ledger.ledgers for pair in ledger.done_rows()),
                      key=lambda pair: pair[0]["row_number"] or 0)
    finally:
        ctx.ledger.close()
    if not done:
        raise UsageError(f"{target} holds no narrated files yet: run the job first")
    masters = any(made is not None and made["status"] == "done" for _, made in done)
    if not masters and preset_name is None:
        raise UsageError(f"{target} holds no mastered files: pass --preset acx or --preset podcast to check the "
                         "narrated files against a store's spec, or run the job with --master to master them")
    usual = Counter(made["preset"] for _, made in done if made is not None).most_common(1)
    planned: list[_Planned] = []
    for row, made in done:
        key, number = row["key"], row["row_number"]
        if not masters:
            assert preset_name is not None
            pcm = PcmShape(row["sample_rate"], row["channels"]) if row["format"] == "pcm" else None
            memory = memory_for(row["duration_s"], row["channels"], row["sample_rate"] or 44100)
            planned.append(_Planned(number, key, row["path"], preset_name, pcm, memory=memory))
        elif made is None or made["status"] != "done":
            problem = "not mastered" + (f": {made['error']}" if made is not None and made["error"] else "")
            planned.append(_Planned(number, key, None, preset_name or (made or {}).get("preset") or usual[0][0],
                                    problem=problem))
        elif made["source_sha256"] != row["sha256"]:
            planned.append(_Planned(number, key, made["path"], preset_name or made["preset"],
                                    problem="narrated again since it was mastered: run the job to master it again"))
        else:
            memory = memory_for(made["length_s"], made["channels"], made["sample_rate"] or 44100)
            planned.append(_Planned(number, key, made["path"], preset_name or made["preset"], memory=memory))
    return planned, ctx.out


def _check(planned: _Planned, root: Path, budget: MemoryBudget) -> FileCheck:
    if planned.problem is not None or planned.path is None:
        return FileCheck(planned.row, planned.id, planned.path, planned.preset, None, (planned.problem or "",))
    if not (root / planned.path).is_file():
        return FileCheck(planned.row, planned.id, planned.path, planned.preset, None,
                         (f"{planned.path} is missing: run the job again to make it",))
    try:
        with budget.held(planned.memory):
            measured = measure_file(root / planned.path, planned.pcm)
    except MasteringError as exc:
        return FileCheck(planned.row, planned.id, planned.path, planned.preset, None, (f"cannot be measured: {exc}",))
    verdict = check(measured, preset(planned.preset))
    return FileCheck(planned.row, planned.id, planned.path, planned.preset, measured, verdict.problems)
