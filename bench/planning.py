"""What planning costs per row, and what a command costs to start.

    python bench/planning.py              # 10,000 rows
    python bench/planning.py --rows 100000

Prints three tables:
  1. calls per row over a manifest with ids and one without (rows keyed by content): a dry run
     against an empty ledger, the run itself (answered by a provider of silence, plugged in through
     the provider seam, so only planning and recording cost anything), a dry run against the
     completed ledger, and the run after 1 row in 100 was edited: building a row (`make_row`), the
     resume rule (`needs_work`) and the sha256 fingerprint (`sha256`);
  2. wall time of `batchtts --version` and `batchtts status` of a 6-row job (median of 5), beside
     `python -c pass` measured in the same run;
  3. the package modules each module imports, largest first.

Counts are taken by function name, in every thread, so they do not depend on how the code is arranged.
"""

from __future__ import annotations

import argparse
import ast
import csv
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import batchtts
from batchtts import Defaults, Job
from batchtts.providers import SpeechRequest

ROOT = Path(__file__).resolve().parent.parent
COUNTED = ("make_row", "needs_work", "sha256")
PROFILED = ("make_row", "needs_work")  # sha256 is counted by a wrapper: it is a C function


@dataclass
class Audio:
    content_type: str = "audio/pcm;rate=24000;channels=1"
    content_length: int | None = 4800
    generation_id: str | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        yield bytes(4800)


class Silence:
    """A tenth of a second of silence for every request, at once."""

    @asynccontextmanager
    async def speak(self, request: SpeechRequest) -> AsyncIterator[Audio]:
        yield Audio()

    async def aclose(self) -> None:
        return None


def manifest(path: Path, rows: int, ids: bool, edited: int = 0) -> Path:
    """`rows` rows; the first `edited` of every 100 say something else than they did."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text"] if ids else ["text"])
        for i in range(rows):
            text = f"Sentence number {i} of the planning benchmark{' (edited)' if i % 100 < edited else ''}."
            writer.writerow([f"r{i}", text] if ids else [text])
    return path


def calls(job: Job, provider: Silence | None = None) -> dict[str, int]:
    """Calls by function name during one run of `job`, in every thread."""
    real_sha256 = hashlib.sha256
    counted = dict.fromkeys(COUNTED, 0)

    def sha256(*args: Any, **kwargs: Any) -> Any:
        counted["sha256"] += 1
        return real_sha256(*args, **kwargs)

    def profile(frame: FrameType, event: str, arg: object) -> None:
        if event == "call" and frame.f_code.co_name in PROFILED:
            counted[frame.f_code.co_name] += 1

    hashlib.sha256 = sha256  # type: ignore[assignment]
    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        batchtts.run(job, provider)
    finally:
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]
        hashlib.sha256 = real_sha256
    return counted


def planning_table(rows: int) -> None:
    print(f"Calls per row, {rows:,} rows")
    print(f"{'manifest':<10} {'pass':<10} " + " ".join(f"{name:>11}" for name in COUNTED))
    with tempfile.TemporaryDirectory() as tmp:
        for ids in (True, False):
            path = manifest(Path(tmp) / f"m-{ids}.csv", rows, ids)
            out = Path(tmp) / f"out-{ids}"
            defaults = Defaults(model="openai/gpt-4o-mini-tts", voice="alloy", format="wav")
            for what in ("dry run", "run", "dry rerun", "1% edited"):
                if what == "1% edited":
                    manifest(path, rows, ids, edited=1)
                job = Job(manifest=path, out=out, defaults=defaults, dry_run=what.startswith("dry"),
                          prices={defaults.model: 0.6})
                counted = calls(job, None if job.dry_run else Silence())
                print(f"{'ids' if ids else 'no ids':<10} {what:<10} "
                      + " ".join(f"{counted.get(name, 0) / rows:>11.2f}" for name in COUNTED))
        print()
        small = Path(tmp) / "small"
        batchtts.run(Job(manifest=manifest(Path(tmp) / "small.csv", 6, True), out=small,
                         defaults=Defaults(model="local/espeak-ng", voice="en", format="wav")))
        startup_table(small)


def median_wall(cmd: list[str], times: int = 5) -> float:
    walls = []
    for _ in range(times):
        started = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=False)
        walls.append(time.perf_counter() - started)
    return statistics.median(walls)


def startup_table(out: Path) -> None:
    print("Start-up wall time, median of 5")
    print(f"{'command':<32} {'seconds':>8} {'vs python':>10}")
    base = median_wall([sys.executable, "-c", "pass"])
    for label, cmd in (("python -c pass", [sys.executable, "-c", "pass"]),
                       ("batchtts --version", [sys.executable, "-m", "batchtts", "--version"]),
                       ("batchtts status (6 rows)", [sys.executable, "-m", "batchtts", "status", str(out)])):
        wall = base if label == "python -c pass" else median_wall(cmd)
        print(f"{label:<32} {wall:>8.3f} {wall / base:>9.1f}x")
    imported = subprocess.run([sys.executable, "-c", "import sys, batchtts.cli; "
                               "print(sum(m in sys.modules for m in ('httpx', 'aiohttp', 'batchtts.client')))"],
                              capture_output=True, text=True, check=True).stdout.strip()
    print(f"HTTP modules loaded by the CLI before a command runs: {imported} of 3")
    print()


def imports_table() -> None:
    print("Package modules each module imports (largest first)")
    counts = []
    package = ROOT / "batchtts"
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package).with_suffix("").parts
        within = list(parts[:-1])  # the subpackage a relative import starts from
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = within[:len(within) - node.level + 1]
                modules = [node.module] if node.module else [a.name for a in node.names]
                names.update(".".join([*base, m]) for m in modules)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "batchtts"
        counts.append((len(names), name, os.path.getsize(path)))
    counts.sort(reverse=True)
    print(f"{'module':<18} {'imports':>8} {'bytes':>8}")
    for count, name, size in counts[:8]:
        print(f"{name:<18} {count:>8} {size:>8,}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000)
    args = parser.parse_args()
    planning_table(args.rows)
    imports_table()


if __name__ == "__main__":
    main()
