"""Identical requests bought once: rows with different ids and the same model, voice, text, format,
speed, options (and tags) share one request, within a run and across reruns; the file is linked
under each row's name and each row has its own ledger entry. Runs are the real CLI against a real
`batchtts serve` on loopback, which counts the requests it gets."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import av
import pyarrow.parquet as pq
import pytest
from conftest import FAST_RETRY, cli, ledger_rows, write_csv
from hypothesis import given
from hypothesis import strategies as st

from batchtts.config import Defaults
from batchtts.dedup import Firsts
from batchtts.errors import StorageError
from batchtts.manifest import make_row
from batchtts.storage import OutputFolder
from batchtts.store import ObjectStoreOutput

MODEL = "openai/gpt-4o-mini-tts"


def run_args(manifest: Path, out: Path | str, server, *extra: str) -> list[str | Path]:
    return ["run", manifest, "--out", out, "--model", MODEL, "--voice", "alloy", "--base-url", server.url,
            *FAST_RETRY, *extra]


def summary(stderr: str) -> dict:
    return next(json.loads(line) for line in stderr.splitlines() if '"event": "summary"' in line)


def decoded(path: Path) -> bytes:
    """The PCM samples a file decodes to, by FFmpeg's decoder (PyAV)."""
    with av.open(str(path)) as container:
        return b"".join(bytes(plane) for frame in container.decode(audio=0) for plane in frame.planes)


def test_a_hundred_rows_of_ten_texts_cost_ten_requests(serve, tmp_path):
    server = serve()
    out = tmp_path / "out"
    texts = [f"Line {i} said the same way every time." for i in range(10)]
    manifest = write_csv(tmp_path / "m.csv", [{"id": f"r{i:03d}", "text": texts[i % 10]} for i in range(100)])

    plan = json.loads(cli(*run_args(manifest, out, server, "--dry-run", "--json")).stdout)["total"]
    assert (plan["pending"], plan["requests"], plan["copies"], plan["requests_saved"]) == (100, 10, 90, 90)
    assert plan["pending_characters"] == sum(map(len, texts))  # the estimate counts what is sent

    result = cli(*run_args(manifest, out, server))
    assert result.returncode == 0, result.stderr
    assert server.stats()["requests"] == 10
    said = summary(result.stderr)
    assert (said["done"], said["requests"], said["copied"], said["requests_saved"]) == (100, 10, 90, 90)
    assert "10 requests" in result.stdout and "90 requests saved: 90 rows copied" in result.stdout

    ledger = ledger_rows(out / "ledger.sqlite")
    files = {key: out / row["path"] for key, row in ledger.items()}
    assert len(ledger) == 100 and all(row["status"] == "done" for row in ledger.values())
    originals = {key: row for key, row in ledger.items() if row["copy_of"] is None}
    assert sorted(originals) == [f"r{i:03d}" for i in range(10)]
    for key, row in ledger.items():
        first = ledger[row["copy_of"] or key]
        assert first["copy_of"] is None and row["request"] == first["request"]
        assert (row["sha256"], row["duration_s"], row["bytes"]) == (first["sha256"], first["duration_s"], first["bytes"])
        assert files[key].read_bytes() == files[first["key"]].read_bytes()
        assert files[key].stat().st_ino == files[first["key"]].stat().st_ino  # a hard link: no second copy on disk
    sounds = {key: decoded(files[key]) for key in ("r000", "r010", "r090", "r001")}
    assert sounds["r000"] == sounds["r010"] == sounds["r090"] != sounds["r001"] and sounds["r001"]

    status = json.loads(cli("status", out, "--json").stdout)
    assert (status["done"], status["copied"], status["requests_saved"]) == (100, 90, 90)
    assert "90 requests saved" in cli("status", out).stdout
    assert cli("export", out).returncode == 0
    exported = {r["id"]: r for r in pq.read_table(out / "results.parquet").to_pylist()}
    assert exported["r042"]["copy_of"] == "r002" and exported["r002"]["copy_of"] is None


def test_rows_added_identical_to_done_ones_send_nothing(serve, tmp_path):
    server = serve()
    out = tmp_path / "out"
    rows = [{"id": f"a{i}", "text": f"First batch line {i}."} for i in range(6)]
    manifest = write_csv(tmp_path / "m.csv", rows)
    assert cli(*run_args(manifest, out, server)).returncode == 0
    assert server.stats()["requests"] == 6
    # Four new ids say what done rows say; one says something new; one asks for another voice.
    added = [{"id": f"b{i}", "text": f"First batch line {i}."} for i in range(4)]
    added += [{"id": "c0", "text": "Something new."}, {"id": "c1", "text": "First batch line 0.", "voice": "nova"}]
    write_csv(manifest, rows + added)
    plan = json.loads(cli(*run_args(manifest, out, server, "--dry-run", "--json")).stdout)["total"]
    assert (plan["pending"], plan["requests"], plan["copies"]) == (6, 2, 4)
    again = cli(*run_args(manifest, out, server))
    assert again.returncode == 0, again.stderr
    assert server.stats()["requests"] == 8 and summary(again.stderr)["copied"] == 4
    ledger = ledger_rows(out / "ledger.sqlite")
    assert [ledger[f"b{i}"]["copy_of"] for i in range(4)] == [f"a{i}" for i in range(4)]
    assert ledger["c0"]["copy_of"] is None and ledger["c1"]["copy_of"] is None and ledger["c1"]["speaker"] == "nova"
    # The original's file removed: its copies keep theirs (a link is a file of its own).
    (out / "a0.mp3").unlink()
    assert (out / "b0.mp3").stat().st_size == ledger["b0"]["bytes"]


def test_a_failed_original_fails_its_copies_and_is_retried_once_for_all(serve, tmp_path):
    server = serve()
    out = tmp_path / "out"
    bad = "This line is [[bad]] on purpose."
    manifest = write_csv(tmp_path / "m.csv", [{"id": "ok", "text": "A fine line."},
                                              *({"id": f"bad{i}", "text": bad} for i in range(4))])
    result = cli(*run_args(manifest, out, server))
    assert result.returncode == 1 and server.requests_for(bad) == 1
    ledger = ledger_rows(out / "ledger.sqlite")
    assert ledger["bad0"]["copy_of"] is None and ledger["bad0"]["error"] == "Invalid request parameters"
    for i in (1, 2, 3):
        row = ledger[f"bad{i}"]
        assert (row["status"], row["copy_of"], row["http_status"], row["retryable"]) == ("failed", "bad0", 400, 0)
        assert row["error"] == "the same request as row 2 (bad0), which failed: Invalid request parameters"
    status = json.loads(cli("status", out, "--json").stdout)
    assert status["failed"] == 4 and status["copied"] == 0

    assert cli(*run_args(manifest, out, server)).returncode == 1 and server.requests_for(bad) == 1  # failed for good
    retried = cli(*run_args(manifest, out, server, "--retry-failed"))
    assert retried.returncode == 1 and server.requests_for(bad) == 2  # once for the four of them
    assert summary(retried.stderr)["failed"] == 4


def test_long_rows_share_whole_files_and_copies_are_free_under_a_budget(serve, tmp_path):
    server = serve()
    out = tmp_path / "out"
    chapter = " ".join(f"Sentence {i} of a chapter that is narrated in several requests." for i in range(12))
    manifest = write_csv(tmp_path / "m.csv", [{"id": f"ch{i}", "text": chapter} for i in range(3)])
    # The budget allows one chapter's characters: the other two cost nothing, so the run takes all three.
    result = cli(*run_args(manifest, out, server, "--chunk-chars", "200", "--max-chars", str(len(chapter) + 10)))
    assert result.returncode == 0, result.stderr
    said = summary(result.stderr)
    chunks = said["requests"]
    assert chunks >= 4 and server.stats()["requests"] == chunks and said["requests_saved"] == 2 * chunks
    ledger = ledger_rows(out / "ledger.sqlite")
    assert [ledger[k]["copy_of"] for k in ("ch0", "ch1", "ch2")] == [None, "ch0", "ch0"]
    assert ledger["ch2"]["chunks"] == ledger["ch0"]["chunks"] == chunks
    assert decoded(out / "ch2.mp3") == decoded(out / "ch0.mp3")


def test_rows_whose_files_differ_by_their_tags_are_not_copies_and_copies_get_captions(serve, tmp_path):
    server = serve()
    out = tmp_path / "out"
    text = "The same words, in files titled apart."
    manifest = write_csv(tmp_path / "m.csv", [{"id": "t1", "text": text, "title": "One"},
                                              {"id": "t2", "text": text, "title": "Two"},
                                              {"id": "t3", "text": text, "title": "One"}])
    assert cli(*run_args(manifest, out, server, "--captions", "srt")).returncode == 0
    assert server.requests_for(text) == 2
    ledger = ledger_rows(out / "ledger.sqlite")
    assert (ledger["t2"]["copy_of"], ledger["t3"]["copy_of"]) == (None, "t1")
    assert (out / "t3.srt").read_text() == (out / "t1.srt").read_text() and text in (out / "t3.srt").read_text()


def test_in_an_object_store_the_store_makes_the_copy(tmp_path):
    store = tmp_path / "bucket"
    (store / "v1").mkdir(parents=True)
    (store / "v1" / "a.mp3").write_bytes(b"ID3 audio bytes")
    folder = ObjectStoreOutput(f"file://{store}/v1", tmp_path / "ledger.sqlite")
    published = folder.copy("a.mp3", "b.mp3", 15, "f" * 64)
    assert (published.path, published.bytes, published.sha256) == (Path("b.mp3"), 15, "f" * 64)
    assert (store / "v1" / "b.mp3").read_bytes() == b"ID3 audio bytes"
    assert not (store / "v1" / "b.mp3").samefile(store / "v1" / "a.mp3")  # objects take no links: a copy
    with pytest.raises(StorageError, match="copy to .*gone.mp3 failed"):
        folder.copy("missing.mp3", "gone.mp3", 1, "0" * 64)


def test_where_the_file_system_takes_no_link_the_bytes_are_copied(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.mp3").write_bytes(b"ID3 the narrated bytes")
    folder = OutputFolder(out, out / "ledger.sqlite")
    linked = folder.copy("a.mp3", "b.mp3", 22, "e" * 64)
    assert linked.path == out / "b.mp3" and (out / "b.mp3").samefile(out / "a.mp3")

    def cross_device(source: object, target: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    copied = folder.copy("a.mp3", "deeper/c.mp3", 22, "e" * 64)
    assert copied.path == out / "deeper" / "c.mp3" and copied.bytes == 22
    assert (out / "deeper" / "c.mp3").read_bytes() == b"ID3 the narrated bytes"
    assert not (out / "deeper" / "c.mp3").samefile(out / "a.mp3")
    assert not list(folder.partial_dir.iterdir())  # nothing left half made
    with pytest.raises(FileNotFoundError):
        folder.copy("gone.mp3", "d.mp3", 1, "0" * 64)
    assert not (out / "d.mp3").exists() and not list(folder.partial_dir.iterdir())


@given(st.lists(st.tuples(st.integers(0, 5), st.booleans()), max_size=40), st.integers(1, 4))
def test_firsts_answers_as_a_dictionary_would_through_its_filter_and_its_file(takes, batch):
    """Each row is told the first row taken on with its request, however many records were written
    to the file meanwhile (`batch` records at a time) and whichever rows the budget dropped; the
    feed's second pass, asking again in order, is told the same."""
    rows = []
    for number, (text, _) in enumerate(takes, start=1):
        row = make_row(number, {"id": f"r{number}", "text": f"text {text}"}, Defaults(model="m", voice="v"))
        assert not isinstance(row, list)
        rows.append(row)
    firsts, first_of = Firsts(batch=batch), {}
    try:
        answers = []
        for row, (text, dropped) in zip(rows, takes, strict=True):
            expected = first_of.get(text)
            answers.append(firsts.take(row))
            assert answers[-1] == expected
            if expected is None:
                first_of[text] = row.key
                if dropped:
                    firsts.drop(row)
                    del first_of[text]
                    answers[-1] = "dropped"
        for row, answer in zip(rows, answers, strict=True):
            if answer != "dropped":
                assert firsts.take(row) == answer
    finally:
        firsts.close()
