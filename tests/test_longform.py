"""Long rows: split at natural breaks, chunks narrated concurrently and resumably, stitched into one file."""

from __future__ import annotations

import csv
import json
import re
import sqlite3
import sys
import wave
from concurrent.futures import ThreadPoolExecutor

from conftest import FAST_RETRY, cli, ledger_rows, write_csv
from test_engine import mpeg_frames

from batchtts.chunking import DEFAULT_LIMIT, KNOWN_LIMITS, limit_for, sentences, split_text
from batchtts.config import Stitching
from batchtts.server import listed_models
from batchtts.tone import RATE as TONE_RATE

MODEL = "openai/gpt-4o-mini-tts"
LIMIT = limit_for(MODEL)
PARAGRAPH_GAP = Stitching().paragraph_gap
TRICKY = ('Mr. Smith met Dr. Jones at 3.14 p.m. in the U.S. capital, e.g. near the Mall... "Is it far?" she asked. '
          '(He nodded; the rain, steady and cold, kept falling.) Then they left! ')


def chapter(paragraphs: int, repeat: int = 21) -> str:
    """Paragraphs of about 2,500 characters: two never fit in one request of LIMIT characters."""
    return "\n\n".join(f"Part {i}. " + TRICKY * repeat for i in range(paragraphs))


def chunk_rows(out):
    db = sqlite3.connect(out / "ledger.sqlite")
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute("SELECT * FROM chunks ORDER BY chunk_index")]
    finally:
        db.close()


def test_a_60000_character_chapter_splits_within_the_limit_and_rejoins():
    text = chapter(8) + "\n\n" + TRICKY * 300 + "\n\n" + ("x" * 30 + ", ") * 400  # one huge paragraph, long clauses
    assert len(text) > 60000
    chunks = split_text(text, LIMIT)
    assert all(0 < len(c.text) <= LIMIT for c in chunks)
    assert re.sub(r"\s+", "", "".join(c.text for c in chunks)) == re.sub(r"\s+", "", text)
    for c in chunks:
        end = c.start + len(c.text)
        assert text[c.start:end] == c.text
        assert end == len(text) or not (text[end - 1].isalnum() and text[end].isalnum()), "split inside a word"
        assert not re.search(r"\b(Mr|Dr|U\.S|e\.g|p\.m|3)\.$", c.text), c.text[-20:]
    assert [c.paragraph_before for c in chunks[1:8]] == [True] * 7
    assert split_text("  short  ", LIMIT)[0].text == "short"


def test_texts_split_in_several_threads_at_once_split_as_they_do_alone():
    """Captions are written and mastered files' captions moved on threads of their own while rows
    are split: no split may see another thread's text (a sentence looked up in the wrong text is
    not found, and its words would be left out of the requests and the captions)."""
    texts = [chapter(2, repeat=5 + i) + f" Ending {i}." for i in range(6)]  # paragraphs split at sentences
    alone = [(split_text(t, 500), sentences(t)) for t in texts]
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns as often as they can
    try:
        with ThreadPoolExecutor(6) as pool:
            together = list(pool.map(lambda t: (split_text(t, 500), sentences(t)), texts * 3))
    finally:
        sys.setswitchinterval(previous)
    assert together == alone * 3


def test_limits_come_from_flags_the_job_and_the_model_family():
    assert limit_for("openai/gpt-4o-mini-tts") == KNOWN_LIMITS["openai/"]
    assert limit_for("elevenlabs/eleven-turbo-v2") == KNOWN_LIMITS["elevenlabs/"]
    assert limit_for("someone/new-model") == DEFAULT_LIMIT
    assert limit_for("openai/gpt-4o-mini-tts", {"openai/gpt-4o-mini-tts": 2000}) == 2000
    assert limit_for("openai/gpt-4o-mini-tts", {"openai/": 3000}, chunk_chars=1000) == 1000


def test_the_client_splits_within_every_limit_the_server_lists():
    """The server's limits are its own fixture, after the provider's: a client table above one of them
    would send requests the provider refuses."""
    listed = {model["id"]: model["context_length"] for model in listed_models()}
    assert listed
    for model_id, limit in listed.items():
        assert limit_for(model_id) <= limit, model_id
    assert limit_for("someone/new-model") <= min(listed.values())  # what the server holds unlisted models to


def test_chunks_are_requested_concurrently_and_stitched_into_one_clean_mp3(serve, tmp_path):
    server = serve("--latency", "0.3")
    # Paragraphs of about 360 characters under a limit of 600: one chunk a paragraph, each a few
    # seconds of audio for the server to encode rather than minutes.
    manifest = write_csv(tmp_path / "m.csv", [{"id": "ch01", "text": chapter(12, repeat=2), "voice": "alloy",
                                               "title": "Chapter One", "artist": "The Narrator", "track": "1"}])
    out = tmp_path / "out"
    result = cli("run", manifest, "--out", out, "--model", MODEL, "--base-url", server.url, "--concurrency", "8",
                      "--chunk-chars", "600")
    assert result.returncode == 0, result.stderr
    stats = server.stats()
    assert stats["requests"] == 12 and stats["max_in_flight"] >= 4

    data = (out / "ch01.mp3").read_bytes()
    assert data[:3] == b"ID3" and data.count(b"ID3") == 1 and b"TIT2" in data[:200] and b"Chapter One" in data[:400]
    assert b"Xing" not in data and b"Info" not in data
    frames, rate, channels = mpeg_frames(data)
    chunks = chunk_rows(out)
    assert len(chunks) == 12 and all(c["status"] == "done" for c in chunks)
    chunk_frames = sum(mpeg_frames((out / c["path"]).read_bytes())[0] for c in chunks)
    silence = frames - chunk_frames
    gap_frames = PARAGRAPH_GAP * rate / 576  # 11 paragraph seams at the default gap
    assert 11 * gap_frames <= silence <= 11 * (gap_frames + 4)
    entry = ledger_rows(out / "ledger.sqlite")["ch01"]
    assert entry["chunks"] == 12 and entry["duration_s"] == round(frames * 576 / rate, 3)


def test_the_stitched_wav_is_the_chunks_plus_the_gaps(serve, tmp_path):
    server = serve()
    job = tmp_path / "job.toml"
    job.write_text(f'manifest = "m.csv"\nout = "out"\n[defaults]\nmodel = "{MODEL}"\nvoice = "nova"\nformat = "wav"\n'
                   '[stitching]\nsentence_gap = 0.1\nparagraph_gap = 0.5\n')
    write_csv(tmp_path / "m.csv", [{"id": "ch", "text": chapter(5), "title": "A Title"}])
    result = cli("run", job, "--base-url", server.url)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    chunk_bytes = sum((out / c["path"]).stat().st_size for c in chunk_rows(out))
    with wave.open(str(out / "ch.wav")) as w:
        assert (w.getframerate(), w.getnchannels()) == (TONE_RATE, 1)
        assert w.getnframes() * 2 == chunk_bytes + 4 * int(0.5 * TONE_RATE) * 2
    assert (out / "ch.wav").read_bytes().endswith(b"LIST\x14\x00\x00\x00INFOINAM\x08\x00\x00\x00A Title\x00")


def test_a_failing_chunk_fails_the_row_and_a_rerun_asks_only_for_it(serve, tmp_path):
    server = serve()
    text = chapter(6).replace("Part 3.", "Part 3 [[bad]].")
    manifest = write_csv(tmp_path / "m.csv", [{"id": "ch", "text": text, "voice": "alloy"}])
    out = tmp_path / "out"
    first = cli("run", manifest, "--out", out, "--model", MODEL, "--base-url", server.url, "--format", "pcm")
    assert first.returncode == 1
    entry = ledger_rows(out / "ledger.sqlite")["ch"]
    assert entry["status"] == "failed" and entry["error"].startswith("chunk 4 of 6: ")
    assert not (out / "ch.pcm").exists()
    assert server.stats()["requests"] == 6

    server.faults(reject_marker=None)
    second = cli("run", manifest, "--out", out, "--model", MODEL, "--base-url", server.url, "--format", "pcm",
                      "--retry-failed")
    assert second.returncode == 0, second.stderr
    assert server.stats()["requests"] == 7
    assert ledger_rows(out / "ledger.sqlite")["ch"]["status"] == "done"
    assert (out / "ch.pcm").stat().st_size == sum((out / c["path"]).stat().st_size for c in chunk_rows(out)) + \
        5 * int(PARAGRAPH_GAP * TONE_RATE) * 2


def test_a_retried_chunk_is_named_in_the_log(serve, tmp_path):
    server = serve("--fail-first", "1")
    manifest = write_csv(tmp_path / "m.csv", [{"id": "ch", "text": chapter(3), "voice": "alloy"}])
    result = cli("run", manifest, "--out", tmp_path / "out", "--model", MODEL, "--base-url", server.url,
                      "--format", "pcm", *FAST_RETRY)
    assert result.returncode == 0, result.stderr
    retries = [e for e in map(json.loads, result.stderr.splitlines()) if e["event"] == "retry"]
    assert sorted(e["chunk"] for e in retries) == ["1/3", "2/3", "3/3"] and {e["id"] for e in retries} == {"ch"}


def test_chunk_chars_splits_short_rows_too_and_an_edit_reasks_only_changed_chunks(serve, tmp_path):
    server = serve()
    paragraphs = [f"Paragraph {i} has a few words in it." for i in range(6)]
    manifest = write_csv(tmp_path / "m.csv", [{"id": "r", "text": "\n\n".join(paragraphs), "voice": "alloy"}])
    out = tmp_path / "out"
    args = ["run", manifest, "--out", out, "--model", MODEL, "--base-url", server.url, "--chunk-chars", "40"]
    assert cli(*args).returncode == 0
    assert server.stats()["requests"] == 6
    paragraphs[2] = "Paragraph two was rewritten."
    write_csv(manifest, [{"id": "r", "text": "\n\n".join(paragraphs), "voice": "alloy"}])
    assert cli(*args).returncode == 0
    assert server.stats()["requests"] == 7


def test_manifest_from_markdown_book_gives_one_row_per_chapter(tmp_path):
    book = tmp_path / "book.md"
    book.write_text(
        "# The Lighthouse Keeper\n\nA short novel.\n\n"
        "## Chapter 1: Fog\n\nThe fog came in at *dusk*. See [the map](http://x.invalid).\n\n### Aside\n\nMr. Hale wrote.\n\n"
        "## Chapter 2: Bells\n\nThe bell rang.\n\n```\ncode is not read\n```\n\n## Chapter 3: Home\n\nThey went home.\n"
    )
    result = cli("manifest", "from-text", book, "--out", tmp_path / "chapters.csv", key=None)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(open(tmp_path / "chapters.csv", encoding="utf-8")))
    assert [r["title"] for r in rows] == ["Front matter", "Chapter 1: Fog", "Chapter 2: Bells", "Chapter 3: Home"]
    assert [r["track"] for r in rows] == ["0", "1", "2", "3"] and rows[1]["id"] == "chapter-01"
    assert rows[1]["text"].startswith("Chapter 1: Fog.\n\nThe fog came in at dusk. See the map.")
    assert "Aside." in rows[1]["text"] and "code is not read" not in rows[2]["text"]

    text_book = tmp_path / "book.txt"
    text_book.write_text("CHAPTER I\nIt began.\n\nCHAPTER II\nIt went on.\n")
    cli("manifest", "from-text", text_book, "--out", tmp_path / "t.csv", key=None)
    assert [r["title"] for r in csv.DictReader(open(tmp_path / "t.csv"))] == ["CHAPTER I", "CHAPTER II"]
    cli("manifest", "from-text", text_book, "--out", tmp_path / "p.csv", "--chapter-pattern", "^It ", key=None)
    assert len(list(csv.DictReader(open(tmp_path / "p.csv")))) == 3
