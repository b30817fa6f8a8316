"""Reading a job's outcome back: the status of an output folder, and the results table export.

    batchtts.status(["out"])                    # {"done": 97, "failed": 1, "pending": 2, ...}
    batchtts.export(["out"], to="results.csv")   # one row per manifest row, with its file

Both take output folders or ledger files (or a job), one ledger or many (the shards of a job, or a
folder holding them), and read them as one job; the ledgers of different jobs are refused, never
merged (`by_job` sorts targets into jobs). Rows are counted by the planner a run uses, so status,
export and the next run agree. Neither needs the network nor changes a ledger.

What a row says, and so its fingerprint and key, depends on settings besides the manifest: the
defaults, the lexicon, the [voices] cast, the chunking. Rows are planned with those of the job
given; without one, with those the last run recorded in the ledger (the lexicon's entries
themselves, not its file; a run recorded before ledger schema 6 kept neither lexicon nor cast). So
without a job, status and export give the ledger's view: each row as that run narrated it, whatever
the lexicon file or the cast have become since. Given the job, they say what its next run would do:
rows an edited lexicon or cast changes count as pending. Either way, the manifest is read as it is
now (the ledger keeps no copy of it): rows edited since count as pending.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from . import manifest
from .columnar import Lane
from .config import LEDGER_NAME, Defaults, Job, is_uri
from .errors import UsageError
from .ledger import Ledger, LedgerSet, RunSettings, holds_rows, ledger_family, usage
from .lock import holder
from .manifest import KNOWN_COLUMNS, Row
from .plan import Decision, Plan, Planner, State, make_plan
from .redact import redact_uri
from .sharding import Shard, named_ledger
from .storage import open_output

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

_LEDGER_SUFFIXES = (".sqlite", ".sqlite3", ".db")
EXPORT_FORMATS = ("parquet", "csv", "jsonl")
_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_LEDGER_FIELDS = ("path", "status", "bytes", "duration_s", "sample_rate", "error", "copy_of")
# Our columns' Arrow types, by name (pyarrow is loaded by export alone).
_TYPES = {
    "row": "int64", "id": "string", "text": "string", "voice": "string", "speaker": "string",
    "model": "string", "path": "string", "status": "string", "bytes": "int64", "duration_s": "float64",
    "sample_rate": "int64", "error": "string", "copy_of": "string",
    "mastered_path": "string", "preset": "string", "meets_preset": "bool_",
}
# The measurements of a row's mastered file, as the ledger recorded them when it was made.
_MASTERED_FIELDS = ("loudness_lufs", "rms_db", "peak_db", "true_peak_db", "noise_floor_db", "head_s", "tail_s",
                    "room_tone_db", "length_s")
_TYPES.update(dict.fromkeys(_MASTERED_FIELDS, "float64"))
# The audio checks' measurement of a row's file, as the checks table holds it; the narrated file's
# peak and RMS are peak_dbfs and rms_dbfs, peak_db and rms_db being the mastered file's.
_CHECKED_FIELDS = {"chars_per_second": "chars_per_second", "lead_silence_s": "lead_silence_s",
                   "trail_silence_s": "trail_silence_s", "max_inner_silence_s": "max_inner_silence_s",
                   "peak_dbfs": "peak_db", "rms_dbfs": "rms_db", "clipping": "clipping", "wer": "wer"}
_TYPES.update(dict.fromkeys(_CHECKED_FIELDS, "float64"))
_TYPES.update(flagged="bool_", flag_reasons="string", redos="int64")


def ledger_files(folder: Path) -> list[Path]:
    """The ledgers of the one job a folder holds: its ledger and its shards' (`ledger-shard-I-of-N.sqlite`).
    A folder whose `ledger.sqlite` holds rows is that job's, found without listing the folder (it may
    hold millions of files): a run refuses to add shards' ledgers beside one holding rows (check_layout)."""
    default = folder / LEDGER_NAME
    if holds_rows(default):
        return [default]
    jobs: dict[Path, dict[Path, Shard | None]] = {}
    with os.scandir(folder) as entries:  # names from the listing alone: the folder may hold millions of files
        found = sorted(folder / e.name for e in entries if e.name.endswith(_LEDGER_SUFFIXES) and e.is_file())
    for path in found:
        named = named_ledger(path)[0]
        if named not in jobs:
            jobs[named] = ledger_family(named, found)  # only ledgers in use: other files drop out here
    jobs = {named: family for named, family in jobs.items() if family}
    if not jobs:
        raise UsageError(f"no ledger in {folder}: run the job first, or give the path of its ledger file")
    if len(jobs) > 1:
        names = ", ".join(p.name for p in jobs)
        raise UsageError(f"{folder} holds the ledgers of several jobs ({names}): name the files, or pass --job")
    return list(next(iter(jobs.values())))


def _files_of(path: Path) -> list[Path]:
    """The ledgers a target names: a ledger file, or those of the job a folder holds."""
    return ledger_files(path) if path.is_dir() else [path]


def _job_of(ledger: Path) -> Path:
    """Which job a ledger is of: the ledger its shards are named after."""
    return named_ledger(ledger)[0].resolve()


def by_job(targets: Sequence[str]) -> list[list[str]]:
    """Targets grouped by the job whose ledgers they are, in the order given: a job's shards together,
    different jobs apart, so that each is reported on its own and never merged with another. A target
    that names no ledger is a group of its own, for `status` to say why."""
    groups: dict[Path | str, list[str]] = {}
    for target in targets:
        try:
            key: Path | str = target if is_uri(target) else _job_of(_files_of(Path(target))[0])
        except UsageError:
            key = target
        groups.setdefault(key, []).append(target)
    return list(groups.values())


@dataclass
class JobContext:
    """The manifest and settings the ledgers' rows came from: given, or as the last run recorded them."""

    ledger: LedgerSet
    out: Path | str
    manifest: Path | None
    defaults: Defaults
    job: Job | None = None  # the job given: its lexicon, [voices] and chunking shape what its rows say
    recorded: RunSettings | None = None  # the last run's settings, as the ledger holds them: used without a job

    def planning_job(self) -> Job:
        """The job rows are counted with: the manifest and defaults, and the lexicon, cast and chunking
        of the job given, else of the last run."""
        assert self.manifest is not None
        job = Job(manifest=self.manifest, out=self.out, ledger=self.ledger.path, defaults=self.defaults)
        shaping = self.job if self.job is not None else self.recorded
        if shaping is None:
            return job
        return dataclasses.replace(job, lexicon=shaping.lexicon, voices=shaping.voices,
                                   chunk_chars=shaping.chunk_chars, limits=shaping.limits)


def open_context(targets: list[str], manifest_path: Path | None, job: Job | None) -> JobContext:
    """Targets are output folders or ledger files; without any, the job's ledger and its shards'. A
    folder or a job stands for the whole job: rows of shards without a ledger yet count as pending."""
    files: list[Path] = []
    for target in targets:
        if is_uri(target):
            raise UsageError(f"{redact_uri(target)}: the ledger is on local disk: name the --ledger file of the run "
                             "(or its folder)")
        path = Path(target)
        if not path.exists():
            raise UsageError(f"{target}: no such ledger file or folder")
        if path.is_file() and usage(path) is None:
            raise UsageError(f"{target}: not a batchtts ledger")
        files += _files_of(path)
    jobs = {_job_of(f) for f in files}
    if len(jobs) > 1:
        raise UsageError(f"these are the ledgers of {len(jobs)} different jobs ({', '.join(sorted(map(str, jobs)))}): "
                         "name one job's ledgers at a time")
    whole_job = not targets or any(Path(t).is_dir() for t in targets)
    if not targets:
        if job is None:
            raise UsageError("name an output folder or ledger files (or a job file that names its ledger)")
        named = job.named_ledger
        files = [named] if holds_rows(named) else list(ledger_family(named))
        if not files:
            raise UsageError(f"no ledger at {job.named_ledger} (nor its shards'): run the job first")
    unique = list(dict.fromkeys(f.resolve() for f in files))
    opened: list[Ledger] = []
    try:
        for f in unique:
            opened.append(Ledger.open_existing(f))
        ledger = LedgerSet(opened, whole_job)
        last = ledger.last_run() if job is None else None  # a job given says all the run recorded
    except BaseException:
        for each in opened:
            each.close()
        raise
    defaults = job.defaults if job is not None else last.defaults if last is not None else Defaults()
    if manifest_path is None and job is not None:
        manifest_path = job.manifest
    elif manifest_path is None and last is not None and last.manifest:
        manifest_path = Path(last.manifest)
    recorded = last.out if last is not None else None
    out: Path | str
    if job is not None:
        out = job.out
    elif recorded is not None and is_uri(recorded):
        out = recorded
    elif targets and Path(targets[0]).is_dir():
        out = Path(targets[0])
    else:
        out = Path(recorded) if recorded else unique[0].parent
    return JobContext(ledger, out, manifest_path, defaults, job, last)


def status(targets: Sequence[str | Path] = (), manifest: Path | None = None, job: Job | None = None
           ) -> dict[str, Any]:
    """What output folders or ledger files hold (or, without targets, the job's ledgers): rows done,
    failed and, given the manifest (or the one the last run recorded), total and pending."""
    ctx = open_context([str(t) for t in targets], manifest, job)
    try:
        return _report(ctx)
    finally:
        ctx.ledger.close()


def export(targets: Sequence[str | Path] = (), to: Path | str | BinaryIO | None = None, manifest: Path | None = None,
           job: Job | None = None, format: str | None = None) -> tuple[Path | str | BinaryIO, int]:
    """Write the results table: Parquet, CSV or JSON Lines (`format`, or the name's suffix); by default
    `results.parquet` next to the audio; `to` may be an open binary stream (CSV or JSON Lines only).
    Returns where it went and how many rows it has."""
    if format is not None and format not in EXPORT_FORMATS:
        raise UsageError(f"export writes {', '.join(EXPORT_FORMATS)}, not {format!r}")
    ctx = open_context([str(t) for t in targets], manifest, job)
    try:
        if to is not None and not isinstance(to, str | Path):
            kind = format or "csv"
            if kind == "parquet":
                raise UsageError("Parquet needs a file (it is written with its footer last): give --to a path")
            _need_manifest(ctx)
            return to, _write_export(ctx, to, kind)
        destination = default_export(ctx.out) if to is None else to if isinstance(to, Path) or is_uri(to) else Path(to)
        return destination, _export(ctx, destination, format)
    finally:
        ctx.ledger.close()


def _report(ctx: JobContext) -> dict[str, Any]:
    totals = ctx.ledger.totals()
    done = totals.get("done", {"rows": 0, "bytes": 0, "duration_s": 0.0})
    failed = totals.get("failed", {"rows": 0})
    report: dict[str, Any] = {
        "ledger": str(ctx.ledger.path),
        "ledgers": [str(ledger.path) for ledger in ctx.ledger.ledgers],
        "missing_shards": ctx.ledger.missing_shards,
        "total": None,
        "done": int(done["rows"]),
        "failed": int(failed["rows"]),
        "pending": None,
        "bytes": int(done["bytes"]),
        "audio_s": round(float(done["duration_s"]), 3),
        # Rows done as copies of an identical request's file, and the requests that saved (dedup.py).
        **dict(zip(("copied", "requests_saved"), ctx.ledger.copies(), strict=True)),
        "failures": ctx.ledger.failures(limit=50),
        **_flags(ctx.ledger),
        # The pid of a run holding one of the ledgers now (0 when it cannot be read), else None.
        "running": next((pid for ledger in ctx.ledger.ledgers if (pid := holder(ledger.path)) is not None), None),
    }
    if ctx.manifest is not None and ctx.manifest.exists():
        counted = _counted(ctx)
        if counted is not None:
            total, done_rows, failed_rows, retried = counted
            report.update(manifest=str(ctx.manifest), total=total, done=done_rows, failed=failed_rows,
                          retried_next_run=retried, pending=total - done_rows - failed_rows)
            return report
        plan = make_plan(ctx.planning_job(), ctx.ledger, open_output(ctx.out, ctx.ledger.path), owns=ctx.ledger.in_view).total
        report.update(manifest=str(ctx.manifest), total=plan.rows, done=plan.done, failed=plan.failed + plan.retrying,
                      retried_next_run=plan.retrying, pending=plan.pending - plan.retrying)
    return report


def _counted(ctx: JobContext) -> tuple[int, int, int, int] | None:
    """Rows in all, done, failed and retried by the next run, counted from the ledger without
    planning the manifest: when the last run recorded it as planned (`Ledger.record_planned`) and it
    is unchanged since (size and mtime), read with that run's settings (no job given), as one ledger.
    None otherwise: the rows are then planned."""
    recorded = ctx.recorded
    if ctx.job is not None or ctx.manifest is None or recorded is None or recorded.manifest is None \
            or len(ctx.ledger.ledgers) != 1 or ctx.ledger.count is not None:
        return None
    if Path(recorded.manifest) != ctx.manifest.resolve():
        return None
    ledger = ctx.ledger.ledgers[0]
    planned = ledger.planned()
    if planned is None or not planned.same_file(ctx.manifest):
        return None
    return (planned.rows, *ledger.counts())


def _flags(ledger: LedgerSet) -> dict[str, Any]:
    """What the audio checks found of the rows done: rows whose file was checked (a copy's by the
    file it copies), rows flagged, and why (the first 50)."""
    checked, flagged, rows = ledger.flags(limit=50)
    return {"checked": checked, "flagged": flagged, "flags": rows}


def export_records(ctx: JobContext, fields: Sequence[str] = (), columnar: bool = True
                   ) -> Iterator[list[dict[str, Any]]]:
    """The rows `export` writes, a batch at a time, for other layouts of them (the dataset exports):
    each with the results table's columns, the ledger's `fields` besides, and the manifest's other
    columns (those not in `result_columns()`). `columnar`: a Parquet manifest's batches of plain rows
    all done are read as columns (columnar.py); False plans every row."""
    _need_manifest(ctx)
    return _export_records(ctx, (*_LEDGER_FIELDS, *fields), columnar)


def result_columns() -> frozenset[str]:
    """The results table's own columns; a record's others came from the manifest."""
    return frozenset(_TYPES)


def _export_records(ctx: JobContext, fields: Sequence[str] = _LEDGER_FIELDS, columnar: bool = True
                    ) -> Iterator[list[dict[str, Any]]]:
    """Each manifest row with its outcome as the planner decides it, so export says what status counts;
    `fields` are the ledger's columns each row carries."""
    assert ctx.manifest is not None
    job = ctx.planning_job()
    planner = Planner(job, ctx.ledger, open_output(ctx.out, ctx.ledger.path), owns=ctx.ledger.in_view)
    lane = Lane.for_plan(job, planner, Plan(), None, flush=lambda: None) if columnar else None
    number = 0
    for batch in manifest.read_batches(ctx.manifest):
        done = lane.done(batch) if lane is not None and not isinstance(batch, list) else None
        if done is not None:
            yield _done_records(ctx.ledger, planner, number, *done, fields)
            number += len(done[0])
            continue
        records = batch if isinstance(batch, list) else manifest.records_of(ctx.manifest, number, batch)
        yield _planned_records(ctx, planner, number, records, fields)
        number += len(records)


def _done_records(ledger: LedgerSet, planner: Planner, before: int, ids: list[str], texts: list[str],
                  models: list[str], voices: list[str], fields: Sequence[str]) -> list[dict[str, Any]]:
    """`_planned_records` of a batch of plain rows all done (`Lane.done`): each row as written is the
    row as narrated, keyed by its id, its voice its speaker."""
    entries, mastered, checked = ledger.get_many(ids), ledger.mastered_many(ids), ledger.checked_many(ids)
    out: list[dict[str, Any]] = []
    for number, (row_id, text, model, voice) in enumerate(zip(ids, texts, models, voices, strict=True), before + 1):
        entry = entries[row_id]
        result: dict[str, Any] = {"row": number, "id": row_id, "text": text, "voice": voice, "speaker": voice,
                                  "model": model}
        for name in fields:
            result[name] = entry[name]
        result.update(_mastered(planner, entry, mastered.get(row_id)))
        result.update(_checked(checked.get(row_id)))
        out.append(result)
    return out


def _planned_records(ctx: JobContext, planner: Planner, before: int, batch: list[dict[str, Any]],
                     fields: Sequence[str]) -> list[dict[str, Any]]:
    """A batch of manifest records, each planned, with what the ledger holds of it."""
    out: list[dict[str, Any]] = []
    made = [manifest.make_row(before + i, record, ctx.defaults) for i, record in enumerate(batch, 1)]
    decisions = planner.decide_many([row for row in made if isinstance(row, Row)])  # records looked up together
    # A row's records, as narrated (the lexicon may change its key): for rows done or tried, not
    # for a row with work (a record of its key may be another row's: an id repeated since the run).
    tried = {d.row.key for d in decisions if _tried(d)}
    asked = sorted(tried)
    entries, mastered, checked = (ctx.ledger.get_many(asked), ctx.ledger.mastered_many(asked),
                                  ctx.ledger.checked_many(asked))
    settled = iter(decisions)
    for number, (record, row) in enumerate(zip(batch, made, strict=True), before + 1):
        result: dict[str, Any] = {"row": number, "id": record.get("id"), "text": record.get("text"),
                                  "voice": record.get("voice"), "speaker": manifest.text_of(record, "speaker"),
                                  "model": record.get("model")}
        entry: dict[str, Any] | None = None
        if isinstance(row, Row):
            decision = next(settled)
            if decision.state is State.ELSEWHERE:
                continue
            # The voice as written (a list or a pool, speakers.py), and the speaker: the voice the
            # row takes, unless the manifest has a speaker column of its own.
            result.update(id=row.id, voice=row.voice, speaker=result["speaker"] or decision.row.voice,
                          model=row.model)
            entry = entries.get(decision.row.key) if _tried(decision) else None
        for name in fields:
            result[name] = entry[name] if entry is not None else None
        done = entry["key"] if entry is not None and entry["status"] == "done" else None
        result.update(_mastered(planner, entry, mastered.get(done) if done else None))
        result.update(_checked(checked.get(done) if done else None))
        if entry is None:
            result["status"] = "pending" if isinstance(row, Row) else "invalid"
        for name, value in record.items():
            if name not in KNOWN_COLUMNS and name not in result:
                result[name] = value
        out.append(result)
    return out


def _tried(decision: Decision) -> bool:
    """Whether the ledger's record of the row's key is this row's: done, failed, or tried before."""
    return decision.state in (State.DONE, State.FAILED) or decision.failed_before


def _checked(verdict: dict[str, Any] | None) -> dict[str, Any]:
    """What the audio checks found of a done row's file as it is now (nothing for a file unchecked)."""
    if verdict is None:
        return dict.fromkeys((*_CHECKED_FIELDS, "flagged", "flag_reasons", "redos"))
    return {**{name: verdict[column] for name, column in _CHECKED_FIELDS.items()}, "flagged": bool(verdict["flagged"]),
            "flag_reasons": verdict["flag_reasons"], "redos": verdict["redos"]}


def _mastered(planner: Planner, entry: dict[str, Any] | None, made: dict[str, Any] | None) -> dict[str, Any]:
    """A done row's mastered file, when there is one made from its audio as it is now."""
    if entry is None or made is None or made["status"] != "done" or made["source_sha256"] != entry["sha256"] \
            or not planner.folder.has(made["path"], made["bytes"]):
        return dict.fromkeys(("mastered_path", "preset", "meets_preset", *_MASTERED_FIELDS))
    return {"mastered_path": made["path"], "preset": made["preset"], "meets_preset": bool(made["passed"]),
            **{name: made[name] for name in _MASTERED_FIELDS}}


def default_export(out: Path | str) -> Path | str:
    """Next to the audio: `OUT/results.parquet`, in the bucket too when the audio is there."""
    if isinstance(out, str):
        base, _, query = out.partition("?")
        return f"{base.rstrip('/')}/results.parquet" + (f"?{query}" if query else "")
    return out / "results.parquet"


def _need_manifest(ctx: JobContext) -> None:
    if ctx.manifest is None or not ctx.manifest.exists():
        raise UsageError("export needs the manifest: pass --manifest (the last run's manifest is not there)")


def _export(ctx: JobContext, to: Path | str, format: str | None) -> int:
    """Write one row per manifest row, joined with the ledgers; returns the number of rows. The file
    appears whole or not at all: it is written aside, then renamed (or uploaded, then moved)."""
    _need_manifest(ctx)
    name = to.partition("?")[0] if isinstance(to, str) else to.name
    suffix = os.path.splitext(name)[1].lower()
    kind = format or _SUFFIXES.get(suffix)
    if kind is None:
        raise UsageError("export writes .parquet, .csv or .jsonl: name the file accordingly, or pass --format")
    try:
        if isinstance(to, Path):
            to.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=to.parent, prefix=".export-", suffix=suffix, delete=False) as f:
                aside = Path(f.name)
        else:
            aside = Path(tempfile.mkstemp(prefix="batchtts-export-", suffix=suffix)[1])
    except OSError as exc:
        raise UsageError(f"cannot write {to}: {exc.strerror or exc}") from exc
    faults: tuple[type[Exception], ...] = (OSError,)
    if kind != "jsonl":
        import pyarrow as pa

        faults = (OSError, pa.ArrowException)
    try:
        with aside.open("wb") as stream:
            rows = _write_export(ctx, stream, kind)
        if isinstance(to, Path):
            os.chmod(aside, 0o666 & ~_umask())  # as a file written in place would be, not the temporary's 0600
            os.replace(aside, to)
        else:
            from .store import publish_file

            publish_file(aside, to)
    except faults as exc:
        raise UsageError(f"cannot write {to}: {getattr(exc, 'strerror', None) or exc}") from exc
    finally:
        aside.unlink(missing_ok=True)
    return rows


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_ROW_GROUP = 1 << 14  # rows of the results table written together: one Parquet row group
_UNFILTERED = frozenset({"text", "path", "error", "copy_of", "mastered_path", "flag_reasons"})


def _write_export(ctx: JobContext, to: BinaryIO, kind: str) -> int:
    if kind == "jsonl":
        return _write_jsonl(ctx, to)
    import pyarrow as pa  # the writers, loaded by export alone
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    schema: pa.Schema | None = None

    writer: pq.ParquetWriter | pacsv.CSVWriter | None = None
    held: list[pa.Table] = []
    rows = 0
    try:
        for records in _export_records(ctx):
            if not records:
                continue
            if schema is None:
                # Fixed types for our columns; carried columns keep the type of their first batch.
                inferred = pa.Table.from_pylist(records).schema
                schema = pa.schema([
                    pa.field(f.name, getattr(pa, _TYPES[f.name])() if f.name in _TYPES
                             else pa.string() if pa.types.is_null(f.type) else f.type)
                    for f in inferred
                ])
            if writer is None:
                # A Parquet file keeps every row group's metadata until it closes: row groups of
                # _ROW_GROUP rows, and min/max statistics only for columns a reader filters on (not
                # texts, paths and messages), hold that to megabytes at ten million rows.
                stats = [f.name for f in schema if f.name not in _UNFILTERED]
                writer = pq.ParquetWriter(to, schema, write_statistics=stats) if kind == "parquet" else \
                    pacsv.CSVWriter(to, schema)
            held.append(pa.Table.from_pylist(records, schema=schema))
            rows += len(records)
            if sum(map(len, held)) >= _ROW_GROUP:
                writer.write_table(pa.concat_tables(held))
                held.clear()
        if held and writer is not None:
            writer.write_table(pa.concat_tables(held))
    finally:
        if writer is not None:
            writer.close()
    return rows


def _write_jsonl(ctx: JobContext, to: BinaryIO) -> int:
    rows = 0
    for records in _export_records(ctx):
        to.write("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records).encode())
        rows += len(records)
    to.flush()
    return rows
