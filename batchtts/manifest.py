"""Reading a manifest as a stream of typed rows, and refusing a bad one before anything is sent.

Rows are read in batches so memory does not grow with the manifest; the validation pass keeps only
an 8-byte hash per row to find duplicate ids and output paths.
"""

from __future__ import annotations

import array
import gzip
import hashlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from . import storage
from .config import FORMATS, Defaults
from .errors import ManifestError, ManifestProblem

BATCH_ROWS = 4096
KNOWN_COLUMNS = ("id", "text", "voice", "model", "response_format", "speed", "provider_options", "output")
TAG_COLUMNS = ("title", "artist", "album", "track")


@dataclass(frozen=True, slots=True)
class Row:
    """One manifest row with the job's defaults applied: everything needed to narrate it."""

    number: int
    id: str | None
    text: str
    model: str
    voice: str
    format: str
    speed: float | None
    provider_options: dict[str, Any] | None
    output: str | None
    tags: dict[str, str]

    def _hash(self, text: str, fmt: str) -> str:
        shape = [self.model, self.voice, text, fmt, self.speed, self.provider_options]
        return hashlib.sha256(json.dumps(shape, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    @property
    def fingerprint(self) -> str:
        """Hash of everything that shapes the audio: a change here means the file must be redone."""
        return self._hash(self.text, self.format)

    def chunk_fingerprint(self, text: str) -> str:
        """The same for one piece of a long row, as it is requested (wav rows ask for pcm)."""
        return self._hash(text, "pcm" if self.format == "wav" else self.format)

    @property
    def key(self) -> str:
        """The ledger key: the id when given, else a content key that stays put while the row does."""
        return self.id if self.id is not None else "k-" + self.fingerprint[:24]

    @property
    def relpath(self) -> str:
        if self.output is not None:
            return self.output if Path(self.output).suffix else f"{self.output}.{self.format}"
        return f"{storage.safe_name(self.key)}.{self.format}"


def detect_format(path: Path) -> str:
    name = path.name.lower()
    name = name.removesuffix(".gz")
    for ext in ("csv", "tsv", "parquet", "jsonl"):
        if name.endswith("." + ext):
            return ext
    if name.endswith(".ndjson"):
        return "jsonl"
    raise ManifestError(str(path), [ManifestProblem(None, "unknown manifest type: use .csv, .tsv, .parquet or .jsonl (.gz allowed for text formats)")])


def read_records(path: Path) -> Iterator[list[dict[str, Any]]]:
    """Yield the manifest as lists of plain dicts, one batch at a time."""
    kind = detect_format(path)
    try:
        if kind == "parquet":
            # pre_buffer would cache every row group read so far until the file is closed.
            for batch in pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=BATCH_ROWS):
                yield batch.to_pylist()
        elif kind == "jsonl":
            yield from _read_jsonl(path)
        else:
            yield from _read_delimited(path, "\t" if kind == "tsv" else ",")
    except (OSError, pa.ArrowException, UnicodeDecodeError) as exc:
        raise ManifestError(str(path), [ManifestProblem(None, f"cannot read: {exc}")]) from exc


def _read_delimited(path: Path, delimiter: str) -> Iterator[list[dict[str, Any]]]:
    # Every column is read as text: type inference on the first block would turn id "007" into 7
    # and then fail on a later block that holds "x7".
    parse = pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True)
    names = pacsv.open_csv(path, parse_options=parse).schema.names
    convert = pacsv.ConvertOptions(
        column_types={n: pa.string() for n in names}, strings_can_be_null=False, quoted_strings_can_be_null=False
    )
    reader = pacsv.open_csv(
        path, parse_options=parse, convert_options=convert, read_options=pacsv.ReadOptions(block_size=1 << 20)
    )
    for batch in reader:
        yield batch.to_pylist()


def _read_jsonl(path: Path) -> Iterator[list[dict[str, Any]]]:
    # pyarrow's JSON reader fixes each column's type from the first block and fails on rows that
    # differ later (an id that is a number in one row and a string in another, a provider_options
    # key first seen at row 5,000), so JSON Lines are parsed line by line, which also gives exact
    # row numbers for bad lines.
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    batch: list[dict[str, Any]] = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                record = {"__error__": f"not valid JSON: {exc.msg}"}
            if not isinstance(record, dict):
                record = {"__error__": "each line must be a JSON object"}
            batch.append(record)
            if len(batch) >= BATCH_ROWS:
                yield batch
                batch = []
    if batch:
        yield batch


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value)
    return text if text.strip() else None


def make_row(number: int, record: dict[str, Any], defaults: Defaults) -> Row | list[ManifestProblem]:
    """Apply defaults and check one record; returns the row or what is wrong with it."""
    problems: list[str] = []
    if "__error__" in record:
        return [ManifestProblem(number, record["__error__"])]
    row_id = _text(record.get("id"))
    if row_id is not None and (reason := storage.unsafe_reason(row_id)):
        problems.append(f"id {reason}")
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        problems.append("empty text")
    model = _text(record.get("model")) or defaults.model
    if model is None:
        problems.append("no model: add a model column or give a default (--model)")
    voice = _text(record.get("voice")) or defaults.voice
    if voice is None:
        problems.append("no voice: add a voice column or give a default (--voice)")
    fmt = (_text(record.get("response_format")) or defaults.format).strip().lower()
    if fmt not in FORMATS:
        problems.append(f"unknown response_format {fmt!r}: use one of {', '.join(FORMATS)}")
    speed = defaults.speed
    raw_speed = record.get("speed")
    if _text(raw_speed) is not None:
        try:
            speed = float(raw_speed)
            if not math.isfinite(speed) or speed <= 0:
                raise ValueError
        except (TypeError, ValueError):
            problems.append(f"speed {raw_speed!r} is not a positive number")
    options = record.get("provider_options")
    if isinstance(options, str):
        if options.strip():
            try:
                options = json.loads(options)
            except json.JSONDecodeError:
                options = "bad"
        else:
            options = None
    if options is not None and not isinstance(options, dict):
        problems.append("provider_options must be a JSON object")
    output = _text(record.get("output"))
    if output is not None:
        if reason := storage.unsafe_reason(output, allow_folders=True):
            problems.append(f"output {reason}")
        else:
            output = storage.normalise_relpath(output)
    if problems:
        return [ManifestProblem(number, p, row_id) for p in problems]
    tags = {name: value for name in TAG_COLUMNS if (value := _text(record.get(name))) is not None}
    return Row(number, row_id, text, model, voice, fmt, speed, options, output, tags)  # type: ignore[arg-type]


def iter_rows(path: Path, defaults: Defaults) -> Iterator[Row | list[ManifestProblem]]:
    number = 0
    for batch in read_records(path):
        for record in batch:
            number += 1
            yield make_row(number, record, defaults)


@dataclass
class ManifestSummary:
    rows: int
    characters: int


def _hash64(value: str) -> int:
    return int.from_bytes(hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def _duplicates(hashes: array.array, keep: int = 10_000) -> tuple[set[int], int]:
    """How many rows repeat an earlier hash, and (some of) the repeated hashes, to name them."""
    if not hashes:
        return set(), 0
    # Sorting needs two more 8-byte arrays; a hash table of counts would need several times that.
    values = pa.Array.from_buffers(pa.uint64(), len(hashes), [None, pa.py_buffer(hashes)])
    ordered = values.take(pc.array_sort_indices(values))
    repeated = pc.filter(ordered.slice(1), pc.equal(ordered.slice(1), ordered.slice(0, len(ordered) - 1)))
    return set(repeated.slice(0, keep).to_pylist()), len(repeated)


def validate(path: Path, defaults: Defaults, on_row: Callable[[Row], None] | None = None) -> ManifestSummary:
    """Read the whole manifest once and raise ManifestError listing what is wrong with it.

    `on_row` sees every good row in the same pass, so counting what is left costs no extra read.
    """
    problems: list[ManifestProblem] = []
    total_problems = 0
    ids = array.array("Q")
    paths = array.array("Q")
    rows = characters = 0
    columns: list[str] | None = None
    for batch in read_records(path):
        if columns is None and batch:
            columns = list(batch[0].keys())
            if "text" not in columns:
                raise ManifestError(str(path), [ManifestProblem(None, f"no 'text' column (columns: {', '.join(columns)})")])
        for record in batch:
            rows += 1
            row_id = _text(record.get("id"))
            if row_id is not None:
                ids.append(_hash64(row_id))
            result = make_row(rows, record, defaults)
            if isinstance(result, list):
                total_problems += len(result)
                if len(problems) < ManifestError.shown:
                    problems.extend(result)
                continue
            characters += len(result.text)
            if on_row is not None:
                on_row(result)
            if result.id is not None or result.output is not None:
                # Rows with neither are keyed by their content: identical ones share one file.
                paths.append(_hash64(result.relpath.casefold()))
    if columns is None:
        raise ManifestError(str(path), [ManifestProblem(None, "the manifest has no rows")])
    (dup_ids, id_count), (dup_paths, path_count) = _duplicates(ids), _duplicates(paths)
    if id_count or path_count:
        total_problems += id_count + path_count
        problems.extend(_report_duplicates(path, defaults, dup_ids, dup_paths))
    if total_problems:
        problems.sort(key=lambda p: p.row or 0)
        raise ManifestError(str(path), problems, total_problems)
    return ManifestSummary(rows, characters)


def _report_duplicates(path: Path, defaults: Defaults, dup_ids: set[int], dup_paths: set[int]) -> list[ManifestProblem]:
    """Second pass, only when the first found duplicates: name the first rows that share an id or a file."""
    first_id: dict[str, int] = {}
    first_path: dict[str, int] = {}
    problems: list[ManifestProblem] = []
    number = 0
    for batch in read_records(path):
        if len(problems) >= ManifestError.shown:
            break
        for record in batch:
            number += 1
            row_id = _text(record.get("id"))
            if row_id is not None and _hash64(row_id) in dup_ids:
                if row_id in first_id:
                    problems.append(ManifestProblem(number, f"duplicate id (first at row {first_id[row_id]})", row_id))
                else:
                    first_id[row_id] = number
            result = make_row(number, record, defaults)
            if isinstance(result, list) or (result.id is None and result.output is None):
                continue
            folded = result.relpath.casefold()
            if _hash64(folded) in dup_paths:
                if folded in first_path:
                    problems.append(ManifestProblem(
                        number, f"output file {result.relpath!r} is also written by row {first_path[folded]}", row_id
                    ))
                else:
                    first_path[folded] = number
    return problems
