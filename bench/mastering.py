"""One chapter mastered to each preset on one core: time, speed and peak memory of `mastering.master`.

    python bench/mastering.py                    # ~800 words of prose: about 300 s of audio
    python bench/mastering.py --minutes 30       # a 30-minute chapter (the memory figure to watch)
    python bench/mastering.py --keep out/bench   # keep the narrated and mastered files

Narrates the chapter offline (`batchtts run`, local/espeak-ng, voice fable: the sample story's prose,
repeated to length), then masters it once per preset, each in a process of its own pinned to one
CPU, so that its CPU time, wall time and peak resident memory are its own. Prints, per preset: the
audio's length, wall and CPU seconds, speed as a multiple of real time (by CPU: the figure that does
not depend on what else the machine runs), peak RSS, and whether the file met the preset's spec.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS_PER_SECOND = 3.3  # espeak-ng's fable, narrating the sample story


def story(words: int) -> str:
    """The sample story's prose (headings left out), repeated to about `words` words."""
    lines = (ROOT / "sample_manifests" / "book.md").read_text().splitlines()
    said = " ".join(line for line in lines if line.strip() and not line.startswith("#")).split()
    return " ".join(said[i % len(said)] for i in range(words))


def child(preset: str, src: Path, dst: Path) -> None:
    """Master `src` on one CPU and print what it took, as JSON."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    import pyloudnorm  # noqa: F401  # loaded by mastering as it first measures: once a process, not a chapter's

    from batchtts import mastering

    chosen = mastering.PRESETS[preset]
    started, cpu = time.perf_counter(), time.process_time()
    measured = mastering.master(src, dst, chosen)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    verdict = mastering.check(measured, chosen)
    print(json.dumps({"wall": wall, "cpu": cpu, "problems": verdict.problems, **measured.as_dict()}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=5.0, help="about how long the chapter is")
    parser.add_argument("--presets", default="acx,podcast")
    parser.add_argument("--keep", type=Path, help="keep the narrated and mastered files in this folder")
    parser.add_argument("--child", nargs=3, metavar=("PRESET", "SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), Path(args.child[2]))
        return
    folder = args.keep or Path(tempfile.mkdtemp(prefix="batchtts-mastering-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with (folder / "chapter.csv").open("w", newline="") as f:
            csv.writer(f).writerows([["id", "text"], ["ch01", story(round(args.minutes * 60 * WORDS_PER_SECOND))]])
        narrated = subprocess.run([sys.executable, "-m", "batchtts", "run", "chapter.csv", "--out", "narrated",
                                   "--model", "local/espeak-ng", "--voice", "fable"],
                                  cwd=folder, capture_output=True, text=True)
        if narrated.returncode:
            sys.exit(f"narrating failed ({narrated.returncode}):\n{narrated.stderr[-3000:]}")
        src = folder / "narrated" / "ch01.mp3"
        print(f"{'preset':8} {'audio s':>8} {'wall s':>7} {'CPU s':>6} {'x real (CPU)':>12} {'x real (wall)':>13} "
              f"{'peak RSS':>9}  spec")
        for preset in args.presets.split(","):
            proc = subprocess.Popen([sys.executable, __file__, "--child", preset, str(src),
                                     str(folder / "mastered" / f"ch01.{preset}.mp3")], stdout=subprocess.PIPE, text=True)
            assert proc.stdout is not None
            out = proc.stdout.read()
            _, status, usage = os.wait4(proc.pid, 0)
            if status:
                sys.exit(f"mastering to {preset} failed")
            got = json.loads(out)
            length = got["length_s"]
            print(f"{preset:8} {length:8.1f} {got['wall']:7.2f} {got['cpu']:6.2f} {length / got['cpu']:12.1f} "
                  f"{length / got['wall']:13.1f} {usage.ru_maxrss / 1024:7.0f} MB  "
                  f"{'; '.join(got['problems']) or 'meets it'}")
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
