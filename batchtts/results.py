"""Reading a job's outcome back: the status of an output folder, and the results table export."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from . import manifest
from .config import Defaults, Job
from .errors import UsageError
from .ledger import Ledger
from .manifest import KNOWN_COLUMNS, Row
from .runner import make_plan
from .storage import OutputFolder

_LEDGER_FIELDS = ("path", "status", "bytes", "duration_s", "sample_rate", "error")
_TYPES = {
    "row": pa.int64(), "id": pa.string(), "text": pa.string(), "voice": pa.string(), "model": pa.string(),
    "path": pa.string(), "status": pa.string(), "bytes": pa.int64(), "duration_s": pa.float64(),
    "sample_rate": pa.int64(), "error": pa.string(),
}


def ledger_path_for(target: Path) -> Path:
    """Accept an output folder or a ledger file."""
    return target / "ledger.sqlite" if target.is_dir() else target


@dataclass
class JobContext:
    """The manifest and defaults a ledger's rows came from: given, or as the last run recorded them."""

    ledger: Ledger
    out: Path
    manifest: Path | None
    defaults: Defaults


def open_context(target: Path, manifest_path: Path | None, job: Job | None) -> JobContext:
    ledger_file = job.ledger if job is not None and job.ledger is not None else ledger_path_for(target)
    ledger = Ledger.open_existing(ledger_file)
    last = ledger.last_run() or {}
    config = last.get("config", {})
    defaults = job.defaults if job is not None else Defaults(**config.get("defaults", {}))
    if manifest_path is None:
        manifest_path = job.manifest if job is not None else (Path(last["manifest"]) if last.get("manifest") else None)
    out = job.out if job is not None else (target if target.is_dir() else Path(config.get("out", target.parent)))
    return JobContext(ledger, out, manifest_path, defaults)


def status(ctx: JobContext) -> dict[str, Any]:
    totals = ctx.ledger.totals()
    done = totals.get("done", {"rows": 0, "bytes": 0, "duration_s": 0.0})
    failed = totals.get("failed", {"rows": 0})
    report: dict[str, Any] = {
        "ledger": str(ctx.ledger.path),
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
        plan = make_plan(job, ctx.ledger, OutputFolder(ctx.out)).total
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


def export(ctx: JobContext, to: Path) -> int:
    """Write one row per manifest row, joined with the ledger; returns the number of rows."""
    if ctx.manifest is None or not ctx.manifest.exists():
        raise UsageError("export needs the manifest: pass --manifest (the last run's manifest is not there)")
    suffix = to.suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise UsageError("export writes .parquet or .csv: name the file accordingly")
    to.parent.mkdir(parents=True, exist_ok=True)
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
