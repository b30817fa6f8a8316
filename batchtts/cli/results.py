"""What a job holds: `status`, `export` (results and datasets) and `report` (the requests sent)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from ..config import load_job
from ..errors import BatchTTSError, UsageError
from .common import count, examples, fail, reader_left, size, where


@click.command(epilog=examples(
    "batchtts status out/lines",
    "batchtts status out/lines --json | jq .pending",
    "batchtts status out/big --watch",
    "batchtts status out/nightly --check || mail -s 'narration failures' me@example.com",
))
@click.argument("targets", nargs=-1)
@click.option("--manifest", type=click.Path(path_type=Path, dir_okay=False),
              help="Manifest to count pending rows against (default: the last run's).")
@click.option("--job", "job_file", type=click.Path(path_type=Path, dir_okay=False), help="Job file naming the manifest.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (one line per job).")
@click.option("--check", is_flag=True, help="Exit 1 when rows failed, 2 on an error: for cron alerts.")
@click.option("-w", "--watch", is_flag=True, help="Follow a running job: report again every --interval seconds "
              "until its run ends.")
@click.option("--interval", default=2.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds between two reports with --watch.")
def status(targets: tuple[str, ...], manifest: Path | None, job_file: Path | None, as_json: bool, check: bool,
           watch: bool, interval: float) -> None:
    """Show what output folders or ledger files hold: rows done, failed and pending, counted as the
    next run would count them. The shards of a job (or a folder of them) are read as one job;
    different jobs are reported one by one."""
    from ..results import by_job
    from ..results import status as status_report

    try:
        job = load_job(job_file) if job_file else None
        groups = by_job(targets) if targets else [[]]
        while True:
            reports = [status_report(group, manifest, job) for group in groups]
            for report in reports:
                click.echo(json.dumps(report) if as_json else _status_text(report))
            if not watch or all(r["running"] is None for r in reports):
                break
            time.sleep(interval)
            if not as_json:
                click.echo()
    except BatchTTSError as exc:
        fail(exc)
    except KeyboardInterrupt:
        sys.exit(0)  # the end of --watch
    if check and any(r["failed"] for r in reports):
        sys.exit(1)


def _status_text(report: dict[str, Any]) -> str:
    total = "?" if report["total"] is None else f"{report['total']:,}"
    pending = "? (pass --manifest)" if report["pending"] is None else f"{report['pending']:,}"
    failed = f"{report['failed']:,}"
    retried = report.get("retried_next_run")
    if report["failed"] and retried is not None:
        later = report["failed"] - retried
        failed += (" (the next run retries them)" if not later else
                   " (rerun with --retry-failed to retry them)" if not retried else
                   f" ({retried:,} retried by the next run, {later:,} with --retry-failed)")
    ledgers = report["ledgers"]
    title = ledgers[0] if len(ledgers) == 1 else f"{os.path.commonpath(ledgers)}/: {len(ledgers)} ledgers of one job"
    if report["running"] is not None:
        title += f" (a run is going: pid {report['running'] or '?'})"
    if report["missing_shards"]:
        title += (f"\n  no ledger yet for shard{'s' if len(report['missing_shards']) > 1 else ''} "
                  f"{', '.join(map(str, report['missing_shards']))}: their rows count as pending")
    lines = [title, f"  total {total}, done {report['done']:,}, failed {failed}, pending {pending}",
             f"  {size(report['bytes'])}, {report['audio_s']:.1f} s of audio"
             + (f"; {report['requests_saved']:,} requests saved by {count(report['copied'], 'row')} copying "
                "an identical request's file" if report.get("copied") else "")]
    for f in report["failures"]:
        again = "retried on next run" if f["retryable"] else "rerun with --retry-failed"
        chunk, _, error = f["error"].partition(": ") if f["error"].startswith("chunk ") else ("", "", f["error"])
        http = f"HTTP {f['http_status']}: " if f["http_status"] is not None else ""
        lines.append(f"  row {f['row_number']} ({f['key']}): {chunk + ': ' if chunk else ''}{http}{error} [{again}]")
    if report.get("checked"):
        copies = " (a copy's by the file it copies)" if report.get("copied") else ""
        lines.append(f"  audio checks: {report['checked']:,} rows checked{copies}, {report['flagged']:,} flagged"
                     + (" (narrate them again with run --redo-flagged)" if report["flagged"] else ""))
    for f in report.get("flags", ()):
        again = f" [narrated again {count(f['redos'], 'time')}]" if f["redos"] else ""
        lines.append(f"  row {f['row_number']} ({f['key']}): flagged: {f['flag_reasons']}{again}")
    return "\n".join(lines)


@click.command(epilog=examples(
    "batchtts export out/lines",
    "batchtts export out/lines --to results.csv",
    "batchtts export out/lines --to - --format jsonl | jq -c 'select(.status == \"failed\")'",
    "batchtts export out/big --to s3://bucket/big/results.parquet",
    "batchtts export out/big --format nemo --to datasets/big --split train=0.98,validation=0.01,test=0.01",
    "batchtts export out/big --format ljspeech --to datasets/ljspeech",
    "batchtts export out/big --format hf --to s3://bucket/datasets/big --sample-rate 16000",
    "batchtts export out/big --format webdataset --to datasets/wds --shard-size 1GB",
))
@click.argument("targets", nargs=-1)
@click.option("--to", "to", help="results.parquet, .csv or .jsonl, a path or s3://…, or - for stdout "
              "(default: OUT/results.parquet); for a dataset, a new folder or s3://… prefix.")
@click.option("--format", "fmt", type=click.Choice(["parquet", "csv", "jsonl", "nemo", "ljspeech", "hf", "webdataset"]),
              help="Format, when --to's name does not say it (with --to -: csv); or a dataset's layout: NeMo "
              "manifests, LJSpeech, Hugging Face Parquet shards, WebDataset tars.")
@click.option("--manifest", type=click.Path(path_type=Path, dir_okay=False), help="Manifest (default: the last run's).")
@click.option("--job", "job_file", type=click.Path(path_type=Path, dir_okay=False), help="Job file naming the manifest.")
@click.option("--split", help="A dataset's splits by key, as train=0.98,validation=0.01,test=0.01 (default: the "
              "manifest's split column, else all train).")
@click.option("--shard-size", help="Rows (1000) or bytes (500MB, 1GB) a shard of a dataset: NeMo's tars (none "
              "unless given), Hugging Face's Parquet files (500MB), WebDataset's tars (1GB).")
@click.option("--sample-rate", type=click.IntRange(min=1000), help="A dataset's sample rate, in Hz (default: the "
              "files' own; LJSpeech: 22050).")
@click.option("--channels", type=click.IntRange(1, 2), help="A dataset's channels (default: the files' own; LJSpeech: 1).")
@click.option("--audio-format", type=click.Choice(["flac", "wav", "mp3"]), help="A dataset's audio (default: wav "
              "for NeMo and LJSpeech, flac for Hugging Face and WebDataset). A file already so is copied as it is.")
@click.option("--include-flagged", is_flag=True, help="Keep in a dataset the rows the audio checks flagged (left out "
              "by default).")
def export(targets: tuple[str, ...], to: str | None, fmt: str | None, manifest: Path | None, job_file: Path | None,
           split: str | None, shard_size: str | None, sample_rate: int | None, channels: int | None,
           audio_format: str | None, include_flagged: bool) -> None:
    """Write one row per manifest row with its audio file, status and carried columns; or, with a
    dataset --format, the narrated rows as a speech dataset that trainers read, the audio in the
    shape asked for. The shards of a job (or a folder of them) are read as one job."""
    shaping = {"--split": split, "--shard-size": shard_size, "--sample-rate": sample_rate, "--channels": channels,
               "--audio-format": audio_format, "--include-flagged": include_flagged or None}
    if fmt in ("nemo", "ljspeech", "hf", "webdataset"):
        from ..datasets import export_dataset

        try:
            if to is None or to == "-":
                raise UsageError(f"a {fmt} dataset is a folder of files: give --to a new folder (or s3://… prefix)")
            result = export_dataset(targets, to, fmt, manifest=manifest, job=load_job(job_file) if job_file else None,
                                    split=split, shard_size=shard_size, sample_rate=sample_rate, channels=channels,
                                    audio_format=audio_format, include_flagged=include_flagged)
        except BatchTTSError as exc:
            fail(exc)
        click.echo("\n".join(result.lines()))
        return
    if given := [name for name, value in shaping.items() if value is not None]:
        fail(UsageError(f"{', '.join(given)}: only for a dataset (--format nemo, ljspeech, hf or webdataset)"))
    from ..results import export as export_results

    stream = sys.stdout.buffer if to == "-" else None
    try:
        destination, rows = export_results(targets, stream or to, manifest, load_job(job_file) if job_file else None,
                                           format=fmt)
    except BatchTTSError as exc:
        fail(exc)
    except BrokenPipeError:
        reader_left()
    except OSError as exc:
        if stream is None:
            raise
        fail(UsageError(f"cannot write the export to standard output: {exc.strerror or exc}"))
    if stream is None:
        assert isinstance(destination, str | Path)
        click.echo(f"wrote {rows} rows to {where(destination)}")


@click.command(epilog=examples(
    "batchtts report out/nightly",
    "batchtts report out/nightly --to logs/nightly-$(date +%F).html",
    "batchtts report out/big/ledger-shard-3-of-8.sqlite --run all",
))
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--to", "to", type=click.Path(path_type=Path, dir_okay=False),
              help="HTML file to write.  [default: report.html beside the ledger]")
@click.option("--run", "run", default="last", show_default=True,
              help="Which run: its number, last (each ledger's newest) or all.")
def report(target: Path, to: Path | None, run: str) -> None:
    """Draw how a run went into one HTML page that opens offline: requests and successes per second,
    latency percentiles, 429s and 5xx, the throttle's concurrency and pace, characters and cost,
    failed rows by reason. TARGET is an output folder or a ledger file. Needs the report extra:
    pip install 'batchtts[report]'."""
    from ..report import write_report

    try:
        destination = write_report(target, to, run)
    except BatchTTSError as exc:
        fail(exc)
    click.echo(f"wrote the report to {destination}")

