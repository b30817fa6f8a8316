"""`batchtts audiobook` alone: how fast a narrated book is made into an M4B or an mp3, and how much
memory it takes, on a synthetic book narrated offline.

    python bench/audiobook_assembly.py                          # a 1-hour book of 6 chapters
    python bench/audiobook_assembly.py --hours 3 --chapters 18 --keep /tmp/book3h
    python bench/audiobook_assembly.py --book /tmp/book3h --split-hours 1
    python bench/audiobook_assembly.py --book /tmp/book3h --code /path/to/other/checkout

Narrates chapters of plain prose with `batchtts run --model local/espeak-ng --voice fable` (some 2.7
words a second), unless --book names a folder narrated before, then runs `batchtts audiobook` once
per output (and per --code checkout, its package put first on the path) in a process of its own, and
prints its wall and CPU time, speed as a multiple of real time by each, and peak RSS. CPU time is
the figure to compare on a shared machine: wall time counts what other processes take.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av

WORDS = (
    "the keeper lamp harbour ship night morning fog salt tide rope stair window light wind voice bay "
    "stone door table letter road town river field bell clock winter summer rain shadow hill garden "
    "quietly slowly again always never once under over across beside behind toward"
).split()
WORDS_PER_SECOND = 2.73  # espeak-ng's fable voice, on this prose


def chapters_csv(path: Path, hours: float, chapters: int) -> None:
    words = round(hours * 3600 * WORDS_PER_SECOND / chapters)
    rows = []
    for n in range(1, chapters + 1):
        rng = random.Random(n)
        sentences: list[str] = []
        while sum(len(s.split()) for s in sentences) < words:
            sentences.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16))).capitalize() + ".")
        rows.append({"id": f"ch-{n:02d}", "title": f"Chapter {n}", "track": str(n), "album": "Synthetic Book",
                     "artist": "A. Bench", "text": " ".join(sentences)})
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def measured(argv: list[str], env: dict[str, str], log: Path) -> tuple[float, float, float]:
    """Wall and CPU seconds and peak RSS (MB) of one command, its output in `log`."""
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)  # no checkout in cwd
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage, as /usr/bin/time reports it
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed:\n{log.read_text()[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def seconds_of(path: Path) -> float:
    """The decoded length, which a header may not say."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        return sum(frame.samples for frame in container.decode(stream)) / stream.rate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hours", type=float, default=1.0)
    parser.add_argument("--chapters", type=int, default=6)
    parser.add_argument("--book", type=Path, help="A folder narrated before (by this script's --keep).")
    parser.add_argument("--keep", type=Path, help="Keep the narrated book in this folder.")
    parser.add_argument("--to", nargs="+", default=["m4b", "mp3"], choices=["m4b", "m4a", "mp3"])
    parser.add_argument("--split-hours", type=float)
    parser.add_argument("--code", type=Path, action="append", default=[],
                        help="A checkout whose batchtts package to time (again for each); default: the installed one.")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="batchtts-assembly-"))
    try:
        book = args.book
        if book is None:
            book = args.keep or work / "book"
            book.mkdir(parents=True, exist_ok=True)
            chapters_csv(book / "chapters.csv", args.hours, args.chapters)  # kept with the book, for --book
            subprocess.run([sys.executable, "-m", "batchtts", "run", str(book / "chapters.csv"), "--out", str(book),
                            "--model", "local/espeak-ng", "--voice", "fable"], check=True, capture_output=True)
        print("| code | output | wall s | CPU s | x real time (CPU) | x real time (wall) | peak RSS MB |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
        for code in args.code or [None]:
            env = dict(os.environ)
            if code is not None:
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code.resolve()), env.get("PYTHONPATH")]))
            for suffix in args.to:
                dest = work / "out" / f"Book.{suffix}"
                shutil.rmtree(dest.parent, ignore_errors=True)
                argv = [sys.executable, "-m", "batchtts", "audiobook", str(book), "--to", str(dest)]
                if args.split_hours:
                    argv += ["--split-hours", str(args.split_hours)]
                wall, cpu, rss = measured(argv, env, work / "audiobook.log")
                audio = sum(seconds_of(p) for p in dest.parent.iterdir())
                label = "installed" if code is None else str(code)
                split = f", {len(list(dest.parent.iterdir()))} parts" if args.split_hours else ""
                print(f"| {label} | {suffix} ({audio / 3600:.2f} h{split}) | {wall:.1f} | {cpu:.1f} | {audio / cpu:.0f} | "
                      f"{audio / wall:.0f} | {rss:.0f} |", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
