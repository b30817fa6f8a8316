"""Bad manifests are refused before anything is sent, with row numbers; good ones stream."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import cli, error_message, write_csv, write_jsonl

from batchtts.config import Defaults
from batchtts.errors import ManifestError
from batchtts.manifest import Row, make_row, validate

DEFAULTS = Defaults(model="m", voice="v")


def refused(tmp_path: Path, manifest: Path, serve, *extra: str) -> str:
    server = serve()
    result = cli("run", manifest, "--out", tmp_path / "out", "--base-url", server.url, *extra)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert server.stats()["requests"] == 0
    return error_message(result)


def test_missing_text_column(tmp_path, serve):
    message = refused(tmp_path, write_csv(tmp_path / "m.csv", [{"id": "a", "words": "hi"}]), serve, "--model", "m", "--voice", "v")
    assert "no 'text' column" in message


def test_unreadable_and_unknown_files(tmp_path, serve):
    assert "cannot read" in refused(tmp_path, tmp_path / "absent.csv", serve, "--model", "m", "--voice", "v")
    (tmp_path / "m.xlsx").write_text("x")
    assert "unknown manifest type" in refused(tmp_path, tmp_path / "m.xlsx", serve, "--model", "m", "--voice", "v")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    assert "cannot read" in refused(tmp_path, tmp_path / "broken.parquet", serve, "--model", "m", "--voice", "v")


def test_every_row_problem_is_reported_with_its_row_number(tmp_path, serve):
    manifest = write_csv(tmp_path / "m.csv", [
        {"id": "a", "text": "fine", "voice": "", "response_format": "mp3", "output": ""},
        {"id": "b", "text": "  ", "voice": "v", "response_format": "mp3", "output": ""},
        {"id": "a", "text": "dup", "voice": "v", "response_format": "mp3", "output": ""},
        {"id": "c", "text": "fmt", "voice": "v", "response_format": "ogg", "output": ""},
        {"id": "../d", "text": "esc", "voice": "v", "response_format": "mp3", "output": ""},
        {"id": "e", "text": "abs", "voice": "v", "response_format": "mp3", "output": "/tmp/x"},
        {"id": "f", "text": "drive", "voice": "v", "response_format": "mp3", "output": "C:\\x"},
        {"id": "g", "text": "nul", "voice": "v", "response_format": "mp3", "output": "a\x00b"},
        {"id": "h", "text": "clash", "voice": "v", "response_format": "mp3", "output": "same"},
        {"id": "i", "text": "clash", "voice": "v", "response_format": "mp3", "output": "same"},
    ])
    message = refused(tmp_path, manifest, serve, "--model", "m")
    assert "row 1 (id 'a'): no voice" in message
    assert "row 2 (id 'b'): empty text" in message
    assert "row 3 (id 'a'): duplicate id (first at row 1)" in message
    assert "row 4 (id 'c'): unknown response_format 'ogg'" in message
    assert "row 5 (id '../d'): id '../d' climbs out" in message
    assert "row 6 (id 'e'): output '/tmp/x' is an absolute path" in message
    assert "row 7 (id 'f'): output 'C:\\\\x' starts with a drive letter" in message
    assert "row 8 (id 'g'): output contains a NUL" in message
    assert "row 10 (id 'i'): output file 'same.mp3' is also written by row 9" in message


def test_only_the_first_twenty_problems_are_listed_with_the_count(tmp_path, serve):
    manifest = write_csv(tmp_path / "m.csv", [{"id": str(i), "text": ""} for i in range(45)])
    message = refused(tmp_path, manifest, serve, "--model", "m", "--voice", "v")
    assert "45 problems" in message and "... and 25 more" in message
    assert message.count("empty text") == 20


def test_missing_model_without_default(tmp_path, serve):
    assert "no model" in refused(tmp_path, write_csv(tmp_path / "m.csv", [{"text": "hi", "voice": "v"}]), serve)


def test_bad_jsonl_lines_are_named(tmp_path, serve):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"text": "ok"}\nnot json\n[1, 2]\n{"text": "x", "speed": "fast"}\n{"text": "y", "provider_options": 3}\n')
    message = refused(tmp_path, manifest, serve, "--model", "m", "--voice", "v")
    assert "row 2: not valid JSON" in message
    assert "row 3: each line must be a JSON object" in message
    assert "row 4: speed 'fast' is not a number from 0.25 to 4" in message
    assert "row 5: provider_options must be a JSON object" in message


def test_ids_keep_their_text_form_across_batches(tmp_path):
    # Inference on the first block would read these as integers and drop the leading zeros.
    data = [{"id": f"{i:05d}", "text": f"t{i}"} for i in range(10000)] + [{"id": "x-1", "text": "late string id"}]
    manifest = write_csv(tmp_path / "m.csv", data)
    ids = [r.id for r in _rows(manifest)]
    assert ids[:2] == ["00000", "00001"] and ids[-1] == "x-1" and len(ids) == 10001


def test_jsonl_rows_may_differ_in_types_and_keys(tmp_path):
    data = [{"id": i, "text": f"t{i}"} for i in range(6000)] + [{"id": "s", "text": "t", "provider_options": {"a": 1}}]
    rows = _rows(write_jsonl(tmp_path / "m.jsonl", data))
    assert rows[0].id == "0" and rows[-1].provider_options == {"a": 1}


def test_parquet_streams_in_batches(tmp_path):
    table = pa.table({"id": [f"p{i}" for i in range(20000)], "text": ["hello"] * 20000})
    pq.write_table(table, tmp_path / "m.parquet", row_group_size=5000)
    summary = validate(tmp_path / "m.parquet", DEFAULTS)
    assert summary.rows == 20000 and summary.characters == 100000


def test_fingerprint_follows_what_shapes_the_audio():
    base = make_row(1, {"id": "a", "text": "hi"}, DEFAULTS)
    assert isinstance(base, Row)
    same = make_row(7, {"id": "a", "text": "hi", "note": "carried columns do not matter"}, DEFAULTS)
    assert same.fingerprint == base.fingerprint
    for change in ({"text": "ho"}, {"voice": "w"}, {"model": "n"}, {"speed": "1.5"},
                   {"response_format": "wav"}, {"provider_options": '{"x": 1}'}):
        other = make_row(1, {"id": "a", "text": "hi", **change}, DEFAULTS)
        assert other.fingerprint != base.fingerprint, change


def test_unsafe_ids_become_distinct_safe_names():
    a = make_row(1, {"id": "chapter 1/part a", "text": "x"}, DEFAULTS)
    b = make_row(2, {"id": "chapter_1_part_a", "text": "x"}, DEFAULTS)
    assert a.relpath != b.relpath and "/" not in a.relpath and a.relpath.endswith(".mp3")


def _rows(path: Path) -> list[Row]:
    seen: list[Row] = []
    validate(path, DEFAULTS, on_row=seen.append)
    return seen


def test_validate_raises_with_the_problem_list(tmp_path):
    with pytest.raises(ManifestError) as info:
        validate(write_csv(tmp_path / "m.csv", [{"text": ""}]), DEFAULTS)
    assert info.value.total == 1 and info.value.problems[0].row == 1
