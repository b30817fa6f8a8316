"""Figures for unattended runs at scale, each beside its reference measured in the same run.

    python bench/unattended.py             # about three minutes
    python bench/unattended.py --scale 0.2

  1. Four shard processes (concurrency 16 each) against one run at concurrency 64, latency 200 ms:
     rows/s of each against the C/L limit of the server.
  2. Planning a 1,000,000-row Parquet manifest (--dry-run) as shard 0/8 against unsharded: every
     shard reads the whole manifest, so this is the fixed cost a shard pays.
  3. The dry run's estimate against what the real run sent (characters counted by the server),
     with long rows split into chunks.
  4. Audio to S3 (moto's server on loopback, through pyarrow's S3 filesystem): rows/s against local
     disk, and against the bare upload rate of that S3 server (a pyarrow script putting as many
     files of the same size, 32 threads, one PUT each, no staging copy).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from throughput import MODEL, Server, batchtts_run, manifest, measure, scaled_rows

S3_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def run_shards(path: Path, out: Path, url: str, shards: int, concurrency: int) -> float:
    """Wall seconds for `shards` processes, started together, to narrate the manifest."""
    started = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "batchtts", "run", str(path), "--out", str(out), "--model", MODEL,
                               "--voice", "alloy", "--format", "pcm", "--base-url", url, "--log-format", "json",
                               "--concurrency", str(concurrency), "--shard", f"{i}/{shards}"],
                              env={**os.environ, "OPENROUTER_API_KEY": "bench"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(shards)]
    codes = [p.wait() for p in procs]
    assert codes == [0] * shards, codes
    return time.perf_counter() - started


def moto() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    fs = pafs.S3FileSystem(access_key="bench", secret_key="bench", region="us-east-1",
                           endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True)
    fs.create_dir("bench")
    return proc, f"http://127.0.0.1:{port}"


def bare_upload(endpoint: str, files: list[Path]) -> float:
    """Wall seconds for 32 threads to PUT `files` to the S3 server, one request each."""
    fs = pafs.S3FileSystem(access_key="bench", secret_key="bench", region="us-east-1",
                           endpoint_override=endpoint.removeprefix("http://"), scheme="http")

    def put(path: Path) -> None:
        with fs.open_output_stream(f"bench/bare/{path.name}") as out:
            out.write(path.read_bytes())

    started = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(put, files))
    return time.perf_counter() - started


def main() -> None:
    n = scaled_rows()
    table: list[tuple[str, str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)

        rows = n(5_000)
        with Server("--latency", "0.2") as server:
            single = batchtts_run(manifest(tmp / "one.parquet", rows, "one"), tmp / "one", server.url,
                                  "--concurrency", "64")[1]
            sharded = run_shards(manifest(tmp / "four.parquet", rows, "four"), tmp / "four", server.url, 4, 16)
        limit = 64 / 0.2
        table.append((f"latency 200 ms, {rows:,} rows: 4 shards x C=16 vs 1 x C=64", "rows/s ÷ C/L (320/s)",
                      f"{rows / sharded:.0f} vs {rows / single:.0f}",
                      f"{rows / sharded / limit:.2f} vs {rows / single / limit:.2f}"))

        big = manifest(tmp / "big.parquet", n(1_000_000), "big")
        plain = measure([sys.executable, "-m", "batchtts", "run", str(big), "--out", str(tmp / "big"), "--model",
                         "local/espeak-ng", "--voice", "en", "--dry-run"])
        shard = measure([sys.executable, "-m", "batchtts", "run", str(big), "--out", str(tmp / "big"), "--model",
                         "local/espeak-ng", "--voice", "en", "--dry-run", "--shard", "0/8"])
        table.append((f"--dry-run of {n(1_000_000):,} rows: shard 0/8 vs all", "wall s; peak RSS MB",
                      f"{shard[1]:.1f} vs {plain[1]:.1f}; {shard[3]} vs {plain[3]}",
                      f"{shard[1] / plain[1]:.2f}; {shard[3] / plain[3]:.2f}"))

        rows = n(2_000)
        texts = [f"Row {i}: a sentence of ordinary length for a speech dataset." for i in range(rows)]
        for i in range(0, rows, 50):
            texts[i] = " ".join(f"Sentence {j} of long passage {i}." for j in range(400))
        pq.write_table(pa.table({"id": [f"e{i}" for i in range(rows)], "text": texts}), tmp / "est.parquet")
        with Server() as server:
            cmd = ["run", str(tmp / "est.parquet"), "--out", str(tmp / "est"), "--model", MODEL, "--voice", "alloy",
                   "--base-url", server.url, "--concurrency", "32"]
            dry = subprocess.run([sys.executable, "-m", "batchtts", *cmd, "--dry-run"], capture_output=True,
                                 text=True, check=True).stdout
            estimate = int(re.search(r"^total(?:\s+[\d,]+){5}\s+([\d,]+)", dry, re.MULTILINE)[1].replace(",", ""))
            subprocess.run([sys.executable, "-m", "batchtts", *cmd, "--log-format", "json"], check=True,
                           capture_output=True, env={**os.environ, "OPENROUTER_API_KEY": "bench"})
            log = httpx.get(server.url.replace("/api/v1", "/_batchtts/stats"), timeout=30).json()["log"]
            sent = sum(e["characters"] for e in log if e["outcome"] == "ok")
        table.append((f"{rows:,} rows, 1 in 50 split into chunks", "dry-run estimate ÷ chars sent",
                      f"{estimate:,} / {sent:,}", f"{estimate / sent:.4f}"))

        rows = n(2_000)
        store, endpoint = moto()
        try:
            os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
            with Server() as server:
                local = batchtts_run(manifest(tmp / "l.parquet", rows, "l"), tmp / "l", server.url,
                                     "--concurrency", "32")[1]
                s3 = batchtts_run(manifest(tmp / "s.parquet", rows, "s"), "s3://bench/audio", server.url,
                                  "--concurrency", "32", "--ledger", str(tmp / "s3-ledger.sqlite"))[1]
            bare = bare_upload(endpoint, sorted((tmp / "l").glob("*.pcm")))
        finally:
            store.terminate()
            store.wait()
        table.append((f"latency 0, C=32, {rows:,} rows to S3 (moto)", "rows/s ÷ local disk; ÷ bare PUTs",
                      f"{rows / s3:.0f} / {rows / local:.0f}; {rows / s3:.0f} / {rows / bare:.0f}",
                      f"{local / s3:.2f}; {bare / s3:.2f}"))

    widths = [max(len(r[i]) for r in [*table, ("scenario", "figure", "measured", "ratio")]) for i in range(4)]
    for r in [("scenario", "figure", "measured", "ratio"), tuple("-" * w for w in widths), *table]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")


if __name__ == "__main__":
    main()
