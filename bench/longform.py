"""How long one 100,000-character chapter takes against `batchtts serve` with 500 ms latency:
chunks narrated concurrently (concurrency 16) beside the same chunks one after another.

    python bench/longform.py [--chars 100000] [--latency 0.5] [--concurrency 16]

The reference for each figure is the latency-bound ideal for the same chunk count, measured in the
same run: ceil(chunks / C) x L concurrently, chunks x L one after another.
"""

from __future__ import annotations

import argparse
import math
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv

SENTENCES = [
    "The lighthouse keeper counted the ships each evening, one lantern at a time.",
    "By morning the fog had lifted, and the harbour smelled of salt and tar.",
    "Mr. Hale wrote in the log at 6:45 p.m., as he had done for 3.5 years.",
    '"Is anyone there?" she called, and the wind carried her voice across the bay.',
    "He answered with a laugh: three short notes, then silence.",
]


def book_chapter(chars: int) -> str:
    paragraphs, size, i = [], 0, 0
    while size < chars:
        paragraph = " ".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(6 + i % 5))
        paragraphs.append(f"{i + 1}. {paragraph}")
        size += len(paragraphs[-1]) + 2
        i += 1
    return "\n\n".join(paragraphs)[:chars]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chars", type=int, default=100_000)
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    server = subprocess.Popen([sys.executable, "-m", "batchtts", "serve", "--port", "0", "--engine", "tone",
                               "--latency", str(args.latency)], stdout=subprocess.PIPE, text=True)
    url = server.stdout.readline().rsplit(" ", 1)[1].strip()
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            manifest = Path(tmp) / "chapter.csv"
            pacsv.write_csv(pa.table({"id": ["chapter-01"], "text": [book_chapter(args.chars)]}), manifest)
            for concurrency in (args.concurrency, 1):
                out = Path(tmp) / f"c{concurrency}"
                started = time.perf_counter()
                subprocess.run([sys.executable, "-m", "batchtts", "run", str(manifest), "--out", str(out),
                                "--model", "openai/gpt-4o-mini-tts", "--voice", "alloy", "--format", "wav",
                                "--concurrency", str(concurrency), "--base-url", url, "--log-format", "json"],
                               check=True, capture_output=True, env={"OPENROUTER_API_KEY": "bench", "PATH": ""})
                wall = time.perf_counter() - started
                chunks = sqlite3.connect(out / "ledger.sqlite").execute("SELECT chunks FROM rows").fetchone()[0]
                ideal = math.ceil(chunks / concurrency) * args.latency
                rows.append((f"C={concurrency}", chunks, wall, ideal))
    finally:
        server.terminate()
        server.wait()
    print(f"{args.chars:,}-character chapter, server latency {args.latency * 1000:.0f} ms, wav")
    print(f"{'run':<6} | {'chunks':>6} | {'wall s':>7} | {'ideal s':>7} | wall ÷ ideal")
    print("-" * 48)
    for name, chunks, wall, ideal in rows:
        print(f"{name:<6} | {chunks:>6} | {wall:>7.2f} | {ideal:>7.2f} | {wall / ideal:.2f}")
    print(f"speed-up of C={args.concurrency} over one at a time: {rows[1][2] / rows[0][2]:.1f}x")


if __name__ == "__main__":
    main()
