"""Captions beside each row's audio: SRT or WebVTT, a cue a sentence, timed from the audio as stitched."""

from __future__ import annotations

import re

import pytest
from conftest import cli, write_csv
from hypothesis import given
from hypothesis import strategies as st
from test_voices import decode, silences

from batchtts.captions import cues, render

MODEL = "openai/gpt-4o-mini-tts"
# Four paragraphs of three sentences; under --chunk-chars 120 each paragraph is one chunk.
PARAGRAPHS = [
    "The fog came in at dusk. Mr. Hale lit the lamp at 6.30 p.m. sharp. Nobody saw the ship.",
    "At midnight the bell rang twice! Was it the reef, or the wind? Neither of them could say.",
    "They waited by the window. The beam swept the water again and again. Nothing moved out there.",
    "Dawn was grey and cold. The ship was gone. Only the gulls were left on the rocks below.",
]
SENTENCES = 12
_TIME = r"(\d\d):(\d\d):(\d\d)[,.](\d\d\d)"
_CUE = re.compile(rf"^{_TIME} --> {_TIME}\n(.+)$", re.M)


def seconds(h: str, m: str, s: str, ms: str) -> float:
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


def parse(text: str, fmt: str) -> list[tuple[float, float, str]]:
    """A caption file's cues as (start, end, text): SRT's numbered blocks or WebVTT's, strictly."""
    blocks = text.split("\n\n")
    assert blocks[-1] == "", "a caption file ends with a blank line"
    if fmt == "vtt":
        assert blocks.pop(0) == "WEBVTT"
    found = []
    for number, block in enumerate(blocks[:-1], 1):
        if fmt == "srt":
            index, _, block = block.partition("\n")
            assert index == str(number)
        match = _CUE.fullmatch(block)
        assert match is not None, block
        found.append((seconds(*match.groups()[:4]), seconds(*match.groups()[4:8]), match.group(9)))
    return found


def well_formed(found: list[tuple[float, float, str]], duration: float) -> None:
    assert all(start < end for start, end, _ in found)
    assert all(a[1] <= b[0] for a, b in zip(found, found[1:], strict=False)), "cues overlap or are out of order"
    assert found[0][0] >= 0 and abs(found[-1][1] - duration) <= 0.05


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_captions_of_a_long_row_follow_its_chunks_and_end_with_the_file(serve, tmp_path, fmt):
    server = serve()
    text = "\n\n".join(PARAGRAPHS).replace("Hale", "Nguyen")
    write_csv(tmp_path / "m.csv", [{"id": "ch01", "text": text}])
    (tmp_path / "lexicon.csv").write_text("pattern,replacement\nNguyen,Win\n", encoding="utf-8")
    result = cli("run", tmp_path / "m.csv", "--out", tmp_path / "out", "--model", MODEL, "--voice", "alloy",
                 "--format", "wav", "--chunk-chars", "120", "--base-url", server.url, "--captions", fmt,
                 "--lexicon", tmp_path / "lexicon.csv")
    assert result.returncode == 0, result.stderr
    assert server.stats()["requests"] == 4
    found = parse((tmp_path / "out" / f"ch01.{fmt}").read_text(encoding="utf-8"), fmt)
    samples, rate = decode(tmp_path / "out" / "ch01.wav")
    assert len(found) == SENTENCES
    well_formed(found, len(samples) / rate)
    assert found[1][2] == "Mr. Nguyen lit the lamp at 6.30 p.m. sharp."  # the words as written, not as said
    # The tone engine's audio has no silence of its own: each chunk starts where a silence ends.
    onsets = [0.0] + [start + length for start, length in silences(samples, rate)]
    firsts = [cue[0] for cue in found if any(p.startswith(cue[2]) for p in PARAGRAPHS + [text])]
    assert len(onsets) == 4 and len(firsts) == 4
    assert all(abs(a - b) <= 0.002 for a, b in zip(firsts, onsets, strict=True)), (firsts, onsets)


def test_a_job_file_asks_for_captions_and_mp3_rows_short_and_long_get_them(serve, tmp_path):
    server = serve()
    write_csv(tmp_path / "m.csv", [{"id": "long", "text": "\n\n".join(PARAGRAPHS), "output": "book/long"},
                                   {"id": "short", "text": "One sentence. And <b>another</b> & more.", "output": "book/short"}])
    (tmp_path / "job.toml").write_text(f'manifest = "m.csv"\nout = "out"\ncaptions = "vtt"\nchunk_chars = 120\n'
                                       f'[defaults]\nmodel = "{MODEL}"\nvoice = "alloy"\n', encoding="utf-8")
    result = cli("run", tmp_path / "job.toml", "--base-url", server.url)
    assert result.returncode == 0, result.stderr
    book = tmp_path / "out" / "book"
    assert sorted(p.name for p in book.iterdir()) == ["long.mp3", "long.vtt", "short.mp3", "short.vtt"]
    for name, count in (("long", SENTENCES), ("short", 2)):
        found = parse((book / f"{name}.vtt").read_text(encoding="utf-8"), "vtt")
        samples, rate = decode(book / f"{name}.mp3")
        assert len(found) == count
        well_formed(found, len(samples) / rate)
    short = parse((book / "short.vtt").read_text(encoding="utf-8"), "vtt")
    assert short[0][0] == 0 and short[1][2] == "And &lt;b&gt;another&lt;/b&gt; &amp; more."


@given(st.lists(st.tuples(st.text(alphabet="ab .!?\n", min_size=1, max_size=80),
                          st.floats(0.01, 30), st.floats(0, 3)), min_size=1, max_size=6))
def test_cues_never_overlap_and_the_last_ends_with_the_file(pieces):
    spans, at = [], 0.0
    for words, length, gap in pieces:
        spans.append((words, at + gap, at + gap + length))
        at = spans[-1][2]
    found = cues(spans, at)
    assert all(a.end <= b.start for a, b in zip(found, found[1:], strict=False))
    assert all(cue.start <= cue.end for cue in found)
    if found:
        assert found[-1].end == at
        srt = parse(render(found, "srt"), "srt")
        assert len(srt) == len(found) and all(a[1] <= b[0] for a, b in zip(srt, srt[1:], strict=False))
