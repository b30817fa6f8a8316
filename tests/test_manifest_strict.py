"""Manifests are read strictly: whatever their bytes, they read as their author meant or are refused
with a ManifestError naming the row (exit 2, nothing sent), never misread and never a traceback."""

from __future__ import annotations

import csv
import datetime
import gzip
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import cli, error_message
from hypothesis import given, settings
from hypothesis import strategies as st

from batchtts import manifest
from batchtts.config import Defaults
from batchtts.errors import ManifestError
from batchtts.manifest import Row, iter_rows, make_row, validate

DEFAULTS = Defaults(model="m", voice="v")
UNCLOSED = "a quote opened in this row is never closed (the rest of the file would be read into it)"


def problems(path: Path) -> list[tuple[int | None, str]]:
    with pytest.raises(ManifestError) as info:
        validate(path, DEFAULTS)
    return [(p.row, p.message) for p in info.value.problems]


def rows(path: Path) -> list[Row]:
    seen: list[Row] = []
    validate(path, DEFAULTS, on_row=seen.append)
    return seen


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def lines(count: int) -> bytes:
    return b"".join(b"r%d,words %d\n" % (i, i) for i in range(count))


# A quote left open would read the rest of the file into one row.

def test_a_quote_never_closed_is_refused_at_its_row(tmp_path):
    assert problems(write(tmp_path / "a.csv", b'id,text\na,ok\nb,"never closed\nc,more\nd,rows\n')) == [(2, UNCLOSED)]


def test_an_open_quote_in_any_column_or_at_the_end_of_the_file(tmp_path):
    mid = problems(write(tmp_path / "mid.csv", b'id,text,voice\na,"open,v\nb,c,d\n'))
    last = problems(write(tmp_path / "last.csv", b"id,text\n" + lines(5000) + b'x,"open'))
    tsv = problems(write(tmp_path / "m.tsv", b'id\ttext\na\t"x\ty"\nb\t"open\n'))
    gz = problems(write(tmp_path / "m.csv.gz", b'text\nhello\n"open\n'))
    assert [mid, last, tsv, gz] == [[(1, UNCLOSED)], [(5001, UNCLOSED)], [(2, UNCLOSED)], [(2, UNCLOSED)]]
    assert "header cannot be read" in problems(write(tmp_path / "h.csv", b'id,"text\na,b\n'))[0][1]


def test_closed_quotes_over_several_lines_still_read(tmp_path):
    one_column = write(tmp_path / "one.csv", b'text\n"two\nlines"\n"last, ""quoted"""')
    assert [r.text for r in rows(one_column)] == ["two\nlines", 'last, "quoted"']
    crlf = write(tmp_path / "crlf.csv", b'id,text\r\na,"x\r\ny"\r\nb,z\r\n')
    assert [(r.id, r.text) for r in rows(crlf)] == [("a", "x\r\ny"), ("b", "z")]


def test_an_open_quote_that_outgrows_a_block_is_found_at_its_row(tmp_path):
    data = b"id,text\n" + lines(5) + b'x,"open\n' + b"y,more words\n" * 200_000
    assert problems(write(tmp_path / "m.csv", data)) == [(6, UNCLOSED)]


def test_an_open_quote_that_outgrows_the_largest_row_is_found_at_its_row(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "MAX_ROW_BYTES", 1 << 20)
    limit = csv.field_size_limit()
    data = b"id,text\n" + lines(5) + b'x,"open\n' + b"y,more words\n" * 200_000
    [(row, message)] = problems(write(tmp_path / "m.csv", data))
    assert row == 6 and message.endswith("is a quote opened in this row never closed?")
    assert csv.field_size_limit() == limit


# Two columns of one name: the second would be used silently.

@pytest.mark.parametrize("name, data", [
    ("m.csv", b"id,text,text\na,one,two\n"),
    ("m.tsv", b"text\tvoice\ttext\none\tv\ttwo\n"),
])
def test_repeated_columns_are_refused(tmp_path, name, data):
    assert problems(write(tmp_path / name, data)) == [(None, "column 'text' appears twice: rename or remove one")]


def test_repeated_parquet_columns_and_json_keys_are_refused(tmp_path):
    table = pa.Table.from_arrays([pa.array(["a"]), pa.array(["x"]), pa.array(["y"])], names=["id", "text", "text"])
    pq.write_table(table, tmp_path / "m.parquet")
    assert problems(tmp_path / "m.parquet") == [(None, "column 'text' appears twice: rename or remove one")]
    jsonl = write(tmp_path / "m.jsonl", b'{"text": "a"}\n{"text": "b", "id": "x", "text": "c"}\n'
                                        b'{"text": "d", "provider_options": {"k": 1, "k": 2}}\n'
                                        b'{"text": "e", "provider_options": "{\\"k\\": 1, \\"k\\": 2}"}\n')
    assert problems(jsonl) == [(2, "key 'text' appears twice"), (3, "key 'k' appears twice"),
                               (4, "provider_options: key 'k' appears twice")]


# Encodings: UTF-8 only, with the row of a bad byte; a UTF-8 BOM is fine.

def test_bytes_that_are_not_utf8_are_named_by_row(tmp_path):
    csv_file = write(tmp_path / "m.csv", b"id,text\n" + lines(9000) + b"bad,caf\xe9\n" + lines(10))
    assert problems(csv_file) == [(9001, "text is not valid UTF-8 (byte 0xE9): save the manifest as UTF-8")]
    jsonl = write(tmp_path / "m.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n{"text": "ok"}\n')
    assert problems(jsonl) == [(2, "not valid UTF-8 (byte 0xE9): save the manifest as UTF-8")]
    header = write(tmp_path / "h.csv", b"id,te\xffxt\na,b\n")
    assert problems(header) == [(None, "the header is not valid UTF-8 (byte 0xFF): save the manifest as UTF-8")]


@pytest.mark.parametrize("name", ["m.csv", "m.tsv", "m.jsonl", "m.csv.gz"])
@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32"])
def test_utf16_and_utf32_files_are_refused(tmp_path, name, encoding):
    text = '{"text": "hello"}\n' if name.endswith("jsonl") else "id,text\na,hello\n"
    data = text.encode(encoding) if encoding != "utf-16-be" else b"\xfe\xff" + text.encode(encoding)
    [(row, message)] = problems(write(tmp_path / name, data))
    assert row is None and message == f"the manifest is {encoding[:6].upper()}: save it as UTF-8"


@pytest.mark.parametrize("name, text", [
    ("m.csv", "id,text\na,héllo\n"), ("m.tsv", "id\ttext\na\théllo\n"),
    ("m.jsonl", '{"id": "a", "text": "héllo"}\n'), ("m.csv.gz", "id,text\na,héllo\n"),
])
def test_a_utf8_bom_is_read_past(tmp_path, name, text):
    [row] = rows(write(tmp_path / name, ("\ufeff" + text).encode()))
    assert (row.id, row.text) == ("a", "héllo")


# A value of the wrong type is named as such, never read as its repr.

def test_wrong_types_in_json_lines_are_named(tmp_path):
    records = [{"id": "a", "text": 5}, {"id": "b", "text": ["x"]}, {"id": "c", "text": {"a": 1}},
               {"id": "d", "text": True}, {"id": {"x": 1}, "text": "t"}, {"id": "f", "text": "t", "output": {"a": 1}},
               {"id": "g", "text": "t", "voice": ["v", 1]}, {"id": "h", "text": "t", "model": False},
               {"id": "i", "text": "t", "speed": True}, {"id": float("nan"), "text": "t"}]
    jsonl = write(tmp_path / "m.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())
    assert problems(jsonl) == [
        (1, "text is a number, not a string"), (2, "text is a list, not a string"),
        (3, "text is an object, not a string"), (4, "text is true/false, not a string"),
        (5, "id is an object, not a string"), (6, "output is an object, not a string"),
        (7, "voice holds 1, not a voice name: a list of voices holds names such as alloy|nova"), (8, "model is true/false, not a string"),
        (9, "speed True is not a number from 0.25 to 4"), (10, "id is nan, not a string"),
    ]


def test_a_rows_speed_is_held_to_the_apis_range(tmp_path):
    csv = write(tmp_path / "m.csv", b"id,text,speed\na,t,0.1\nb,t,0.25\nc,t,4\nd,t,4.5\n")
    assert problems(csv) == [(1, "speed '0.1' is not a number from 0.25 to 4"),
                             (4, "speed '4.5' is not a number from 0.25 to 4")]


def test_numbers_still_read_as_ids(tmp_path):
    jsonl = write(tmp_path / "m.jsonl", b'{"id": 7, "text": "a"}\n{"id": 8.0, "text": "b", "track": 3}\n')
    assert [(r.id, r.tags) for r in rows(jsonl)] == [("7", {}), ("8", {"track": "3"})]


def test_wrong_types_in_parquet_are_named(tmp_path):
    pq.write_table(pa.table({"id": [1, 2], "text": [3, 4]}), tmp_path / "ints.parquet")
    pq.write_table(pa.table({"id": pa.array([{"a": "x"}]), "text": [[1, 2]]}), tmp_path / "nested.parquet")
    pq.write_table(pa.table({"text": pa.array([b"x"]), "output": [{"p": "q"}]}), tmp_path / "bytes.parquet")
    number = "text is a number, not a string"
    assert problems(tmp_path / "ints.parquet") == [(1, number), (2, number)]
    assert problems(tmp_path / "nested.parquet") == [(1, "id is an object, not a string"),
                                                     (1, "text is a list, not a string")]
    assert problems(tmp_path / "bytes.parquet") == [(1, "text is bytes, not a string"),
                                                    (1, "output is an object, not a string")]


def test_parquet_provider_options_must_be_json(tmp_path):
    pq.write_table(pa.table({"text": ["a"], "provider_options": [{"k": b"x"}]}), tmp_path / "bad.parquet")
    assert "it must hold JSON objects" in problems(tmp_path / "bad.parquet")[0][1]
    pq.write_table(pa.table({"text": ["a"], "provider_options": [{"k": "x", "n": [1, 2]}]}), tmp_path / "good.parquet")
    assert rows(tmp_path / "good.parquet")[0].provider_options == {"k": "x", "n": [1, 2]}


def test_parquet_values_python_cannot_hold_are_named_by_row(tmp_path):
    valid = pa.array([b"ok", b"caf\xe9"], pa.binary())
    text = pa.Array.from_buffers(pa.string(), 2, valid.buffers())
    stamps = pa.Array.from_buffers(pa.timestamp("s"), 2, pa.array([0, 2**50], pa.int64()).buffers())
    pq.write_table(pa.table({"id": ["a", "b"], "text": text}), tmp_path / "utf8.parquet")
    pq.write_table(pa.table({"text": ["a", "b"], "when": stamps}), tmp_path / "when.parquet")
    assert problems(tmp_path / "utf8.parquet") == [(2, "text is not valid UTF-8")]
    assert [row for row, _ in problems(tmp_path / "when.parquet")] == [2]


# CSV fields far larger than pyarrow's read block.

def test_a_field_of_ten_megabytes_reads(tmp_path):
    chapter = ("A long chapter, with \"quotes\" and\nnew lines. " * 230_000)[: 10 << 20]
    quoted = chapter.replace('"', '""').encode()
    first = b"id,text\nfirst,\"" + quoted + b"\"\n" + lines(3000)
    # Rows already given before the long one are not given again when the reading starts over.
    later = b"id,text\n" + lines(200_000) + b"big,\"" + quoted + b"\"\nlast,end\n"
    read = rows(write(tmp_path / "first.csv", first))
    assert len(read) == 3001 and read[0].text == chapter and read[-1].id == "r2999"
    read = rows(write(tmp_path / "later.csv", later))
    assert [r.id for r in read] == [f"r{i}" for i in range(200_000)] + ["big", "last"] and read[-2].text == chapter


# A row with the wrong number of fields is named.

def test_a_row_with_too_many_fields_is_named(tmp_path):
    assert problems(write(tmp_path / "m.csv", b"id,text\na,b\nc,d,e,f\n")) == [(2, "4 fields where the header has 2")]
    later = write(tmp_path / "later.csv.gz", b"id,text\n" + lines(20000) + b"short\n" + lines(5))
    assert problems(later) == [(20001, "1 fields where the header has 2")]


# Truncated files, deep nesting, lone surrogates.

def test_a_truncated_gzip_names_the_last_good_row(tmp_path):
    full = b"".join(json.dumps({"id": str(i), "text": "words " * 20}).encode() + b"\n" for i in range(3000))
    jsonl, csv_file = tmp_path / "m.jsonl.gz", tmp_path / "m.csv.gz"
    jsonl.write_bytes(gzip.compress(full)[:-100])
    csv_file.write_bytes(gzip.compress(b"id,text\n" + lines(50000))[:-100])
    assert problems(jsonl) == [(None, f"the file is cut short after row {whole_lines(jsonl)}")]
    header = 1
    assert problems(csv_file) == [(None, f"the file is cut short after row {whole_lines(csv_file) - header}")]


def whole_lines(path: Path) -> int:
    """How many whole lines a cut gzip file gives before it ends."""
    count = 0
    with pytest.raises(EOFError), gzip.open(path) as f:
        for _ in f:
            count += 1
    assert 1000 < count
    return count


def test_json_nested_too_deep_and_lone_surrogates_are_row_problems(tmp_path):
    deep = b'{"text": ' + b"[" * 5000 + b"]" * 5000 + b"}\n"
    jsonl = write(tmp_path / "m.jsonl", deep + b'{"id": "\\ud800", "text": "t"}\n{"text": "x\\udc00"}\n'
                                             b'{"text": "t", "provider_options": "{\\"k\\": \\"\\\\ud800\\"}"}\n'
                                             b'{"id": "pair", "text": "\\ud83d\\ude00"}\n')
    assert problems(jsonl) == [
        (1, "nested too deep"), (2, "id is not valid Unicode (it holds a lone surrogate)"),
        (3, "text is not valid Unicode (it holds a lone surrogate)"),
        (4, "provider_options: k is not valid Unicode (it holds a lone surrogate)"),
    ]
    [emoji] = rows(write(tmp_path / "ok.jsonl", b'{"id": "pair", "text": "\\ud83d\\ude00"}\n'))
    assert emoji.text == "\U0001f600"


# Whatever goes wrong, a ManifestError naming the row reached.

def test_an_unforeseen_fault_in_reading_is_a_manifest_error(tmp_path, monkeypatch):
    def broken(line: bytes) -> dict:
        raise RuntimeError("unforeseen")

    monkeypatch.setattr(manifest, "_json_record", broken)
    assert problems(write(tmp_path / "m.jsonl", b'{"text": "a"}\n')) == [(None, "cannot read: unforeseen")]


def test_an_unforeseen_value_is_its_rows_problem():
    class Odd(str):
        def strip(self, chars: str | None = None) -> str:
            raise RuntimeError("unforeseen")

    assert make_row(3, {"text": Odd("x")}, DEFAULTS)[0].message == "cannot be read: RuntimeError('unforeseen')"


def test_broken_compression_is_a_manifest_error(tmp_path):
    (tmp_path / "m.csv.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"garbage" * 10)
    assert problems(tmp_path / "m.csv.gz")[0][1].startswith("cannot read")
    (tmp_path / "m.jsonl.gz").write_bytes(b"not gzip at all")
    assert problems(tmp_path / "m.jsonl.gz")[0][1].startswith("cannot read")


# Through the real command line: exit 2, no traceback, nothing sent.

@pytest.mark.parametrize("name, data, expected", [
    ("m.csv", b'id,text\na,ok\nb,"never closed\nc,more\n', f"row 2: {UNCLOSED}"),
    ("m.jsonl.gz", gzip.compress(b'{"text": "a"}\n' * 5000)[:-50], "the file is cut short after row"),
    ("m.csv", "id,text\na,hello\n".encode("utf-16"), "the manifest is UTF-16: save it as UTF-8"),
], ids=["open-quote", "cut-gzip", "utf-16"])
def test_the_command_line_refuses_before_sending(tmp_path, serve, name, data, expected):
    server = serve()
    (tmp_path / name).write_bytes(data)
    result = cli("run", tmp_path / name, "--out", tmp_path / "out", "--base-url", server.url,
                      "--model", "m", "--voice", "v")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "Aborted" not in result.stderr
    assert server.stats()["requests"] == 0
    assert expected in error_message(result)


# Any bytes at all: validate returns or raises ManifestError, and what it returns is usable.

TOKENS = [b'"', b'""', b",", b"\t", b"\n", b"\r\n", b"\r", b" ", b"text", b"id", b"voice", b"output", b"speed",
          b"provider_options", b"a", b"7", b"\xff", b"\xe9", b"\xed\xa0\x80", b"\xef\xbb\xbf", b"\xff\xfe", b"\x00",
          b"{", b"}", b"[", b"]", b":", b'"text"', b'"id"', b'"output"', b"\\ud800", b"\\", b"null", b"true", b"1e999"]
HEADERS = [b"", b"id,text\n", b"text\n", b"id\ttext\n", b"text,output,speed\n", b"\xef\xbb\xbfid,text\n",
           b'{"text": "a"}\n', b'{"id": 1, "text": "b", "output": "o"}\n']
KEYS = ["id", "text", "voice", "model", "output", "speed", "provider_options", "response_format", "title", "track"]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=3), inner, max_size=3),
    max_leaves=6,
)
JSON_LINES = st.lists(st.dictionaries(st.sampled_from(KEYS), JSON_VALUES, max_size=5), max_size=4).map(
    lambda records: "".join(json.dumps(r) + "\n" for r in records).encode()
)
TEXT_BYTES = st.one_of(
    st.tuples(st.sampled_from(HEADERS), st.lists(st.sampled_from(TOKENS) | st.binary(max_size=3), max_size=40)).map(
        lambda parts: parts[0] + b"".join(parts[1])
    ),
    JSON_LINES,
    st.binary(max_size=60),
)


def accepts_or_refuses(path: Path) -> None:
    seen: list[Row] = []
    try:
        validate(path, DEFAULTS, on_row=seen.append)
        streamed = [r for r in iter_rows(path, DEFAULTS) if isinstance(r, Row)]
    except ManifestError:
        return
    assert len(streamed) == len(seen)
    for row in seen:
        assert isinstance(row.text, str) and row.text.strip()
        # What later stages do with a row: hash it, name its file, write its key and text as UTF-8.
        assert row.fingerprint and row.relpath
        (row.key + row.text + row.relpath + json.dumps(row.provider_options, ensure_ascii=False)).encode()


@settings(deadline=None)
@given(data=TEXT_BYTES, suffix=st.sampled_from(["csv", "tsv", "jsonl", "csv.gz", "jsonl.gz"]), cut=st.integers(0, 30))
def test_any_text_manifest_is_read_or_refused(tmp_path_factory, data, suffix, cut):
    path = tmp_path_factory.mktemp("fuzz") / f"m.{suffix}"
    if suffix.endswith(".gz"):
        packed = gzip.compress(data)
        path.write_bytes(packed[: len(packed) - cut] if cut < 10 else packed)
    else:
        path.write_bytes(data)
    accepts_or_refuses(path)


COLUMN_TYPES = {
    "string": (pa.string(), st.text(max_size=5)),
    "int": (pa.int64(), st.integers(-(2**63), 2**63 - 1)),
    "float": (pa.float64(), st.floats()),
    "bool": (pa.bool_(), st.booleans()),
    "list": (pa.list_(pa.int64()), st.lists(st.integers(-5, 5), max_size=3)),
    "struct": (pa.struct([("a", pa.string()), ("b", pa.float64())]),
               st.fixed_dictionaries({"a": st.text(max_size=3), "b": st.floats()})),
    "binary": (pa.binary(), st.binary(max_size=5)),
    "timestamp": (pa.timestamp("us"), st.datetimes(max_value=datetime.datetime(9999, 1, 1))),
    "null": (pa.null(), st.none()),
}


@st.composite
def parquet_tables(draw: st.DrawFn) -> pa.Table:
    count = draw(st.integers(0, 4))
    names = draw(st.lists(st.sampled_from(KEYS[:8] + ["extra"]), min_size=1, max_size=5))
    columns = []
    for _ in names:
        kind, values = COLUMN_TYPES[draw(st.sampled_from(sorted(COLUMN_TYPES)))]
        columns.append(pa.array(draw(st.lists(st.none() | values, min_size=count, max_size=count)), type=kind))
    return pa.Table.from_arrays(columns, names=names)


@settings(deadline=None)
@given(table=parquet_tables())
def test_any_parquet_manifest_is_read_or_refused(tmp_path_factory, table):
    path = tmp_path_factory.mktemp("fuzz") / "m.parquet"
    pq.write_table(table, path)
    accepts_or_refuses(path)


@settings(deadline=None)
@given(texts=st.lists(st.text(min_size=1).filter(str.strip), min_size=1, max_size=6),
       suffix=st.sampled_from(["csv", "tsv", "jsonl", "csv.gz"]))
def test_any_well_formed_manifest_reads_as_written(tmp_path_factory, texts, suffix):
    path = tmp_path_factory.mktemp("fuzz") / f"m.{suffix}"
    records = [{"id": f"r{i}", "text": text} for i, text in enumerate(texts)]
    if suffix == "jsonl":
        data = "".join(json.dumps(r) + "\n" for r in records)
    else:
        out = io.StringIO()
        writer = csv.DictWriter(out, ["id", "text"], delimiter="\t" if suffix == "tsv" else ",")
        writer.writeheader()
        writer.writerows(records)
        data = out.getvalue()
    write(path, data.encode())
    assert [(r.id, r.text) for r in rows(path)] == [(r["id"], r["text"]) for r in records]
