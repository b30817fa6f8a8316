"""A finished run as a dataset a trainer reads: the rows with audio, each file in the trainer's shape,
laid out as NeMo, LJSpeech, Hugging Face `datasets` or WebDataset read them.

    batchtts.export_dataset(["out/dataset"], "datasets/nemo", "nemo", split="train=0.98,validation=0.02")

Rows are read as `export` reads them (the manifest joined with the ledgers, a batch at a time) and
written as they come, a file or a shard at a time: memory stays flat however many rows there are.
A row goes in the split its key draws (`splits.py`), or the one its manifest's `split` column
names. Rows not narrated, rows the audio checks flagged, and files that do not decode are left
out and counted.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Job, is_uri
from ..errors import UsageError
from ..redact import redact_uri
from ..results import export_records, open_context, result_columns
from ..storage import OutputFolder, open_output
from .convert import Conversion, Source, converted
from .huggingface import HuggingFace
from .layout import Layout, Sample, ShardSize, sample_name
from .ljspeech import LJSpeech
from .nemo import NeMo
from .shape import AUDIO_FORMATS, Audio, AudioFormat, Shape
from .sink import Sink
from .splits import Splits
from .wds import WebDataset

DATASET_FORMATS = ("nemo", "ljspeech", "hf", "webdataset")
# Each layout's audio when none is asked for: what its readers take best.
_DEFAULT_AUDIO: dict[str, AudioFormat] = {"nemo": "wav", "ljspeech": "wav", "hf": "flac", "webdataset": "flac"}
_DEFAULT_SHARDS = {"hf": ShardSize(bytes=500 * 1000**2), "webdataset": ShardSize(bytes=1000**3)}
_LJSPEECH_RATE = 22050
_NAMED = 5  # unreadable rows named in the result; the rest are counted
_FIELDS = ("key", "channels")  # the ledger's columns read besides the results table's
_LAYOUTS_OWN = frozenset({"audio", "audio_filepath", "shard_id"})  # names the layouts give columns of their own


@dataclass
class DatasetExport:
    """What an export wrote, and what it left out."""

    to: Path | str
    format: str
    rows: int = 0
    splits: dict[str, int] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)  # what a trainer is pointed at: manifests, shard patterns
    copied: int = 0  # files already in the asked shape, taken byte for byte
    left_out: dict[str, int] = field(default_factory=dict)  # by why: pending, failed, invalid, flagged
    unreadable: list[str] = field(default_factory=list)  # the first rows whose file did not read, and why
    unreadable_rows: int = 0

    def lines(self) -> list[str]:
        """What the export did, for people."""
        where = redact_uri(self.to) if isinstance(self.to, str) else str(self.to)
        splits = ", ".join(f"{name} {count:,}" for name, count in self.splits.items())
        lines = [f"wrote {_rows(self.rows)} to {where} as {self.format}" + (f": {splits}" if len(self.splits) > 1 else ""),
                 *([f"  {', '.join(self.files)}"] if self.files else []),
                 f"  audio: {self.rows - self.copied:,} files converted, {self.copied:,} copied as narrated"]
        if self.left_out:
            by_status = ", ".join(f"{count:,} {status}" for status, count in sorted(self.left_out.items()))
            lines.append(f"left out {_rows(sum(self.left_out.values()))}: {by_status}")
        if self.unreadable_rows:
            lines.append(f"left out {_rows(self.unreadable_rows)} whose file does not decode:")
            lines += [f"  {named}" for named in self.unreadable]
            if self.unreadable_rows > len(self.unreadable):
                lines.append(f"  and {self.unreadable_rows - len(self.unreadable):,} more")
        return lines


def _rows(n: int) -> str:
    return f"{n:,} row{'' if n == 1 else 's'}"


def export_dataset(targets: Sequence[str | Path], to: Path | str, format: str, *, manifest: Path | None = None,
                   job: Job | None = None, split: str | Mapping[str, float] | None = None,
                   shard_size: str | int | None = None, sample_rate: int | None = None,
                   channels: int | None = None, audio_format: str | None = None, include_flagged: bool = False,
                   workers: int | None = None) -> DatasetExport:
    """Write the narrated rows of output folders or ledgers (or of `job`) into `to`, a new folder or
    object-store prefix, in `format` (one of DATASET_FORMATS). `split`: fractions by name, as
    `train=0.98,validation=0.01,test=0.01`, a row's split drawn from its key (default: the
    manifest's `split` column; all train without one). `shard_size`: rows (1000) or bytes
    ("500MB") a shard: NeMo's tars (none unless given), the Parquet files (500MB) and WebDataset's
    tars (1GB). The audio is made `audio_format` (flac, wav, mp3) at `sample_rate` and `channels`
    (default: the file's own; LJSpeech: wav, 22,050 Hz mono). Rows the audio checks flagged are left
    out unless `include_flagged`. `workers`: processes that convert the files of a large export
    (default: one a core)."""
    if format not in DATASET_FORMATS:
        raise UsageError(f"a dataset is written as {', '.join(DATASET_FORMATS)}, not {format!r}")
    shape = _shape(format, audio_format, sample_rate, channels)
    splits = None if split is None else Splits.parse(
        split if isinstance(split, str) else ",".join(f"{name}={fraction}" for name, fraction in split.items()))
    shards = _shard_size(format, shard_size)
    destination = to if isinstance(to, Path) or is_uri(to) else Path(to)
    ctx = open_context([str(t) for t in targets], manifest, job)
    try:
        records = export_records(ctx, _FIELDS)  # refuses a job whose manifest is gone, before anything is written
        sink = Sink(destination)
        try:
            sink.open()
            result = DatasetExport(destination, format)
            layout = _layout(format, sink, shards, shape)
            left: Counter[str] = Counter()
            _fill(layout, _jobs(records, include_flagged, left), open_output(ctx.out, ctx.ledger.path), splits, shape,
                  result, workers)
            result.left_out = dict(left)
            result.files = layout.close()
        finally:
            sink.close()
    finally:
        ctx.ledger.close()
    return result


def _shape(format: str, audio_format: str | None, rate: int | None, channels: int | None) -> Shape:
    if format == "ljspeech":
        if audio_format not in (None, "wav"):
            raise UsageError("LJSpeech's files are wav (16-bit PCM): leave out --audio-format")
        shape = Shape("wav", rate or _LJSPEECH_RATE, channels or 1)
    else:
        chosen = next((f for f in AUDIO_FORMATS if f == audio_format), None) or _DEFAULT_AUDIO[format]
        if audio_format is not None and chosen != audio_format:
            raise UsageError(f"--audio-format takes {', '.join(AUDIO_FORMATS)}, not {audio_format!r}")
        shape = Shape(chosen, rate, channels)
    shape.check()
    return shape


def _shard_size(format: str, size: str | int | None) -> ShardSize | None:
    if size is None:
        return _DEFAULT_SHARDS.get(format)
    if format == "ljspeech":
        raise UsageError("LJSpeech's layout has no shards: leave out --shard-size")
    if isinstance(size, int):
        if size < 1:
            raise UsageError("a shard takes at least 1 row")
        return ShardSize(rows=size)
    return ShardSize.parse(size)


def _layout(format: str, sink: Sink, shards: ShardSize | None, shape: Shape) -> Layout:
    mtime = int(time.time())  # every tar member's: the time of the export
    if format == "nemo":
        return NeMo(sink, shards, mtime)
    if format == "ljspeech":
        return LJSpeech(sink)
    assert shards is not None
    return HuggingFace(sink, shards, shape) if format == "hf" else WebDataset(sink, shards, mtime)


def _fill(layout: Layout, jobs: Iterator[Conversion[dict[str, Any]]], folder: OutputFolder, splits: Splits | None,
          shape: Shape, result: DatasetExport, workers: int | None) -> None:
    """Every row with audio into the layout, in manifest order. Without `splits`, a row goes in the
    split its manifest's `split` column names (train when it has none)."""
    own = result_columns() | _LAYOUTS_OWN | set(_FIELDS)
    counts: Counter[str] = Counter()
    for record, audio in converted(jobs, _source(folder), shape, workers):
        if isinstance(audio, str):
            result.unreadable_rows += 1
            if len(result.unreadable) < _NAMED:
                result.unreadable.append(f"row {record['row']} ({record['key']}): {audio}")
            continue
        key = str(record["key"])
        split = splits.of(key) if splits is not None else _named_split(record)
        layout.add(Sample(sample_name(key), split, str(record["text"]), audio, _fields(record, key, audio, own)))
        counts[split] += 1
        result.copied += audio.copied
    result.rows = sum(counts.values())
    result.splits = {name: counts[name] for name in (*(splits.names if splits is not None else ()), *counts)}


def _jobs(records: Iterator[list[dict[str, Any]]], include_flagged: bool, left: Counter[str]
          ) -> Iterator[Conversion[dict[str, Any]]]:
    """The rows with a file to convert; the others are counted in `left`, by why."""
    for batch in records:
        for record in batch:
            relpath = _text(record.get("mastered_path")) or _text(record["path"])
            if record["status"] != "done" or relpath is None or record["key"] is None:
                left[str(record["status"])] += 1
            elif record.get("flagged") and not include_flagged:  # the audio checks found it is not the speech asked for
                left["flagged"] += 1
            else:
                pcm = (int(record["sample_rate"]), int(record["channels"] or 1)) if relpath.endswith(".pcm") else None
                yield Conversion(record, relpath, pcm)


def _source(folder: OutputFolder) -> Source:
    """Where the run's files are, as a worker process finds them."""
    from ..store import ObjectStoreOutput

    return Source(folder.uri, uri=True) if isinstance(folder, ObjectStoreOutput) else Source(str(folder.root))


def _named_split(record: dict[str, Any]) -> str:
    named = _text(record.get("split"))
    if named is None:
        return "train"
    if not Splits.is_name(named):
        raise UsageError(f"row {record['row']} ({record['key']}): split {named!r}: letters, digits and '_' only "
                         "(it names files); or pass --split to split by key")
    return named


def _fields(record: dict[str, Any], key: str, audio: Audio, own: frozenset[str]) -> dict[str, Any]:
    """What is said of a row: id, text, normalized_text (when the manifest has the column),
    speaker (the manifest's speaker column, else the voice), duration, rate, and the manifest's
    other columns but those the layouts name themselves (audio, audio_filepath, shard_id)."""
    said: dict[str, Any] = {"id": key, "text": record["text"]}
    if "normalized_text" in record:
        said["normalized_text"] = _text(record["normalized_text"])
    said["speaker"] = _text(record.get("speaker")) or record["voice"]
    said.update(duration=round(audio.duration, 6), sample_rate=audio.rate)
    said.update((name, value) for name, value in record.items() if name not in own and name not in said)
    return said


def _text(value: Any) -> str | None:
    """A cell as text; empty cells (None, "", NaN from Parquet) are None."""
    if value is None or value != value:
        return None
    text = str(value).strip()
    return text or None
