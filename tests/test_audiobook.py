"""`batchtts audiobook`: a narrated chapters manifest made into one .m4b or .mp3 with chapter marks,
tags and a cover, read back with PyAV and mutagen."""

from __future__ import annotations

import sqlite3
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from conftest import cli, ledger_rows, write_csv
from mutagen.id3 import ID3, CTOCFlags
from mutagen.mp3 import MP3
from mutagen.mp4 import MP4, MP4Cover

TOLERANCE = 0.05  # seconds
LOCAL = ("--model", "local/espeak-ng", "--voice", "alloy")
CHAPTERS = [  # in the manifest out of book order: the book follows `track`
    {"id": "ch-2", "title": "Two", "track": "2", "text": "The second chapter. It is longer than the first, by a few words."},
    {"id": "ch-1", "title": "One", "track": "1", "text": "Chapter one begins the book."},
    {"id": "ch-3", "title": "Three", "track": "3", "text": "And the third chapter ends it."},
]
BOOK = {"artist": "Ada Author", "album": "A Short Book", "cover": "art/cover.png"}


def image(codec: str = "png", width: int = 8, height: int = 6) -> bytes:
    """A small PNG (or, with codec mjpeg, JPEG), encoded by FFmpeg."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, :, 0] = np.arange(width, dtype=np.uint8) * 30
    pixels[:, :, 2] = 200
    encoder = av.CodecContext.create(codec, "w")
    encoder.width, encoder.height = width, height
    encoder.pix_fmt = "rgb24" if codec == "png" else "yuvj420p"
    encoder.time_base = Fraction(1, 25)
    frame = av.VideoFrame.from_ndarray(pixels, format="rgb24").reformat(format=encoder.pix_fmt)
    return b"".join(bytes(p) for p in [*encoder.encode(frame), *encoder.encode(None)])


def narrate(folder: Path, rows: list[dict[str, str]] = CHAPTERS, *flags: str) -> tuple[Path, Path, bytes]:
    """A run of the chapters manifest with a cover; returns the manifest, the output folder and the cover's bytes."""
    cover = image()
    (folder / "art").mkdir(parents=True)
    (folder / "art" / "cover.png").write_bytes(cover)
    manifest = write_csv(folder / "chapters.csv", [{**row, **BOOK} for row in rows])
    out = folder / "out"
    result = cli("run", manifest, "--out", out, *LOCAL, *flags)
    assert result.returncode == 0, result.stderr
    return manifest, out, cover


@pytest.fixture(scope="module")
def narrated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, bytes]:
    """One mp3 run the tests that only read it share."""
    return narrate(tmp_path_factory.mktemp("narrated"))


def decode(path: Path, rate: int | None = None, pcm: dict[str, str] | None = None) -> tuple[np.ndarray, int]:
    """A file's audio as mono float samples, at its own rate or resampled to `rate`, by PyAV."""
    with av.open(str(path), **({"format": "s16le", "options": pcm} if pcm else {})) as container:
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate or stream.rate)
        frames = [f for frame in container.decode(stream) for f in resampler.resample(frame)]
        frames += resampler.resample(None)
        return np.concatenate([f.to_ndarray().reshape(-1) for f in frames]), rate or stream.rate


def seconds(path: Path, pcm: dict[str, str] | None = None) -> float:
    samples, rate = decode(path, pcm=pcm)
    return len(samples) / rate


def copy_run(out: Path, to: Path) -> Path:
    """A copy of a run's folder (its ledger and audio) to change without changing the run."""
    to.mkdir()
    for f in out.iterdir():
        if f.is_file():
            (to / f.name).write_bytes(f.read_bytes())
    return to


def chapter_files(out: Path, ids: list[str], suffix: str) -> list[Path]:
    return [out / f"{ident}{suffix}" for ident in ids]


def cumulative(durations: list[float]) -> list[float]:
    return [sum(durations[:i]) for i in range(len(durations) + 1)]


def marks(path: Path) -> list[tuple[str, float, float]]:
    """The chapter marks as PyAV reads them: title, start and end in seconds."""
    with av.open(str(path)) as container:
        return [(c["metadata"]["title"], float(c["start"] * c["time_base"]), float(c["end"] * c["time_base"]))
                for c in container.chapters()]


def assert_marks_follow(book: Path, titles: list[str], chapters: list[Path], pcm: dict[str, str] | None = None) -> None:
    """One mark per chapter file, each starting and ending where the decoded files before it add up to,
    and the book as long as its chapters."""
    starts = cumulative([seconds(c, pcm) for c in chapters])
    found = marks(book)
    assert [t for t, _, _ in found] == titles
    for (_, start, end), expected, following in zip(found, starts, starts[1:], strict=False):
        assert start == pytest.approx(expected, abs=TOLERANCE) and end == pytest.approx(following, abs=TOLERANCE)
    assert seconds(book) == pytest.approx(starts[-1], abs=TOLERANCE)


def assert_speech_at_marks(book: Path, chapters: list[Path]) -> None:
    """Each chapter's audio is found in the decoded book where its mark says, within 5 ms: the
    encoder's priming samples are not heard, so no chapter is an encoder frame (20-50 ms) late."""
    audio, rate = decode(book)
    lead = rate // 10  # how far either side of the mark the chapter's opening is looked for
    for (_, start, _), chapter in zip(marks(book), chapters, strict=True):
        opening = decode(chapter, rate)[0][: rate // 2]
        at = int(round(start * rate))
        window = np.concatenate([np.zeros(lead, np.float32), audio])[at: at + 2 * lead + len(opening)]
        lag = int(np.argmax(np.correlate(window, opening, "valid"))) - lead
        assert abs(lag) <= rate // 200, f"{chapter.name} is heard {lag / rate * 1000:.1f} ms from its mark"


def test_an_m4b_has_a_mark_at_each_chapter_the_tags_and_the_cover(narrated, tmp_path):
    manifest, out, cover = narrated
    book = tmp_path / "Book.m4b"
    result = cli("audiobook", out, "--to", book)
    assert result.returncode == 0, result.stderr
    assert f"wrote {book}: 3 chapters" in result.stdout
    files = chapter_files(out, ["ch-1", "ch-2", "ch-3"], ".mp3")
    assert_marks_follow(book, ["One", "Two", "Three"], files)
    assert_speech_at_marks(book, files)

    tags = MP4(book)
    assert tags.info.length == pytest.approx(seconds(book), abs=TOLERANCE)  # the length a player shows
    assert tags["\xa9nam"] == ["A Short Book"] and tags["\xa9alb"] == ["A Short Book"]
    assert tags["\xa9ART"] == ["Ada Author"] and tags["stik"] == [2]
    assert bytes(tags["covr"][0]) == cover and tags["covr"][0].imageformat == MP4Cover.FORMAT_PNG
    assert [c.title for c in tags.chapters] == ["One", "Two", "Three"]
    with av.open(str(book)) as container:
        assert container.metadata["major_brand"] == "M4B "
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Book.m4b"]  # nothing left aside


def test_an_mp3_book_has_id3_chapters_and_a_table_of_contents(narrated, tmp_path):
    manifest, out, cover = narrated
    book = tmp_path / "Book.mp3"
    result = cli("audiobook", out, "--to", book)
    assert result.returncode == 0, result.stderr
    tags = ID3(book)
    toc = tags.getall("CTOC")
    assert len(toc) == 1 and toc[0].flags & CTOCFlags.TOP_LEVEL and toc[0].flags & CTOCFlags.ORDERED
    chaps = {c.element_id: c for c in tags.getall("CHAP")}
    listed = [chaps[i] for i in toc[0].child_element_ids]
    assert len(chaps) == len(listed) == 3
    assert [str(c.sub_frames["TIT2"]) for c in listed] == ["One", "Two", "Three"]
    files = chapter_files(out, ["ch-1", "ch-2", "ch-3"], ".mp3")
    starts = cumulative([seconds(c) for c in files])
    assert_speech_at_marks(book, files)  # the marks as PyAV reads them from the CHAP frames
    for chap, start, end in zip(listed, starts, starts[1:], strict=False):
        assert chap.start_time / 1000 == pytest.approx(start, abs=TOLERANCE)
        assert chap.end_time / 1000 == pytest.approx(end, abs=TOLERANCE)
    assert str(tags["TIT2"]) == "A Short Book" and str(tags["TALB"]) == "A Short Book"
    assert str(tags["TPE1"]) == "Ada Author"
    cover_frame = tags.getall("APIC")[0]
    assert cover_frame.data == cover and cover_frame.mime == "image/png"
    assert seconds(book) == pytest.approx(starts[-1], abs=TOLERANCE)
    # The length a player shows, from the Xing header: mutagen counts the encoder's delay and padding
    # (some 50 ms) in, as it reads them only from a tag LAME itself wrote, not FFmpeg's.
    assert MP3(book).info.length == pytest.approx(starts[-1], abs=0.1)


def test_split_hours_makes_parts_of_whole_chapters_each_with_its_own_marks(narrated, tmp_path):
    manifest, out, cover = narrated
    durations = [seconds(c) for c in chapter_files(out, ["ch-1", "ch-2", "ch-3"], ".mp3")]
    assert durations[2] > 0.5
    hours = (durations[0] + durations[1] + 0.01) / 3600  # the first two chapters fit, the third does not
    result = cli("audiobook", out, "--to", tmp_path / "Book.m4b", "--split-hours", f"{hours:.9f}")
    assert result.returncode == 0, result.stderr
    first, second = tmp_path / "Book - Part 1.m4b", tmp_path / "Book - Part 2.m4b"
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name, second.name]
    assert_marks_follow(first, ["One", "Two"], chapter_files(out, ["ch-1", "ch-2"], ".mp3"))
    assert_marks_follow(second, ["Three"], chapter_files(out, ["ch-3"], ".mp3"))
    assert MP4(second)["\xa9nam"] == ["A Short Book - Part 2"] and MP4(second)["trkn"] == [(2, 2)]

    # A book that fits in one part is the one file asked for.
    whole = cli("audiobook", out, "--to", tmp_path / "whole" / "Book.m4b", "--split-hours", "10")
    assert whole.returncode == 0 and [p.name for p in (tmp_path / "whole").iterdir()] == ["Book.m4b"]

    # A chapter longer than the limit is a part of its own.
    single = cli("audiobook", out, "--to", tmp_path / "each" / "Book.m4b", "--split-hours", "0.00001")
    assert single.returncode == 0, single.stderr
    parts = sorted((tmp_path / "each").iterdir())
    assert [[t for t, _, _ in marks(p)] for p in parts] == [["One"], ["Two"], ["Three"]]


def test_parts_follow_the_decoded_lengths_where_the_ledger_measured_otherwise(narrated, tmp_path):
    """Parts are planned by the lengths in the ledger, but a file longer than the ledger says (as when
    a header only estimates its length) does not put a part over the limit."""
    manifest, out, cover = narrated
    copy = copy_run(out, tmp_path / "out")
    with sqlite3.connect(copy / "ledger.sqlite") as db:
        db.execute("UPDATE rows SET duration_s = 0.001 WHERE key IN ('ch-2', 'ch-3')")
    db.close()
    durations = [seconds(c) for c in chapter_files(out, ["ch-1", "ch-2", "ch-3"], ".mp3")]
    hours = (durations[0] + durations[1] + 0.01) / 3600  # by the ledger, all three would fit
    result = cli("audiobook", copy, "--to", tmp_path / "Book.m4b", "--split-hours", f"{hours:.9f}")
    assert result.returncode == 0, result.stderr
    first, second = tmp_path / "Book - Part 1.m4b", tmp_path / "Book - Part 2.m4b"
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name, second.name, "out"]  # nothing left aside
    assert_marks_follow(first, ["One", "Two"], chapter_files(out, ["ch-1", "ch-2"], ".mp3"))
    assert_marks_follow(second, ["Three"], chapter_files(out, ["ch-3"], ".mp3"))
    assert MP4(first)["trkn"] == [(1, 2)] and MP4(second)["\xa9nam"] == ["A Short Book - Part 2"]


@pytest.mark.parametrize("fmt", ["wav", "pcm"])
def test_wav_and_pcm_runs_assemble(tmp_path, fmt):
    manifest, out, cover = narrate(tmp_path, CHAPTERS, "--format", fmt)
    book = tmp_path / "Book.m4b"
    result = cli("audiobook", out, "--to", book)
    assert result.returncode == 0, result.stderr
    pcm = None
    if fmt == "pcm":  # raw samples say nothing of themselves: the ledger says their rate and channels
        entry = ledger_rows(out / "ledger.sqlite")["ch-1"]
        pcm = {"sample_rate": str(entry["sample_rate"]), "ch_layout": "mono" if entry["channels"] == 1 else "stereo"}
    assert_marks_follow(book, ["One", "Two", "Three"], chapter_files(out, ["ch-1", "ch-2", "ch-3"], f".{fmt}"), pcm)
    assert bytes(MP4(book)["covr"][0]) == cover


def test_chapters_without_audio_are_refused_unless_allowed(serve, tmp_path):
    server = serve()
    rows = [dict(CHAPTERS[1]), {**CHAPTERS[0], "text": "This chapter is [[bad]] on purpose.",
                                "model": "openai/gpt-4o-mini-tts"}, dict(CHAPTERS[2])]
    manifest, out, _ = narrate(tmp_path, rows[:1] + rows[2:])
    write_csv(manifest, [{**row, **BOOK} for row in rows])  # ch-2 added to the manifest ...
    failed = cli("run", manifest, "--out", out, *LOCAL, "--base-url", server.url)
    assert failed.returncode == 1  # ... and refused by the provider for good
    write_csv(manifest, [{**row, **BOOK} for row in rows] + [{"id": "ch-4", "title": "Four", "track": "4",
                                                               "text": "Not narrated yet."}])
    book = tmp_path / "Book.m4b"
    book.write_bytes(b"the book as it was")

    refused = cli("audiobook", out, "--to", book)
    assert refused.returncode == 2
    assert "2 of 4 chapters have no audio" in refused.stderr
    assert "row 2 (id 'ch-2'): failed" in refused.stderr and "row 4 (id 'ch-4'): pending" in refused.stderr
    assert "--allow-missing" in refused.stderr and "Traceback" not in refused.stderr
    assert book.read_bytes() == b"the book as it was"

    allowed = cli("audiobook", out, "--to", book, "--allow-missing")
    assert allowed.returncode == 0, allowed.stderr
    assert "left out 2 chapters with no audio" in allowed.stdout
    assert_marks_follow(book, ["One", "Three"], chapter_files(out, ["ch-1", "ch-3"], ".mp3"))


def test_unreadable_audio_or_cover_is_refused_and_a_jpeg_cover_is_taken(narrated, tmp_path):
    manifest, out, cover = narrated
    copy = copy_run(out, tmp_path / "out")
    damaged = copy / "ch-3.mp3"
    damaged.write_bytes(bytes(damaged.stat().st_size))  # as long as it was, so the ledger still counts it done
    result = cli("audiobook", copy, "--to", tmp_path / "Book.m4b")
    assert result.returncode == 2 and "row 3 (id 'ch-3'): cannot decode" in result.stderr
    assert not (tmp_path / "Book.m4b").exists() and not list(tmp_path.glob(".audiobook-*"))

    (tmp_path / "cover.txt").write_text("not an image")
    retagged = write_csv(tmp_path / "chapters.csv", [{**row, **BOOK, "cover": "cover.txt"} for row in CHAPTERS])
    result = cli("audiobook", out, "--to", tmp_path / "Book.m4b", "--manifest", retagged)
    assert result.returncode == 2 and "cover.txt: not a JPEG or PNG image" in result.stderr

    jpeg = image("mjpeg")
    (tmp_path / "cover.jpg").write_bytes(jpeg)
    write_csv(retagged, [{**row, **BOOK, "cover": "cover.jpg"} for row in CHAPTERS])
    assert cli("audiobook", out, "--to", tmp_path / "Book.m4b", "--manifest", retagged).returncode == 0
    covers = MP4(tmp_path / "Book.m4b")["covr"]
    assert [bytes(c) for c in covers] == [jpeg] and covers[0].imageformat == MP4Cover.FORMAT_JPEG

    wrong = cli("audiobook", out, "--to", tmp_path / "Book.ogg")
    assert wrong.returncode == 2 and ".m4b" in wrong.stderr


def test_mastered_files_are_the_chapters_when_the_run_mastered_them(tmp_path):
    manifest, out, cover = narrate(tmp_path, CHAPTERS, "--master", "acx")
    mastered = chapter_files(out / "mastered", ["ch-1", "ch-2", "ch-3"], ".mp3")
    assert seconds(mastered[0]) > seconds(out / "ch-1.mp3") + 0.5  # room tone: the two differ in length
    result = cli("audiobook", out, "--to", tmp_path / "Book.m4b")
    assert result.returncode == 0, result.stderr
    assert_marks_follow(tmp_path / "Book.m4b", ["One", "Two", "Three"], mastered)
    assert_speech_at_marks(tmp_path / "Book.m4b", mastered)
