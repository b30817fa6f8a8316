"""Reading a manifest as a stream of typed rows, and refusing a bad one before anything is sent.

Rows are read in batches so memory does not grow with the manifest; the validation pass keeps an
8-byte hash per row to find duplicate ids and output paths, on disk past a million rows (repeats.py). Reading is strict: whatever its bytes,
a manifest is read as its author meant it or refused with a ManifestError naming the row at fault,
never misread by a guess and never ended by a traceback.
"""

from __future__ import annotations

import array
import codecs
import contextlib
import csv
import gzip
import hashlib
import io
import json
import math
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import names, speakers
from .config import FORMATS, SPEEDS, Defaults, Output
from .errors import ManifestError, ManifestProblem
from .names import hash64
from .repeats import Hashes

if TYPE_CHECKING:
    import pyarrow as pa

BATCH_ROWS = 4096
# What a row hashes is this JSON of it (json.dumps with these settings): one encoder, made once.
CANONICAL = json.JSONEncoder(sort_keys=True, ensure_ascii=False)
KNOWN_COLUMNS = ("id", "text", "voice", "model", "response_format", "speed", "provider_options", "output")
TAG_COLUMNS = ("title", "artist", "album", "track")
# pyarrow's CSV blocks must hold the largest row; they grow to this, and a row beyond it is refused.
MAX_ROW_BYTES = 1 << 26
_END_MARK = "batchtts-end"
_UNCLOSED = "a quote opened in this row is never closed (the rest of the file would be read into it)"
_WIDE_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"),
)


def fingerprint(model: str, voice: str, text: str, fmt: str, speed: float | None, options: dict[str, Any] | None,
                shape: Output | None) -> str:
    """SHA-256 of what shapes a request's audio (`Row.fingerprint`); `shape` only when the job sets one."""
    made: list[Any] = [model, voice, text, fmt, speed, options]
    if shape is not None and shape.shaped:
        made.append({"sample_rate": shape.sample_rate, "channels": shape.channels})
    return hashlib.sha256(CANONICAL.encode(made).encode()).hexdigest()


def fingerprints(model: str, voice: str, fmt: str, speed: float | None, shape: Output | None) -> Callable[[str], str]:
    """`fingerprint` of many texts of one model, voice, format and speed, without provider options:
    all but the text encoded once, the same bytes as `fingerprint` hashes."""
    placeholder = "\x00text\x00"  # JSON writes it as escapes no other part of the list can hold
    head, tail = CANONICAL.encode([model, voice, placeholder, fmt, speed, None, *(
        [{"sample_rate": shape.sample_rate, "channels": shape.channels}] if shape is not None and shape.shaped else []
    )]).split(CANONICAL.encode(placeholder))
    quoted = json.encoder.encode_basestring  # as CANONICAL writes a string (ensure_ascii=False)
    sha256 = hashlib.sha256
    return lambda text: sha256(f"{head}{quoted(text)}{tail}".encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Row:
    """One manifest row with the job's defaults applied: everything needed to narrate it. Its
    fingerprint, key and file name are worked out once, when first asked for (a property that keeps
    its answer: functools.cached_property takes a lock on every first use, and a plan asks millions)."""

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
    language: str | None = None  # the `language` column: which lexicon entries apply; not sent
    script: str | None = None  # what is said, when the lexicon or voice markup changes the text (script.py)
    pool: str | None = None  # the voice as written, when `voice` was chosen from its list or pool (speakers.py)
    shape: Output = Output()  # the job's [output]: the rate and channels the file is made into as it lands
    _fingerprint: str | None = field(default=None, init=False, repr=False, compare=False)
    _key: str | None = field(default=None, init=False, repr=False, compare=False)
    _relpath: str | None = field(default=None, init=False, repr=False, compare=False)

    def _hash(self, text: str, fmt: str, voice: str | None = None, shaped: bool = False) -> str:
        """`shaped`: the [output] rate and channels too, when the job sets them (a job that does not
        keeps the fingerprints its ledger has)."""
        return fingerprint(self.model, voice or self.voice, text, fmt, self.speed, self.provider_options,
                           self.shape if shaped else None)

    @property
    def spoken(self) -> str:
        """The text as it is narrated: the script, or else the text as written."""
        return self.text if self.script is None else self.script

    @property
    def fingerprint(self) -> str:
        """Hash of everything that shapes the audio, the [output] shape included: a change here means
        the file must be redone."""
        if self._fingerprint is None:
            object.__setattr__(self, "_fingerprint", self._hash(self.spoken, self.format, shaped=True))
        assert self._fingerprint is not None
        return self._fingerprint

    @property
    def request(self) -> str:
        """What the row's file answers: the fingerprint, and the tags written into the file. Rows
        with the same request share one file (the first is narrated, the others copy it)."""
        if not self.tags:
            return self.fingerprint
        shape = [self.fingerprint, self.tags]
        return hashlib.sha256(CANONICAL.encode(shape).encode()).hexdigest()

    def chunk_fingerprint(self, text: str, voice: str | None = None) -> str:
        """The same for one piece of a long row, as it is requested (wav and flac rows ask for pcm), in
        its own voice when markup gives it one; not the [output] shape, which the stitched file is made
        into: a changed shape stitches the chunks on disk again."""
        return self._hash(text, "pcm" if self.format in ("wav", "flac") else self.format, voice)

    @property
    def key(self) -> str:
        """The ledger key: the id when given, else a content key that stays put while the row does (its
        [output] shape aside: a changed shape narrates the row again into the same record and file)."""
        if self.id is not None:
            return self.id
        if self._key is None:
            content = self._hash(self.spoken, self.format) if self.shape.shaped else self.fingerprint
            object.__setattr__(self, "_key", "k-" + content[:24])
        assert self._key is not None
        return self._key

    @property
    def relpath(self) -> str:
        if self._relpath is None:
            if self.output is not None:
                relpath = self.output if Path(self.output).suffix else f"{self.output}.{self.format}"
            else:
                relpath = f"{names.safe_name(self.key)}.{self.format}"
            object.__setattr__(self, "_relpath", relpath)
        assert self._relpath is not None
        return self._relpath


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
    """Yield the manifest as lists of plain dicts, one batch at a time.

    A record that cannot be read is {"__error__": reason}, so it keeps its row number. A fault that
    stops the reading is a ManifestError whatever raised it: no manifest ends in a traceback.
    """
    rows = 0
    for batch in read_batches(path):
        records = batch if isinstance(batch, list) else records_of(path, rows, batch)
        yield records
        rows += len(records)


def records_of(path: Path, rows: int, batch: pa.RecordBatch) -> list[dict[str, Any]]:
    """A batch `read_batches` gave as Arrow's, after `rows` rows, as records; a fault no value
    explains is the manifest's, from that row on."""
    try:
        return _batch_records(batch)
    except Exception as exc:
        raise ManifestError(str(path), [_cannot_read(rows, exc)]) from exc


def read_batches(path: Path) -> Iterator[list[dict[str, Any]] | pa.RecordBatch]:
    """`read_records`, with a Parquet manifest's batches as Arrow gives them, for a reader that
    takes whole columns (columnar.py); `records_of` makes them records."""
    kind = detect_format(path)
    rows = 0
    try:
        batches: Iterator[list[dict[str, Any]] | pa.RecordBatch]
        if kind == "parquet":
            batches = _read_parquet(path)
        elif kind == "jsonl":
            batches = _read_jsonl(path)
        else:
            batches = _read_delimited(path, "\t" if kind == "tsv" else ",")
        for batch in batches:
            yield batch
            rows += len(batch) if isinstance(batch, list) else batch.num_rows
    except ManifestError:
        raise
    except Exception as exc:
        raise ManifestError(str(path), [_cannot_read(rows, exc)]) from exc


def _cannot_read(rows: int, reason: object) -> ManifestProblem:
    where = f" after row {rows}" if rows else ""
    return ManifestProblem(None, f"cannot read{where}: {str(reason) or type(reason).__name__}")


def _refuse(path: Path, message: str) -> ManifestError:
    return ManifestError(str(path), [ManifestProblem(None, message)])


_ByteStream = gzip.GzipFile | io.BufferedReader


def _open_bytes(path: Path, tail: bytes = b"") -> _ByteStream:
    """The bytes of a text manifest, unzipped, past a UTF-8 BOM (Excel writes one), then `tail`.

    A text manifest must be UTF-8: one in UTF-16 or UTF-32 is refused at its first bytes, not read
    as noise.
    """
    f = gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")
    try:
        head = f.peek(4)[:4]
        for bom, encoding in _WIDE_BOMS:
            if head.startswith(bom):
                raise _refuse(path, f"the manifest is {encoding}: save it as UTF-8")
        if b"\x00" in head[:2]:
            raise _refuse(path, "the manifest starts with NUL bytes, as UTF-16 does: save it as UTF-8")
        if head.startswith(codecs.BOM_UTF8):
            f.read(len(codecs.BOM_UTF8))
    except BaseException:
        f.close()
        raise
    return io.BufferedReader(_Followed(f, tail)) if tail else f


class _Followed(io.RawIOBase):
    """A stream, then a few bytes of ours."""

    def __init__(self, inner: io.BufferedIOBase, tail: bytes) -> None:
        self._inner = inner
        self._tail = tail

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        # One read of the inner stream, so the bytes before a fault (a gzip file cut short) come through.
        n = self._inner.readinto1(buffer)
        if not n and self._tail:
            n = min(len(buffer), len(self._tail))
            buffer[:n] = self._tail[:n]
            self._tail = self._tail[n:]
        return n

    def close(self) -> None:
        self._inner.close()
        super().close()


def _refuse_repeated_columns(path: Path, names: list[str]) -> None:
    """Two columns of one name would leave one of them unread, silently."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise _refuse(path, f"column {name!r} appears twice: rename or remove one")
        seen.add(name)


def _read_delimited(path: Path, delimiter: str) -> Iterator[list[dict[str, Any]]]:
    import pyarrow as pa  # loaded to read a manifest: `status` of one unchanged since its run does without

    names = _csv_header(path, delimiter)
    # pyarrow reads a quote left open as a field running to the end of the file. A row of ours after
    # the file's bytes tells: it comes out as a row of its own only if every quote was closed.
    end = dict.fromkeys(names, "")
    end[names[0]] = _END_MARK
    tail = f"\n{delimiter.join(end.values())}\n".encode()
    block = 1 << 20
    done = 0
    while True:
        try:
            for records in _csv_batches(path, delimiter, names, end, tail, block, skip=done):
                yield records
                done += len(records)
            return
        except (pa.ArrowInvalid, EOFError, UnicodeDecodeError) as exc:
            if "straddl" in str(exc) and block < MAX_ROW_BYTES:
                block *= 4  # a row longer than a block: read again with larger ones, past the rows given
                continue
            fault = _csv_fault(path, delimiter, names, tail)
            if fault is None:
                fault = _cannot_read(done, f"a row is over {MAX_ROW_BYTES >> 20} MB" if "straddl" in str(exc) else exc)
            raise ManifestError(str(path), [fault]) from exc


def _csv_header(path: Path, delimiter: str) -> list[str]:
    with _open_bytes(path) as f:
        try:
            # Strict: a quote left open in the header runs to the end of the file, and fails here.
            with contextlib.closing(_csv_records(f, delimiter, strict=True)) as records:
                names = next(records, None)
        except csv.Error as exc:
            raise _refuse(path, f"the header cannot be read ({exc}): check its quotes") from exc
    if names is None:
        raise _refuse(path, "the manifest is empty")
    if (bad := _bad_byte(names)) is not None:
        raise _refuse(path, f"the header is not valid UTF-8 (byte 0x{bad[1]:02X}): save the manifest as UTF-8")
    _refuse_repeated_columns(path, names)
    return names


def _csv_batches(path: Path, delimiter: str, names: list[str], end: dict[str, str], tail: bytes,
                 block: int, skip: int) -> Iterator[list[dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    # Every column is read as text: type inference on the first block would turn id "007" into 7
    # and then fail on a later block that holds "x7". One thread: rows are used one at a time in
    # Python, and Arrow's pool of threads, once started, can abort the process as it exits
    # ("terminate called without an active exception", apache/arrow#34314).
    parse = pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True)
    convert = pacsv.ConvertOptions(
        column_types={n: pa.string() for n in names}, strings_can_be_null=False, quoted_strings_can_be_null=False
    )
    records: list[dict[str, Any]] = []
    with _open_bytes(path, tail) as f:
        # pyarrow reads any binary file object; its stubs name only IO, which GzipFile is not declared as.
        reader = pacsv.open_csv(f, parse_options=parse, convert_options=convert,  # type: ignore[arg-type]
                                read_options=pacsv.ReadOptions(block_size=block, use_threads=False))
        if reader.schema.names != names:
            raise _refuse(path, f"the header reads as {reader.schema.names} or as {names}: quote it plainly")
        for batch in reader:
            # The last batch is held back until the file ends, to take our row off it.
            if records:
                yield records
            if skip:
                batch, skip = batch.slice(skip), max(skip - batch.num_rows, 0)
            records = batch.to_pylist()
    if records and records[-1] == end:
        records.pop()
    elif records:
        records[-1] = {"__error__": _UNCLOSED}
    if records:
        yield records


def _csv_records(stream: _ByteStream, delimiter: str, strict: bool = False) -> Generator[list[str], None, None]:
    """Python's own reading of the bytes pyarrow reads, which counts rows where pyarrow cannot; bytes
    that are not UTF-8 stay in as surrogates (U+DC80-U+DCFF) to be found, not to stop the reading."""
    text = io.TextIOWrapper(stream, encoding="utf-8", errors="surrogateescape", newline="")
    try:
        yield from (record for record in csv.reader(text, delimiter=delimiter, strict=strict) if record)
    finally:
        text.detach()  # the stream is the caller's to close


def _csv_fault(path: Path, delimiter: str, names: list[str], tail: bytes) -> ManifestProblem | None:
    """The row pyarrow stumbled on, which it does not name: a second reading, paid for only by a
    manifest about to be refused."""
    swallowed = tail.decode()
    limit = csv.field_size_limit(MAX_ROW_BYTES)
    number = 0
    try:
        with _open_bytes(path, tail) as f, contextlib.closing(_csv_records(f, delimiter)) as records:
            next(records)
            for number, record in enumerate(records, 1):
                if record[-1].endswith(swallowed):
                    return ManifestProblem(number, _UNCLOSED)
                if len(record) != len(names):
                    lines = any("\n" in field or "\r" in field for field in record)
                    hint = " (a field runs over several lines: is a quote left open?)" if lines else ""
                    return ManifestProblem(number, f"{len(record)} fields where the header has {len(names)}{hint}")
                if (bad := _bad_byte(record)) is not None:
                    return ManifestProblem(number, f"{names[bad[0]]} is not valid UTF-8 (byte 0x{bad[1]:02X}): "
                                                   "save the manifest as UTF-8")
    except csv.Error as exc:
        return ManifestProblem(number + 1, f"cannot be read ({exc}): is a quote opened in this row never closed?")
    except EOFError:
        return ManifestProblem(None, f"the file is cut short after row {number}")
    finally:
        csv.field_size_limit(limit)
    return None


def _bad_byte(values: list[str]) -> tuple[int, int] | None:
    """The first byte that is not UTF-8, as (index of its value, byte), in values read with surrogateescape."""
    for index, value in enumerate(values):
        try:
            value.encode()
        except UnicodeEncodeError as exc:
            return index, ord(value[exc.start]) - 0xDC00
    return None


def _read_jsonl(path: Path) -> Iterator[list[dict[str, Any]]]:
    # pyarrow's JSON reader fixes each column's type from the first block and fails on rows that
    # differ later (an id that is a number in one row and a string in another, a provider_options
    # key first seen at row 5,000), so JSON Lines are parsed line by line, which also gives exact
    # row numbers for bad lines.
    batch: list[dict[str, Any]] = []
    rows = 0
    with _open_bytes(path) as f:
        try:
            for line in f:
                if not line.strip():
                    continue
                rows += 1
                batch.append(_json_record(line))
                if len(batch) >= BATCH_ROWS:
                    yield batch
                    batch = []
        except EOFError as exc:
            raise _refuse(path, f"the file is cut short after row {rows}") from exc
    if batch:
        yield batch


def _json_record(line: bytes) -> dict[str, Any]:
    try:
        record = _loads(line.decode())
    except UnicodeDecodeError as exc:
        return {"__error__": f"not valid UTF-8 (byte 0x{line[exc.start]:02X}): save the manifest as UTF-8"}
    except ValueError as exc:
        return {"__error__": str(exc)}
    return record if isinstance(record, dict) else {"__error__": "each line must be a JSON object"}


class _Unfit(ValueError):
    """JSON that parses but cannot be taken as written: a key given twice, a lone surrogate."""


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record = dict(pairs)
    if len(record) < len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Unfit(f"key {key!r} appears twice")
            seen.add(key)
    return record


_STRICT_JSON = json.JSONDecoder(object_pairs_hook=_object)


def _loads(text: str) -> Any:
    """JSON, strictly: a key given twice (json.loads keeps the last silently), nesting too deep for
    Python, or a lone surrogate such as \\ud800 (no UTF-8 file, file name or request can hold one)
    is a ValueError saying so."""
    try:
        value = _STRICT_JSON.decode(text)
        # Only a \ud800-\udfff escape makes a surrogate: text without one needs no look.
        if ("\\ud" in text or "\\uD" in text) and (where := _lone_surrogate(value)) is not None:
            raise _Unfit(f"{where} is not valid Unicode (it holds a lone surrogate)")
    except RecursionError:
        raise ValueError("nested too deep") from None
    except _Unfit:
        raise
    except ValueError as exc:
        raise ValueError(f"not valid JSON: {exc.msg if isinstance(exc, json.JSONDecodeError) else exc}") from None
    return value


def _lone_surrogate(value: Any) -> str | None:
    """Which part of a decoded JSON value holds a lone surrogate: a key's name, 'a key', or 'the value'."""
    if _encodes(value):
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not _encodes(key):
                return "a key"
            if not _encodes(item):
                return str(key)
    return "the value"


def _encodes(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return False
    return True


def _read_parquet(path: Path) -> Iterator[pa.RecordBatch]:
    # pre_buffer would cache every row group read so far until the file is closed; one thread, as
    # for CSV (_csv_batches).
    import pyarrow.parquet as pq  # loaded for a Parquet manifest only

    with pq.ParquetFile(path, pre_buffer=False) as file:
        schema = file.schema_arrow
        _refuse_repeated_columns(path, schema.names)
        if "provider_options" in schema.names and not _json_type(kind := schema.field("provider_options").type):
            raise _refuse(path, f"column 'provider_options' holds {kind}: it must hold JSON objects "
                                "(a struct, or JSON text)")
        yield from file.iter_batches(batch_size=BATCH_ROWS, use_threads=False)


def _json_type(kind: pa.DataType) -> bool:
    """Whether Python gets values of this Arrow type as JSON can carry them: no bytes, dates,
    decimals or maps, which would fail only when the row is hashed or sent."""
    import pyarrow as pa

    if pa.types.is_dictionary(kind):
        return _json_type(kind.value_type)
    if pa.types.is_struct(kind):
        return all(_json_type(field.type) for field in kind)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return _json_type(kind.value_type)
    return (pa.types.is_null(kind) or pa.types.is_boolean(kind) or pa.types.is_integer(kind)
            or pa.types.is_float32(kind) or pa.types.is_float64(kind)
            or pa.types.is_string(kind) or pa.types.is_large_string(kind))


def _batch_records(batch: pa.RecordBatch) -> list[dict[str, Any]]:
    import pyarrow as pa

    try:
        return batch.to_pylist()
    except (ValueError, OverflowError, pa.ArrowException):
        # A value Python cannot hold (text that is not UTF-8, a date past year 9999): find its row.
        return [_record(batch, index) for index in range(batch.num_rows)]


def _record(batch: pa.RecordBatch, index: int) -> dict[str, Any]:
    import pyarrow as pa

    record: dict[str, Any] = {}
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        try:
            record[name] = column[index].as_py()
        except UnicodeDecodeError:
            return {"__error__": f"{name} is not valid UTF-8"}
        except (ValueError, OverflowError, pa.ArrowException) as exc:
            return {"__error__": f"{name} cannot be read: {exc}"}
    return record


def _text(record: dict[str, Any], name: str, problems: list[str]) -> str | None:
    """A column's text, None when blank. Numbers read as their digits (ids are numbers in many JSON
    and Parquet files); anything else is a problem, never text made of its repr."""
    value = record.get(name)
    if isinstance(value, str):
        return value if value.strip() else None
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return str(int(value)) if value.is_integer() else str(value)
    problems.append(f"{name} is {_kind(value)}, not a string")
    return None


def text_of(record: dict[str, Any], name: str) -> str | None:
    """A column's text as rows read it: None when blank, or when it holds no text or number."""
    return _text(record, name, [])


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, (bytes, bytearray)):
        return "bytes"
    return f"a {type(value).__name__}"


def _voice(record: dict[str, Any], problems: list[str]) -> str | None:
    """The voice column: one voice, or a list of voices to choose from (speakers.py), written
    `alloy|nova` or, in JSON Lines and Parquet, as a list; a list is kept as its text."""
    value = record.get("voice")
    if isinstance(value, (list, tuple)):
        voices: list[Any] = list(value)
    else:
        text = _text(record, "voice", problems)
        if text is None or speakers.SEPARATOR not in text:
            return text
        voices = list(speakers.split(text))
    if (problem := speakers.list_problem(voices)) is not None:
        problems.append(f"voice {problem}")
        return None
    return speakers.SEPARATOR.join(v.strip() for v in voices)


def make_row(number: int, record: dict[str, Any], defaults: Defaults) -> Row | list[ManifestProblem]:
    """Apply defaults and check one record; returns the row or what is wrong with it, and never
    raises, so no value of any type in any column ends a run in a traceback."""
    if "__error__" in record:
        return [ManifestProblem(number, record["__error__"])]
    problems: list[str] = []
    row_id = None
    try:
        row_id = _text(record, "id", problems)
        if row_id is not None and (reason := names.unsafe_reason(row_id)):
            problems.append(f"id {reason}")
        text = record.get("text")
        if not isinstance(text, str):
            problems.append("empty text" if text is None else f"text is {_kind(text)}, not a string")
        elif not text.strip():
            problems.append("empty text")
        model = _text(record, "model", problems) or defaults.model
        if model is None:
            problems.append("no model: add a model column or give a default (--model)")
        voice = _voice(record, problems) or defaults.voice
        if voice is None:
            problems.append("no voice: add a voice column or give a default (--voice)")
        fmt = (_text(record, "response_format", problems) or defaults.format).strip().lower()
        if fmt not in FORMATS:
            problems.append(f"unknown response_format {fmt!r}: use one of {', '.join(FORMATS)}")
        elif (refused := defaults.output.refused(fmt)) is not None:
            problems.append(f"[output] sample_rate: {refused}")
        speed = defaults.speed
        raw_speed = record.get("speed")
        if raw_speed is not None and not (isinstance(raw_speed, str) and not raw_speed.strip()):
            try:
                if isinstance(raw_speed, bool):
                    raise TypeError
                speed = float(raw_speed)
                if not SPEEDS[0] <= speed <= SPEEDS[1]:
                    raise ValueError
            except (TypeError, ValueError, OverflowError):
                problems.append(f"speed {raw_speed!r} is not a number from {SPEEDS[0]:g} to {SPEEDS[1]:g}")
        options = record.get("provider_options")
        if isinstance(options, str):
            try:
                options = _loads(options) if options.strip() else None
            except ValueError as exc:
                problems.append(f"provider_options: {exc}")
                options = None
        if options is not None and not isinstance(options, dict):
            problems.append("provider_options must be a JSON object")
        output = _text(record, "output", problems)
        if output is not None:
            if reason := names.unsafe_reason(output, allow_folders=True):
                problems.append(f"output {reason}")
            else:
                output = names.normalise_relpath(output)
        tags = {name: value for name in TAG_COLUMNS
                if name in record and (value := _text(record, name, problems)) is not None}
        language = _text(record, "language", problems)
    except Exception as exc:  # a value no check above foresaw: still this row's problem
        problems.append(f"cannot be read: {exc!r}")
    if problems:
        return [ManifestProblem(number, p, row_id) for p in problems]
    return Row(number, row_id, text, model, voice, fmt, speed, options, output, tags,  # type: ignore[arg-type]
               language, shape=defaults.output)


def iter_rows(path: Path, defaults: Defaults, only: Callable[[int], bool] | None = None,
              last: int | None = None) -> Iterator[Row | list[ManifestProblem]]:
    """Every row in order; with `only`, just the rows whose numbers it accepts (others are not
    built); with `last`, none after that row (the rest is not read)."""
    number = 0
    for batch in read_records(path):
        for record in batch:
            number += 1
            if last is not None and number > last:
                return
            if only is None or only(number):
                yield make_row(number, record, defaults)


@dataclass(frozen=True)
class Claimed:
    """What `validate` counts of a batch an `on_batch` reader planned itself: its ids, its file
    names folded to find repeats, and its characters."""

    ids: list[str]
    folded: list[str]
    characters: int


OnBatch = Callable[[int, "pa.RecordBatch"], Claimed | None]


@dataclass
class ManifestSummary:
    rows: int
    characters: int


# Below this many keys a set finds repeats sooner than loading pyarrow.compute (a seventh of a second)
# takes; from it on, sorting holds memory to three 8-byte arrays where a set would need several times that.
SORT_FROM = 100_000


def _duplicates(hashes: array.array[int], keep: int = 10_000, sort_from: int = SORT_FROM) -> tuple[set[int], int]:
    """How many rows repeat an earlier hash, and (some of) the repeated hashes, to name them."""
    if not hashes:
        return set(), 0
    if len(hashes) < sort_from:
        seen: set[int] = set()
        repeated: list[int] = []
        for value in hashes:
            if value in seen:
                repeated.append(value)
            else:
                seen.add(value)
        return set(repeated[:keep]), len(repeated)
    import pyarrow as pa
    import pyarrow.compute as pc

    values = pa.Array.from_buffers(pa.uint64(), len(hashes), [None, pa.py_buffer(hashes)])
    ordered = values.take(pc.array_sort_indices(values))
    repeated_sorted = pc.filter(ordered.slice(1), pc.equal(ordered.slice(1), ordered.slice(0, len(ordered) - 1)))
    return {h for h in repeated_sorted.slice(0, keep).to_pylist() if h is not None}, len(repeated_sorted)


def validate(path: Path, defaults: Defaults, on_row: Callable[[Row], None] | None = None,
             on_batch: OnBatch | None = None) -> ManifestSummary:
    """Read the whole manifest once and raise ManifestError listing what is wrong with it.

    `on_row` sees every good row in the same pass, so counting what is left costs no extra read.
    `on_batch` is offered each Arrow batch first, with the number of the rows before it: a batch
    it claims (all good rows it has planned itself) is not made into rows.
    """
    problems: list[ManifestProblem] = []
    total_problems = 0
    ids, paths = Hashes(), Hashes()  # spilled to disk past a million rows: memory stays flat
    rows = characters = 0
    columns: list[str] | None = None
    try:
        for batch in read_batches(path):
            if not isinstance(batch, list):
                claimed = on_batch(rows, batch) if on_batch is not None else None
                if claimed is not None:
                    columns = columns or batch.schema.names
                    rows += batch.num_rows
                    characters += claimed.characters
                    ids.extend(map(hash64, claimed.ids))
                    paths.extend(map(hash64, claimed.folded))
                    continue
                batch = records_of(path, rows, batch)
            if columns is None:
                columns = next((list(record) for record in batch if "__error__" not in record), None)
                if columns is not None and "text" not in columns:
                    raise ManifestError(str(path), [ManifestProblem(None, f"no 'text' column (columns: {', '.join(columns)})")])
            for record in batch:
                rows += 1
                result = make_row(rows, record, defaults)
                if isinstance(result, list):
                    if result[0].id is not None:
                        ids.append(hash64(result[0].id))
                    total_problems += len(result)
                    if len(problems) < ManifestError.shown:
                        problems.extend(result)
                    continue
                if result.id is not None:
                    ids.append(hash64(result.id))
                characters += len(result.text)
                if on_row is not None:
                    on_row(result)
                if result.id is not None or result.output is not None:
                    # Rows with neither are keyed by their content: identical ones share one file.
                    paths.append(hash64(result.relpath.casefold()))
        if not rows:
            raise ManifestError(str(path), [ManifestProblem(None, "the manifest has no rows")])
        (dup_ids, id_count), (dup_paths, path_count) = ids.repeats(_duplicates), paths.repeats(_duplicates)
    finally:
        ids.close()
        paths.close()
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
            result = make_row(number, record, defaults)
            row_id = result[0].id if isinstance(result, list) else result.id
            if row_id is not None and hash64(row_id) in dup_ids:
                if row_id in first_id:
                    problems.append(ManifestProblem(number, f"duplicate id (first at row {first_id[row_id]})", row_id))
                else:
                    first_id[row_id] = number
            if isinstance(result, list) or (result.id is None and result.output is None):
                continue
            folded = result.relpath.casefold()
            if hash64(folded) in dup_paths:
                if folded in first_path:
                    problems.append(ManifestProblem(
                        number, f"output file {result.relpath!r} is also written by row {first_path[folded]}", row_id
                    ))
                else:
                    first_path[folded] = number
    return problems
