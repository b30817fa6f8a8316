"""Reading a job's outcome back: the status of an output folder, and the results table export.

Both take one ledger or many (the shards of a job, or a folder holding them) and merge them.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from . import manifest
from .config import Defaults, Job, is_uri, redact_uri
from .errors import UsageError
from .ledger import Ledger, LedgerSet
from .manifest import KNOWN_COLUMNS, Row
from .runner import make_plan
from .storage import open_output, upload

_SHARD_LEDGER = re.compile(r"-shard-\d+-of-\d+\.sqlite$")
_LEDGER_FIELDS = ("path", "status", "bytes", "duration_s", "sample_rate", "error")
_TYPES = {
    "row": pa.int64(), "id": pa.string(), "text": pa.string(), "voice": pa.string(), "model": pa.string(),
    "path": pa.string(), "status": pa.string(), "bytes": pa.int64(), "duration_s": pa.float64(),
    "sample_rate": pa.int64(), "error": pa.string(),
}


def ledger_files(target: Path) -> list[Path]:
    """A ledger file as given; a folder's ledgers (`*.sqlite` and the shards' `*-shard-I-of-N.sqlite`)."""
    if not target.is_dir():
        return [target]
    found = sorted(p for p in target.glob("*.sqlite") if p.name == "ledger.sqlite" or _SHARD_LEDGER.search(p.name))
    if not found:
        raise UsageError(f"no ledger in {target}: run the job first, or give the path of its ledger file")
    return found


@dataclass
class JobContext:
    """The manifest and defaults the ledgers' rows came from: given, or as the last run recorded them."""

    ledger: LedgerSet
    out: Path | str
    manifest: Path | None
    defaults: Defaults


def open_context(targets: list[Path], manifest_path: Path | None, job: Job | None) -> JobContext:
    """Targets are output folders or ledger files; without any, the job's ledger (or its shards')."""
    if not targets and job is not None:
        if job.ledger is not None:
            targets = [job.ledger] if job.ledger.exists() else [job.ledger.parent]
        elif isinstance(job.out, Path):
            targets = [job.out]
    if not targets:
        raise UsageError("name an output folder or ledger files (or a job file that names its ledger)")
    files = [f for target in targets for f in ledger_files(target)]
    ledger = LedgerSet([Ledger.open_existing(f) for f in dict.fromkeys(files)])
    last = ledger.last_run() or {}
    config = last.get("config", {})
    defaults = job.defaults if job is not None else Defaults(**config.get("defaults", {}))
    if manifest_path is None:
        manifest_path = job.manifest if job is not None else (Path(last["manifest"]) if last.get("manifest") else None)
    if job is not None:
        out: Path | str = job.out
    elif targets and targets[0].is_dir():
        out = targets[0]
    else:
        recorded = config.get("out", str(files[0].parent))
        out = recorded if is_uri(recorded) else Path(recorded)
    return JobContext(ledger, out, manifest_path, defaults)


def status(ctx: JobContext) -> dict[str, Any]:
    totals = ctx.ledger.totals()
    done = totals.get("done", {"rows": 0, "bytes": 0, "duration_s": 0.0})
    failed = totals.get("failed", {"rows": 0})
    report: dict[str, Any] = {
        "ledger": str(ctx.ledger.path),
        "ledgers": [str(ledger.path) for ledger in ctx.ledger.ledgers],
        "total": None,
        "done": int(done["rows"]),
        "failed": int(failed["rows"]),
        "pending": None,
        "bytes": int(done["bytes"]),
        "audio_s": round(float(done["duration_s"]), 3),
        "failures": ctx.ledger.failures(limit=50),
    }
    if ctx.manifest is not None and ctx.manifest.exists():
        job = Job(manifest=ctx.manifest, out=ctx.out, ledger=ctx.ledger.path, defaults=ctx.defaults)
        plan = make_plan(job, ctx.ledger, open_output(ctx.out, ctx.ledger.path), owns=ctx.ledger.owns).total
        report.update(manifest=str(ctx.manifest), total=plan.rows, done=plan.done, failed=plan.failed, pending=plan.pending)
    return report


def _export_records(ctx: JobContext) -> Iterator[list[dict[str, Any]]]:
    assert ctx.manifest is not None
    number = 0
    for batch in manifest.read_records(ctx.manifest):
        out: list[dict[str, Any]] = []
        for record in batch:
            number += 1
            row = manifest.make_row(number, record, ctx.defaults)
            if isinstance(row, Row) and not ctx.ledger.owns(row.key):
                continue
            entry = ctx.ledger.get(row.key) if isinstance(row, Row) else None
            if isinstance(row, Row) and entry is not None and entry["fingerprint"] != row.fingerprint:
                entry = None
            result: dict[str, Any] = {
                "row": number,
                "id": row.id if isinstance(row, Row) else record.get("id"),
                "text": record.get("text"),
                "voice": row.voice if isinstance(row, Row) else record.get("voice"),
                "model": row.model if isinstance(row, Row) else record.get("model"),
            }
            for name in _LEDGER_FIELDS:
                result[name] = entry[name] if entry is not None else None
            if entry is None:
                result["status"] = "pending" if isinstance(row, Row) else "invalid"
            for name, value in record.items():
                if name not in KNOWN_COLUMNS and name not in result:
                    result[name] = value
            out.append(result)
        yield out


def default_export(out: Path | str) -> Path | str:
    """Next to the audio: `OUT/results.parquet`, in the bucket too when the audio is there."""
    if isinstance(out, str):
        base, _, query = out.partition("?")
        return f"{base.rstrip('/')}/results.parquet" + (f"?{query}" if query else "")
    return out / "results.parquet"


def export(ctx: JobContext, to: Path | str) -> int:
    """Write one row per manifest row, joined with the ledgers; returns the number of rows. The file
    appears whole or not at all: it is written aside, then renamed (or uploaded, then moved)."""
    if ctx.manifest is None or not ctx.manifest.exists():
        raise UsageError("export needs the manifest: pass --manifest (the last run's manifest is not there)")
    name = to.partition("?")[0] if isinstance(to, str) else to.name
    suffix = os.path.splitext(name)[1].lower()
    if suffix not in (".parquet", ".csv"):
        raise UsageError("export writes .parquet or .csv: name the file accordingly")
    if isinstance(to, Path):
        to.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=to.parent, prefix=".export-", suffix=suffix, delete=False) as f:
            aside = Path(f.name)
    else:
        aside = Path(tempfile.mkstemp(prefix="batchtts-export-", suffix=suffix)[1])
    try:
        rows = _write_export(ctx, aside, suffix)
        if isinstance(to, Path):
            os.replace(aside, to)
        else:
            try:
                fs, path = pafs.FileSystem.from_uri(to)
            except (OSError, ValueError) as exc:
                raise UsageError(f"cannot use {redact_uri(to)}: {exc}") from exc
            with open(aside, "rb") as f:
                upload(f, fs, path, f"{path}.partial-{os.getpid()}")
    finally:
        aside.unlink(missing_ok=True)
    return rows


def _write_export(ctx: JobContext, to: Path, suffix: str) -> int:
    schema: pa.Schema | None = None
    writer: pq.ParquetWriter | pacsv.CSVWriter | None = None
    rows = 0
    try:
        for records in _export_records(ctx):
            if not records:
                continue
            if schema is None:
                # Fixed types for our columns; carried columns keep the type of their first batch.
                inferred = pa.Table.from_pylist(records).schema
                schema = pa.schema([
                    pa.field(f.name, _TYPES.get(f.name, pa.string() if pa.types.is_null(f.type) else f.type))
                    for f in inferred
                ])
            table = pa.Table.from_pylist(records, schema=schema)
            if writer is None:
                writer = pq.ParquetWriter(to, schema) if suffix == ".parquet" else pacsv.CSVWriter(to, schema)
            writer.write_table(table)
            rows += len(records)
    finally:
        if writer is not None:
            writer.close()
    return rows
