"""The throughput benchmarks: `batchtts run` against `batchtts serve --engine tone`, each figure beside
its reference, measured in the same run (these machines are shared and noisy).

    python bench/throughput.py            # the sizes the targets are set for (about ten minutes)
    python bench/throughput.py --scale 0.1

Scenarios and references:
  1. latency 200 ms, concurrency 64: rows/s against the C/L limit of the server;
  2. latency 0: client CPU per 1,000 rows against bench/bare_client.py (aiohttp, a semaphore, one
     file per row, no ledger) doing the same rows;
  3. 10% of answers 502/503/524/529 and 2% dropped connections: rows done, and goodput against
     scenario 1's fault-free goodput;
  4. a 1,000,000-row Parquet manifest, run for 30 s then SIGINT: peak RSS, beside 100,000 rows;
  5. the rerun of a completed 200,000-row job: wall time and requests sent.

Rate limits of every kind are bench/ratelimit.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq

MODEL = "openai/gpt-4o-mini-tts"

# Runs each measured command and reports its exit code, CPU seconds and peak RSS. A child's peak
# RSS on Linux counts pages inherited at fork, so the measured command is started from this small
# process, not from the benchmark (which builds large manifests).
_LAUNCHER = """
import json, resource, signal, subprocess, sys, time
interrupt_after, cmd = float(sys.argv[1]), sys.argv[2:]
proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    proc.wait(timeout=interrupt_after if interrupt_after > 0 else None)
except subprocess.TimeoutExpired:
    proc.send_signal(signal.SIGINT)
    proc.wait()
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps([proc.returncode, usage.ru_utime + usage.ru_stime, usage.ru_maxrss]))
"""


class Server:
    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "batchtts", "serve", "--port", "0", "--engine", "tone",
                                      *args], stdout=subprocess.PIPE, text=True)
        self.url = self.proc.stdout.readline().rsplit(" ", 1)[1].strip()

    def stats(self) -> dict:
        return httpx.get(self.url.replace("/api/v1", "/_batchtts/stats"), params={"log": "0"}, timeout=30).json()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait()


def measure(cmd: list[str], interrupt_after: float = 0) -> tuple[int, float, float, int]:
    """Exit code, wall seconds, CPU seconds and peak RSS in MB of one command."""
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _LAUNCHER, str(interrupt_after), *cmd],
                         env={**os.environ, "OPENROUTER_API_KEY": "bench"}, capture_output=True, text=True,
                         check=True).stdout
    wall = time.perf_counter() - started
    code, cpu, maxrss_kb = json.loads(out)
    return code, wall, cpu, maxrss_kb // 1024


def batchtts_run(manifest: Path, out: Path | str, url: str, *extra: str, interrupt_after: float = 0):
    return measure([sys.executable, "-m", "batchtts", "run", str(manifest), "--out", str(out), "--model", MODEL,
                    "--voice", "alloy", "--format", "pcm", "--base-url", url, "--log-format", "json", *extra],
                   interrupt_after)


def manifest(path: Path, rows: int, tag: str) -> Path:
    ids = pa.array([f"{tag}-{i:08d}" for i in range(rows)])
    texts = pa.array([f"Row {i} of {tag}." for i in range(rows)])
    pq.write_table(pa.table({"id": ids, "text": texts}), path, row_group_size=65536)
    return path


def scaled_rows() -> Callable[[int], int]:
    """The benchmark's row counts, scaled by --scale for a quicker (or longer) run."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every row count by this")
    scale = parser.parse_args().scale
    return lambda rows: max(100, int(rows * scale))


def main() -> None:
    n = scaled_rows()
    table: list[tuple[str, str, str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)

        with Server("--latency", "0.2") as server:
            rows = n(5000)
            code, wall, _, _ = batchtts_run(manifest(work / "s1.parquet", rows, "s1"), work / "s1", server.url,
                                            "--concurrency", "64")
            fault_free = rows / wall
            table.append((f"latency 200 ms, C=64, {rows:,} rows", "rows/s ÷ (64 / 0.2 s)",
                          f"{fault_free:.0f} / 320", f"{fault_free / 320:.2f}", "≥ 0.90"))

        with Server() as server:
            rows = n(20000)
            m = manifest(work / "s2.parquet", rows, "s2")
            _, _, cpu, _ = batchtts_run(m, work / "s2", server.url, "--concurrency", "64")
            _, _, cpu_ref, _ = measure([sys.executable, str(Path(__file__).parent / "bare_client.py"), server.url,
                                        str(m), str(work / "s2-bare"), "64"])
            table.append((f"latency 0, C=64, {rows:,} rows", "client CPU s / 1,000 rows ÷ bare script",
                          f"{cpu / rows * 1000:.2f} / {cpu_ref / rows * 1000:.2f}", f"{cpu / cpu_ref:.2f}", "≤ 2.5"))

        with Server("--latency", "0.2", "--fail-rate", "0.10", "--drop-rate", "0.02", "--seed", "7") as server:
            rows = n(5000)
            out = work / "s5"
            code, wall, _, _ = batchtts_run(manifest(work / "s5.parquet", rows, "s5"), out, server.url,
                                            "--concurrency", "64")
            import sqlite3

            done = sqlite3.connect(out / "ledger.sqlite").execute(
                "SELECT COUNT(*) FROM rows WHERE status = 'done'").fetchone()[0]
            goodput = done / wall
            table.append((f"10% 5xx + 2% drops, latency 200 ms, {rows:,} rows", "rows done; goodput ÷ fault-free",
                          f"{done:,} of {rows:,}; {goodput:.0f} / {fault_free:.0f}",
                          f"{done / rows:.2f}; {goodput / fault_free:.2f}", "all; ≥ 0.80"))

        rss = {}
        with Server() as server:
            for rows in (n(100_000), n(1_000_000)):
                m = manifest(work / f"s6-{rows}.parquet", rows, "s6")
                code, _, _, rss[rows] = batchtts_run(m, work / f"s6-{rows}", server.url, "--concurrency", "64",
                                                     interrupt_after=30)
            small, big = sorted(rss)
            table.append((f"{big:,}-row Parquet, 30 s then SIGINT", f"peak RSS; ÷ {small:,} rows",
                          f"{rss[big]} MB; {rss[small]} MB", f"{rss[big] / rss[small]:.2f}", "≤ 300 MB; ≤ 1.20"))

        with Server() as server:
            rows = n(200_000)
            m = manifest(work / "s7.parquet", rows, "s7")
            batchtts_run(m, work / "s7", server.url, "--concurrency", "64", "--format", "mp3")
            before = server.stats()["requests"]
            code, wall, _, _ = batchtts_run(m, work / "s7", server.url, "--concurrency", "64", "--format", "mp3")
            sent = server.stats()["requests"] - before
            table.append((f"rerun of a completed {rows:,}-row job", "wall s; requests sent", f"{wall:.1f} s; {sent}",
                          f"{wall:.1f}; {sent}", "≤ 10 s; 0"))

    header = ("scenario", "figure", "measured", "ratio", "target")
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(5)]
    print(f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d')}")
    for r in [header, tuple("-" * w for w in widths), *table]:
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) + " |")


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    main()
