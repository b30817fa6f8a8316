"""Throughput and memory of `batchtts run` against `batchtts serve`, beside references from the same run.

    python bench/throughput.py [--rows 2000] [--concurrency 64] [--big-rows 1000000]

Prints one table. Figures are ratios against references measured in the same run, because the
machines this runs on are shared and noisy:

- rows/s of `batchtts run` (ledger, files, retries and all) against the C/L limit of a server with
  latency L at concurrency C, and against a bare asyncio script that sends the same requests through
  the same transport and throws the bodies away;
- the same bare script on httpx's default transport, to show why we use httpx-aiohttp;
- peak RSS of `batchtts run --dry-run` on a 1,000,000-row Parquet manifest, and on 100,000 rows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
from httpx_aiohttp import AiohttpTransport

MODEL = "openai/gpt-4o-mini-tts"


def start_server(*args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchtts", "serve", "--port", "0", "--engine", "tone", *args], stdout=subprocess.PIPE, text=True
    )
    line = proc.stdout.readline()
    return proc, line.rsplit(" ", 1)[1].strip()


def texts(n: int, tag: str) -> list[str]:
    return [f"Benchmark sentence {i} of run {tag}." for i in range(n)]


def write_manifest(path: Path, rows: list[str]) -> Path:
    pq.write_table(pa.table({"id": [f"b{i}" for i in range(len(rows))], "text": rows}), path)
    return path


# A small launcher runs each measured command: on Linux a child's peak RSS counts the pages it
# inherited at fork, so forking straight from this process (which builds large manifests) would
# inflate it.
_LAUNCHER = """
import json, resource, subprocess, sys
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps([code, usage.ru_utime + usage.ru_stime, usage.ru_maxrss]))
"""


def run_cli(*args: str) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds and peak RSS (MB) of one CLI run."""
    env = {**os.environ, "OPENROUTER_API_KEY": "bench"}
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _LAUNCHER, sys.executable, "-m", "batchtts", *args],
                         env=env, capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - started
    code, cpu, maxrss_kb = json.loads(out)
    if code != 0:
        raise SystemExit(f"batchtts {' '.join(args)} exited {code}")
    return wall, cpu, maxrss_kb // 1024


async def bare(url: str, rows: list[str], concurrency: int, transport: httpx.AsyncBaseTransport | None) -> float:
    """The least a client can do: same requests, same concurrency, bodies read and dropped."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, transport=transport, timeout=60,
                                 headers={"Authorization": "Bearer bench"}) as client:
        async def one(text: str) -> None:
            async with semaphore:
                async with client.stream("POST", "audio/speech", json={
                    "model": MODEL, "input": text, "voice": "alloy", "response_format": "pcm"}) as response:
                    async for _ in response.aiter_bytes():
                        pass
                    assert response.status_code == 200

        started = time.perf_counter()
        await asyncio.gather(*(one(t) for t in rows))
        return time.perf_counter() - started


def measure_bare(url: str, rows: list[str], concurrency: int, transport: httpx.AsyncBaseTransport | None) -> tuple[float, float]:
    """Wall and CPU seconds of the bare script, run in this process."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    wall = asyncio.run(bare(url, rows, concurrency, transport))
    after = resource.getrusage(resource.RUSAGE_SELF)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--big-rows", type=int, default=1_000_000)
    args = parser.parse_args()
    c, n = args.concurrency, args.rows
    table: list[tuple[str, str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for latency in (0.0, 0.2):
            server, url = start_server("--latency", str(latency))
            try:
                tag = f"L{latency}"
                aiohttp_transport = AiohttpTransport(limits=httpx.Limits(max_connections=c))
                wall_ref, cpu_ref = measure_bare(url, texts(n, tag + "ref"), c, aiohttp_transport)
                wall_httpx, _ = measure_bare(url, texts(n, tag + "httpx"), c, None)
                manifest = write_manifest(work / f"{tag}.parquet", texts(n, tag))
                wall, cpu, _ = run_cli("run", str(manifest), "--out", str(work / tag), "--model", MODEL, "--voice",
                                       "alloy", "--format", "pcm", "--concurrency", str(c), "--base-url", url)
            finally:
                server.terminate()
                server.wait()
            rate, ref_rate, httpx_rate = n / wall, n / wall_ref, n / wall_httpx
            if latency:
                limit = c / latency
                table.append((f"latency {latency * 1000:.0f} ms, C={c}, {n} rows", "batchtts rows/s ÷ C/L",
                              f"{rate:.0f} / {limit:.0f}", f"{rate / limit:.2f}"))
            table.append((f"latency {latency * 1000:.0f} ms, C={c}, {n} rows", "batchtts rows/s ÷ bare aiohttp script",
                          f"{rate:.0f} / {ref_rate:.0f}", f"{rate / ref_rate:.2f}"))
            table.append((f"latency {latency * 1000:.0f} ms, C={c}, {n} rows", "bare httpx default transport ÷ bare aiohttp",
                          f"{httpx_rate:.0f} / {ref_rate:.0f}", f"{httpx_rate / ref_rate:.2f}"))
            table.append((f"latency {latency * 1000:.0f} ms, C={c}, {n} rows", "client CPU ms/row: batchtts vs bare aiohttp",
                          f"{cpu / n * 1000:.2f} vs {cpu_ref / n * 1000:.2f}", f"{(cpu / n) / (cpu_ref / n):.2f}"))

        rss = {}
        for rows in (args.big_rows // 10, args.big_rows):
            manifest = work / f"big{rows}.parquet"
            ids = pa.array([f"row-{i:08d}" for i in range(rows)])
            text = pa.array([f"Utterance {i}: a short line of dataset text." for i in range(rows)])
            pq.write_table(pa.table({"id": ids, "text": text}), manifest, row_group_size=65536)
            wall, _, rss[rows] = run_cli("run", str(manifest), "--out", str(work / f"big{rows}"), "--model", MODEL,
                                         "--voice", "alloy", "--dry-run")
            table.append((f"{rows:,}-row Parquet, --dry-run", "peak RSS MB; wall s", f"{rss[rows]} MB; {wall:.1f} s", ""))
        small, big = sorted(rss)
        table.append(("dry-run RSS growth", f"{big:,} rows ÷ {small:,} rows", f"{rss[big]} / {rss[small]}",
                      f"{rss[big] / rss[small]:.2f}"))

    widths = [max(len(r[i]) for r in table + [("scenario", "figure", "measured", "ratio")]) for i in range(4)]
    for r in [("scenario", "figure", "measured", "ratio"), tuple("-" * w for w in widths), *table]:
        print(" | ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)))


if __name__ == "__main__":
    main()
