"""The rate-limit benchmark: `batchtts run` against `batchtts serve` speaking every common limiter,
each figure measured by the server against the limiter's own capacity, in the same run.

    python bench/ratelimit.py              # 1,500 rows a scenario (about twelve minutes)
    python bench/ratelimit.py --scale 0.3  # a quicker look
    python bench/ratelimit.py --only bucket

Scenarios, each at --concurrency 256 and 30 ms latency unless said:
  - each limiter x each header mode (Retry-After in whole seconds, X-RateLimit-* only, both, a bare
    429): token bucket 50/s burst 5; fixed 2 s window of 100 (a run spans many windows, so the
    goodput is not decided by where the first and last windows fall); sliding 2 s window of 100; at
    most 12 requests in flight at 200 ms latency. Goodput is the server's successes per second
    between its first and last; capacity is the limiter's nominal rate, and for the cap on requests
    in flight, the goodput of a run at --concurrency 12 against the same server without the cap
    (12 / 200 ms = 60/s is the ceiling no client reaches, its own time per request added);
  - cold start: the goodput of the first ten seconds' last five against the bucket's 50/s;
  - four shards at C=64 each on one 50/s bucket: their combined goodput;
  - a spent quota whose reset is two hours away; nothing listening; a host that does not resolve:
    seconds to exit 3.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from throughput import MODEL, Server, manifest

LATENCY = ("--latency", "0.03")
LIMITERS = {
    "bucket": (["--limiter", "bucket", "--rate-limit", "50", "--burst", "5", *LATENCY], 50.0,
               "token bucket 50/s, burst 5"),
    "fixed": (["--limiter", "fixed", "--rate-limit", "100", "--window", "2", *LATENCY], 50.0,
              "fixed window 100 / 2 s"),
    "sliding": (["--limiter", "sliding", "--rate-limit", "100", "--window", "2", *LATENCY], 50.0,
                "sliding window 100 / 2 s"),
    "in-flight": (["--max-in-flight", "12", "--latency", "0.2"], 60.0, "12 in flight, 200 ms"),
}
HEADERS = ("retry-after", "reset", "both", "none")


def run(manifest_path: Path, out: Path, url: str, *extra: str, prefix: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*prefix, sys.executable, "-m", "batchtts", "run", str(manifest_path), "--out", str(out), "--model", MODEL,
         "--voice", "alloy", "--format", "pcm", "--base-url", url, "--log-format", "json", *extra],
        env={**os.environ, "OPENROUTER_API_KEY": "bench"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def goodput(stats: dict) -> tuple[float, float]:
    """Successes per second between the first and the last, and 429s over all requests."""
    limiter = next(iter(stats["limiters"].values()))
    first, last, ok = limiter["first_success"], limiter["last_success"], limiter["successes"]
    rate = (ok - 1) / (last - first) if ok > 1 and last > first else 0.0
    return rate, stats["by_status"].get("429", 0) / max(1, stats["requests"])


def timed_exit(cmd_extra: list[str], url: str, work: Path, tag: str,
               prefix: tuple[str, ...] = ()) -> tuple[int, float, str]:
    """Exit code, seconds to exit, and the stop reason, of a run that should stop by itself."""
    started = time.monotonic()
    proc = run(manifest(work / f"{tag}.parquet", 200, tag), work / tag, url, *cmd_extra, prefix=prefix)
    _, stderr = proc.communicate(timeout=600)
    reason = ""
    for line in stderr.splitlines():
        if line.startswith("{") and (event := json.loads(line)).get("event") == "summary":
            reason = str(event.get("stop_reason") or "")
    return proc.returncode, time.monotonic() - started, reason


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every row count by this")
    parser.add_argument("--only", choices=[*LIMITERS, "extras"], help="one group of scenarios")
    parser.add_argument("--headers", choices=HEADERS, action="append", help="only these header modes")
    args = parser.parse_args()
    rows = max(200, int(1500 * args.scale))
    table: list[tuple[str, ...]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, (flags, capacity, label) in LIMITERS.items():
            if args.only not in (None, name):
                continue
            if name == "in-flight":
                with Server("--latency", "0.2") as server:
                    proc = run(manifest(work / "reference.parquet", rows, "reference"), work / "reference", server.url,
                               "--concurrency", "12")
                    proc.communicate(timeout=1200)
                    log = sorted(e["t"] for e in httpx.get(server.url.replace("/api/v1", "/_batchtts/stats"),
                                                            timeout=30).json()["log"] if e["outcome"] == "ok")
                    capacity = (len(log) - 1) / (log[-1] - log[0])
                table.append((f"reference: --concurrency 12, no cap, 200 ms, {rows:,} rows", f"{capacity:.1f}/s", "", "",
                              str(proc.returncode)))
            for headers in args.headers or HEADERS:
                with Server(*flags, "--rate-limit-headers", headers) as server:
                    tag = f"{name}-{headers}"
                    proc = run(manifest(work / f"{tag}.parquet", rows, tag), work / tag, server.url,
                               "--concurrency", "256")
                    proc.communicate(timeout=1200)
                    rate, rejected = goodput(server.stats())
                    table.append((f"{label}, 429 + {headers}, {rows:,} rows", f"{rate:.1f}/s ÷ {capacity:.1f}/s",
                                  f"{rate / capacity:.2f}", f"{rejected:.3f}", str(proc.returncode)))
        if args.only in (None, "extras"):
            bucket = LIMITERS["bucket"][0]
            with Server(*bucket, "--rate-limit-headers", "both") as server:
                proc = run(manifest(work / "cold.parquet", 1000, "cold"), work / "cold", server.url,
                           "--concurrency", "256")
                proc.communicate(timeout=1200)
                log = httpx.get(server.url.replace("/api/v1", "/_batchtts/stats"), timeout=30).json()["log"]
                start = min(e["t"] for e in log)
                ok = sum(1 for e in log if e["outcome"] == "ok" and start + 5 <= e["t"] < start + 10)
                table.append(("cold start, bucket 50/s: seconds 5 to 10 after the first request", f"{ok / 5:.1f}/s ÷ 50/s",
                              f"{ok / 5 / 50:.2f}", "", str(proc.returncode)))
            with Server(*bucket, "--rate-limit-headers", "both") as server:
                shards = [run(manifest(work / "shards.parquet", rows * 2, "shards"), work / "shards", server.url,
                              "--concurrency", "64", "--shard", f"{i}/4") for i in range(4)]
                codes = [p.communicate(timeout=1200) and p.returncode for p in shards]
                rate, rejected = goodput(server.stats())
                table.append((f"4 shards x C=64, one bucket 50/s, {rows * 2:,} rows", f"{rate:.1f}/s ÷ 50/s",
                              f"{rate / 50:.2f}", f"{rejected:.3f}", ",".join(map(str, codes))))
            with Server("--quota", "50", "--quota-reset", "7200", "--rate-limit-headers", "both", *LATENCY) as server:
                code, seconds, reason = timed_exit(["--concurrency", "64"], server.url, work, "quota")
                table.append(("quota of 50 spent, reset in 2 h", f"exit {code} after {seconds:.1f} s", "", "",
                              reason[:60]))
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]  # bound, never listening: connections are refused
                code, seconds, reason = timed_exit([], f"http://127.0.0.1:{port}/api/v1", work, "refused")
            table.append(("nothing listening", f"exit {code} after {seconds:.1f} s", "", "", reason[:60]))
            # In a network namespace of its own, with no network: no name resolves, no query leaves.
            code, seconds, reason = timed_exit([], "http://speech.example.invalid/api/v1", work, "dns",
                                               prefix=("unshare", "-rn"))
            table.append(("a host that does not resolve", f"exit {code} after {seconds:.1f} s", "", "", reason[:60]))

    header = ("scenario", "goodput ÷ capacity", "ratio", "429s ÷ all", "exit")
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    print(f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d')}; "
          "targets: ratio ≥ 0.90 (shards ≥ 0.85), 429s ≤ 0.10")
    for r in [header, tuple("-" * w for w in widths), *table]:
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) + " |")


if __name__ == "__main__":
    main()
