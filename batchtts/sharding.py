"""Splitting one manifest over many machines, with the schedulers people already run.

A row belongs to shard `hash(key) mod N`: it depends on the row's own key only, so a row stays in
its shard when the manifest grows, shrinks or is reordered, and a rerun of shard I finds its rows in
shard I's ledger. The index comes from `--shard I/N`, or from the scheduler: Kubernetes Indexed Jobs
set `JOB_COMPLETION_INDEX` (the count is the Job's `completions`, given as `--shards N`); Slurm job
arrays set `SLURM_ARRAY_TASK_ID` and `SLURM_ARRAY_TASK_COUNT` (an array given as a range, `--array=0-7` or
`--array=1-16:2`, counts from its first task in steps of its step).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError

_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
_LEDGER_NAME = re.compile(r"^(?P<stem>.+)-shard-(?P<index>\d{4,})-of-(?P<count>\d{4,})$")


@dataclass(frozen=True)
class Shard:
    index: int
    count: int
    source: str = field(default="--shard", compare=False)  # where the index came from, for the summary

    def __post_init__(self) -> None:
        if self.count < 1:
            raise UsageError(f"shard {self.index}/{self.count}: the number of shards must be at least 1")
        if not 0 <= self.index < self.count:
            raise UsageError(f"shard {self.index}/{self.count}: the index must be 0 to {self.count - 1}")

    def owns(self, key: str) -> bool:
        return shard_of(key, self.count) == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def shard_of(key: str, count: int) -> int:
    """Stable across processes, machines and Python versions (unlike `hash()`)."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


def ledger_for(named: Path, shard: Shard | None) -> Path:
    """Each shard's ledger sits next to the one named, named after the shard: `ledger-shard-0002-of-0008.sqlite`."""
    if shard is None:
        return named
    return named.with_name(f"{named.stem}-shard-{shard.index:04d}-of-{shard.count:04d}{named.suffix}")


def named_ledger(path: Path) -> tuple[Path, Shard | None]:
    """The ledger a shard's ledger file belongs to, and its shard; a plain ledger is its own."""
    match = _LEDGER_NAME.match(path.stem)
    if match is None:
        return path, None
    try:
        shard = Shard(int(match["index"]), int(match["count"]))
    except UsageError:
        return path, None
    return path.with_name(match["stem"] + path.suffix), shard


def parse(spec: str, source: str = "--shard") -> Shard:
    match = _SPEC.match(spec)
    if match is None:
        raise UsageError(f"{source} takes I/N, for example 0/8, not {spec!r}")
    return Shard(int(match[1]), int(match[2]), source)


def detect(shard: str | None, shards: int | None, environ: Mapping[str, str] = os.environ) -> Shard | None:
    """`--shard I/N` if given; else the scheduler's array index; else no sharding."""
    if shard is not None:
        given = parse(shard)
        if shards is not None and shards != given.count:
            raise UsageError(f"--shard {shard} and --shards {shards} disagree: give one of them")
        return given
    if "JOB_COMPLETION_INDEX" in environ:
        if shards is None:
            raise UsageError("running as a Kubernetes Indexed Job: pass --shards N with N the Job's completions")
        return Shard(_int(environ, "JOB_COMPLETION_INDEX"), shards, "JOB_COMPLETION_INDEX")
    if "SLURM_ARRAY_TASK_ID" in environ:
        offset = _int(environ, "SLURM_ARRAY_TASK_ID") - _int(environ, "SLURM_ARRAY_TASK_MIN", 0)
        task, off_step = divmod(offset, max(1, _int(environ, "SLURM_ARRAY_TASK_STEP", 1)))
        if off_step:
            raise UsageError("SLURM_ARRAY_TASK_ID is not on the array's step: give the array as a range, "
                             "for example --array=0-7, or pass --shard I/N")
        count = _int(environ, "SLURM_ARRAY_TASK_COUNT")
        if shards is not None and shards != count:
            raise UsageError(f"--shards {shards}, but the Slurm array has {count} tasks: rows of the missing "
                             "shards would never be narrated; make them equal")
        return Shard(task, count, "SLURM_ARRAY_TASK_ID")
    if shards is not None:
        raise UsageError("--shards N needs an index: --shard I/N, JOB_COMPLETION_INDEX or SLURM_ARRAY_TASK_ID")
    return None


def _int(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = environ.get(name)
    if value is None:
        if default is None:
            raise UsageError(f"{name} is not set")
        return default
    try:
        return int(value or "")
    except ValueError:
        raise UsageError(f"{name}={value!r} is not a whole number") from None
