"""Ten million rows on one machine: what planning, a rerun, status and export cost as a job grows.

    python bench/scale.py                          # 10^5, 10^6 and 10^7 rows (about 40 minutes cold)
    python bench/scale.py --rows 100000 1000000
    python bench/scale.py --dir /tmp/scale --keep  # keep manifests and finished jobs for the next run

For each size, a Parquet manifest (id, text, voice, model) is written in batches, then each command
runs as a process of its own under GNU time (wall seconds and peak RSS, per command):
  1. `run --dry-run` of the manifest into an empty folder;
  2. time to the first request: a real run against `batchtts serve --engine tone --latency 0`,
     polled on the server's /_batchtts/stats until it counts a request, then stopped with SIGINT;
  3. the rerun of a finished job (wall time, and requests the server counted: must be 0);
  4. `status` of the finished job;
  5. `export --to x.parquet` of it.
A finished job of 10^5 rows is narrated for real against the tone server at 0 ms; larger ones are
seeded through the library (each row as the planner prepares it, recorded done in the ledger, its
file a hard link to one of a few real audio files, at most 60,000 links each), and the table says
which. Targets: peak RSS ≤ 300 MB at every size; dry run of 10^7 ≤ 60 s; rerun of a finished 10^7
job ≤ 120 s with nothing sent; status of a 10^7-row ledger ≤ 10 s.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq

from batchtts import Defaults, Job
from batchtts.ledger import Ledger, RunSettings, Stored
from batchtts.manifest import Row, iter_rows
from batchtts.script import prepare

MODEL = "openai/gpt-4o-mini-tts"
VOICE = "alloy"
FORMAT = "pcm"
SIZES = (100_000, 1_000_000, 10_000_000)
SEEDED_FROM = 100_001  # jobs this large are seeded, not narrated
LINKS_PER_FILE = 60_000
WRITE_BATCH = 100_000
ENV = {**os.environ, "OPENROUTER_API_KEY": "bench"}


class Server:
    """`batchtts serve --engine tone --latency 0` on 127.0.0.1."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "batchtts", "serve", "--port", "0", "--engine", "tone",
                                      "--latency", "0"], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().rsplit(" ", 1)[1].strip()

    def requests(self) -> int:
        stats = httpx.get(self.url.replace("/api/v1", "/_batchtts/stats"), params={"log": "0"}, timeout=30).json()
        return int(stats["requests"])

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait()


def write_manifest(path: Path, rows: int) -> Path:
    """`rows` rows in batches of 100,000, so writing 10^7 costs the benchmark little memory."""
    if path.exists():
        return path
    schema = pa.schema([("id", pa.string()), ("text", pa.string()), ("voice", pa.string()), ("model", pa.string())])
    aside = path.with_suffix(".part")
    with pq.ParquetWriter(aside, schema) as writer:
        for start in range(0, rows, WRITE_BATCH):
            numbers = range(start, min(start + WRITE_BATCH, rows))
            writer.write_table(pa.table({
                "id": [f"r-{i:08d}" for i in numbers],
                "text": [f"Row {i} of the scale benchmark." for i in numbers],
                "voice": [VOICE] * len(numbers), "model": [MODEL] * len(numbers),
            }, schema=schema), row_group_size=65536)
    aside.rename(path)
    return path


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "batchtts", *args]


def run_args(manifest: Path, out: Path, url: str, *extra: str) -> list[str]:
    return command("run", str(manifest), "--out", str(out), "--format", FORMAT, "--base-url", url,
                   "--log-format", "json", "--concurrency", "64", *extra)


def timed(cmd: list[str], work: Path) -> tuple[int, float, int]:
    """Exit code, wall seconds and peak RSS in MB of one command, by GNU time."""
    report = work / "time.txt"
    code = subprocess.run(["/usr/bin/time", "-q", "-o", str(report), "-f", "%e %M", *cmd], env=ENV,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False).returncode
    wall, rss_kb = report.read_text().split()[-2:]
    return code, float(wall), int(rss_kb) // 1024


def first_request(cmd: list[str], server: Server) -> float:
    """Seconds from starting a run until the server counts its first request; the run is then stopped
    with SIGINT and waited for."""
    before = server.requests()
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while server.requests() <= before:
            if proc.poll() is not None:
                raise RuntimeError(f"the run ended ({proc.returncode}) before sending a request")
            time.sleep(0.02)
        return time.perf_counter() - started
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait()


def finished_job(manifest: Path, out: Path, rows: int, server: Server, work: Path) -> str:
    """A finished job of the manifest in `out`: narrated against the tone server, or seeded."""
    marker = out / ".bench-finished"
    if marker.exists():
        return marker.read_text()
    shutil.rmtree(out, ignore_errors=True)
    if rows < SEEDED_FROM:
        code, _, _ = timed(run_args(manifest, out, server.url), work)
        assert code == 0, code
        how = "narrated"
    else:
        seed(manifest, out, rows, server, work)
        how = "seeded"
    marker.write_text(how)
    return how


def seed(manifest: Path, out: Path, rows: int, server: Server, work: Path) -> None:
    """Record every row done and its file checked, as a run would, its file a hard link to one of a few
    real audio files (and its check the sample's)."""
    sample = work / "sample"
    if not (sample / "ledger.sqlite").exists():
        small = write_manifest(work / "sample.parquet", 1)
        code, _, _ = timed(run_args(small, sample, server.url), work)
        assert code == 0, code
    audio = next(p for p in sample.iterdir() if p.suffix == f".{FORMAT}")
    info = Ledger.open_existing(sample / "ledger.sqlite")
    try:
        recorded, checked = info.get("r-00000000"), info.checked("r-00000000")
    finally:
        info.close()
    assert recorded is not None and checked is not None
    verdict = {name: value for name, value in checked.items() if name not in ("key", "fingerprint", "sha256")}
    data = audio.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    sources = out / ".bench-sources"
    sources.mkdir(parents=True)
    job = Job(manifest=manifest, out=out, defaults=Defaults(format=FORMAT))
    ledger = Ledger(job.ledger_path)
    run_id = ledger.start_run(RunSettings.of(job), job.redacted())
    source = sources / "0"
    for number, row in enumerate(iter_rows(manifest, job.defaults)):
        assert isinstance(row, Row)
        row = prepare(row, job.lexicon, job.voices).row
        if number % LINKS_PER_FILE == 0:
            source = sources / str(number // LINKS_PER_FILE)
            source.write_bytes(data)
        os.link(source, out / row.relpath)
        ledger.record_done(row, Stored(row.relpath, len(data), digest, recorded["sample_rate"], recorded["channels"],
                                       recorded["duration_s"]), attempts=1, latency_s=0.0, generation_id=None)
        ledger.record_check(row, digest, verdict)  # as the audio checks record each file a run narrates
        if number % WRITE_BATCH == WRITE_BATCH - 1:
            ledger.commit()
    ledger.finish_run(run_id, 0, {"seeded": rows})
    ledger.close()


def measure_size(rows: int, work: Path, server: Server) -> list[str]:
    manifest = write_manifest(work / f"m-{rows}.parquet", rows)
    fresh = work / f"fresh-{rows}"
    shutil.rmtree(fresh, ignore_errors=True)
    code, dry_s, dry_mb = timed(run_args(manifest, fresh, server.url, "--dry-run"), work)
    assert code == 0, code
    shutil.rmtree(fresh, ignore_errors=True)
    first_s = first_request(run_args(manifest, fresh, server.url), server)
    shutil.rmtree(fresh, ignore_errors=True)
    done = work / f"done-{rows}"
    how = finished_job(manifest, done, rows, server, work)
    before = server.requests()
    code, rerun_s, rerun_mb = timed(run_args(manifest, done, server.url), work)
    assert code == 0, code
    sent = server.requests() - before
    code, status_s, status_mb = timed(command("status", str(done)), work)
    assert code == 0, code
    exported = work / f"x-{rows}.parquet"
    code, export_s, export_mb = timed(command("export", str(done), "--to", str(exported)), work)
    assert code == 0, code
    assert pq.ParquetFile(exported).metadata.num_rows == rows
    exported.unlink()
    return [f"{rows:,}", how, f"{dry_s:.1f} s; {dry_mb} MB", f"{first_s:.1f} s", f"{rerun_s:.1f} s; {sent}; {rerun_mb} MB",
            f"{status_s:.1f} s; {status_mb} MB", f"{export_s:.1f} s; {export_mb} MB"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--dir", type=Path, help="where manifests and jobs go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep --dir's manifests and finished jobs")
    args = parser.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="batchtts-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    table = []
    try:
        with Server() as server:
            for rows in args.rows:
                table.append(measure_size(rows, work, server))
                print(" | ".join(table[-1]), file=sys.stderr, flush=True)  # as it comes: 10^7 takes a while
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    header = ["rows", "finished job", "dry run", "first request", "rerun: wall; sent; RSS", "status", "export"]
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    print(f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d')}")
    for r in [header, ["-" * w for w in widths], *table]:
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) + " |")
    print("Targets: peak RSS ≤ 300 MB at every size; dry run of 10^7 ≤ 60 s; rerun of 10^7 ≤ 120 s, 0 sent; "
          "status of 10^7 ≤ 10 s. Finished jobs: 'narrated' against the tone server at 0 ms, 'seeded' through "
          "the library (ledger records and hard-linked files).")


if __name__ == "__main__":
    main()
