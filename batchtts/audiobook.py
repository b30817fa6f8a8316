"""A finished run made into what audiobook listeners play: one .m4b (AAC in MP4) with a chapter mark,
tags and a cover, or one .mp3 with ID3 chapters, from a chapters manifest narrated a file per row.

    batchtts run chapters.csv --out out/book --model openai/gpt-4o-mini-tts --voice fable
    batchtts audiobook out/book --to Book.m4b

Chapters follow the manifest's `track` column (rows without one follow, in manifest order) and are
named by its `title`; the book's title, author and cover come from its `album`, `artist` and `cover`
columns. Every chapter is decoded once, resampled to one rate only when it is in another, and
encoded into the book a chapter at a time, so a book of any length passes through memory a frame at a
time; a chapter mark starts at the sample where its chapter's audio starts in the book, as counted
while it is encoded. The book is written aside and renamed into place: a file under the book's name
is always whole.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from itertools import accumulate
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import av
from mutagen import MutagenError
from mutagen.id3 import APIC, CHAP, CTOC, ID3, TALB, TIT2, TPE1, TRCK, CTOCFlags
from mutagen.mp4 import MP4, MP4Cover

from .audio import DEFAULT_CHANNELS, DEFAULT_RATE
from .config import Job
from .decoding import PcmShape, open_audio, planar_float
from .errors import UsageError
from .results import _LEDGER_FIELDS, _export_records, _umask, open_context

if TYPE_CHECKING:
    from av.audio.frame import AudioFrame
    from av.container.core import Chapter as Mark

SUFFIXES = (".m4b", ".m4a", ".mp3")
DEFAULT_BITRATE_KBPS = 64  # AAC-LC or mp3 at 64 kbps: clear speech, some 30 MB an hour
_NAMED = 5  # rows named in a refusal; the rest are counted
_COVER_KINDS: dict[str, Literal["png", "jpeg"]] = {"png": "png", "mjpeg": "jpeg"}  # by FFmpeg's decoder


@dataclass(frozen=True)
class Chapter:
    row: int
    id: str
    title: str
    path: Path
    pcm: PcmShape | None  # a raw s16le file says neither its rate nor its channels
    seconds: float | None  # how long the ledger measured the file to be, to plan parts by


@dataclass(frozen=True)
class Left:
    """A row that has no chapter file to put in the book."""

    row: int
    id: str
    status: str

    def __str__(self) -> str:
        return f"row {self.row} (id {self.id!r}): {self.status}"


@dataclass(frozen=True)
class BookFile:
    path: Path
    chapters: int
    duration_s: float
    bytes: int


@dataclass(frozen=True)
class AudiobookResult:
    files: list[BookFile]
    left_out: list[Left]  # rows not narrated, skipped with allow_missing


@dataclass(frozen=True)
class _Cover:
    data: bytes
    kind: Literal["png", "jpeg"]


@dataclass(frozen=True)
class _Book:
    title: str
    artist: str | None
    album: str
    cover: _Cover | None


@dataclass(frozen=True)
class _Shape:
    """What every chapter is resampled to before it is encoded."""

    rate: int
    layout: str


@dataclass(frozen=True)
class _Part:
    """A part encoded aside, with each of its chapters' length in samples."""

    chapters: list[Chapter]
    aside: Path
    lengths: list[int]


def make_audiobook(targets: Sequence[str | Path], to: Path, *, manifest: Path | None = None, job: Job | None = None,
                   split_hours: float | None = None, allow_missing: bool = False,
                   bitrate_kbps: int = DEFAULT_BITRATE_KBPS) -> AudiobookResult:
    """Assemble a job's chapter files into `to` (.m4b, .m4a or .mp3), or, with `split_hours`, into
    parts `NAME - Part N` of at most that many hours each (split between chapters; a chapter longer
    than that is a part of its own; a book that fits in one is written as `to`). Rows not narrated
    are refused unless `allow_missing`."""
    suffix = to.suffix.lower()
    if suffix not in SUFFIXES:
        raise UsageError(f"{to}: an audiobook is written as {', '.join(SUFFIXES)}: name the file accordingly")
    if split_hours is not None and split_hours <= 0:
        raise UsageError("--split-hours takes a number of hours above 0")
    chapters, left, book = _read_job(targets, manifest, job, to.stem)
    if left and not allow_missing:
        named = "; ".join(map(str, left[:_NAMED])) + (f"; and {len(left) - _NAMED} more" if len(left) > _NAMED else "")
        raise UsageError(f"{len(left)} of {len(chapters) + len(left)} chapters have no audio: {named}. Run the job "
                         "again to narrate them, or pass --allow-missing to leave them out")
    if not chapters:
        raise UsageError("no chapter has audio yet: run the job first")
    shape = _shape_of(chapters, suffix)
    limit = None if split_hours is None else split_hours * 3600 * shape.rate
    asides: list[Path] = []  # every file written aside, gone once the book is in place or given up
    try:
        # Parts are planned by the lengths the ledger measured, and the chapters counted as they are
        # encoded; only when those counts would split the book otherwise is it encoded again by them.
        plan = _split(chapters, (_estimate(c, shape) for c in chapters), limit)
        parts = [_encode_aside(part, to, suffix, shape, bitrate_kbps, asides) for part in plan]
        exact = _split(chapters, (n for part in parts for n in part.lengths), limit)
        if [len(p) for p in exact] != [len(p) for p in plan]:
            for part in parts:
                part.aside.unlink()
            parts = [_encode_aside(part, to, suffix, shape, bitrate_kbps, asides) for part in exact]
        files: list[BookFile] = []
        for number, part in enumerate(parts, start=1):
            dest = to if len(parts) == 1 else to.with_name(f"{to.stem} - Part {number}{to.suffix}")
            title = book.title if len(parts) == 1 else f"{book.title} - Part {number}"
            tags = _Book(title, book.artist, book.album, book.cover)
            track = (number, len(parts)) if len(parts) > 1 else None
            files.append(_finish(part, dest, suffix, shape, tags, track))
    finally:
        for aside in asides:
            aside.unlink(missing_ok=True)
    return AudiobookResult(files, left)


def _read_job(targets: Sequence[str | Path], manifest: Path | None, job: Job | None, name: str
              ) -> tuple[list[Chapter], list[Left], _Book]:
    """The rows of the job in book order, split into those with a chapter file and those without."""
    ctx = open_context([str(t) for t in targets], manifest, job)
    try:
        # A book is the whole job: rows of shards not named, or with no ledger yet, count as not narrated.
        ctx.ledger.whole_job = True
        if ctx.manifest is None or not ctx.manifest.exists():
            raise UsageError("an audiobook needs the manifest: pass --manifest (the last run's manifest is not there)")
        if not isinstance(ctx.out, Path):
            raise UsageError("the chapter files are in an object store: copy them to a local folder first")
        records = [r for batch in _export_records(ctx, (*_LEDGER_FIELDS, "channels")) for r in batch]
        folder, manifest_folder = ctx.out, ctx.manifest.parent
    finally:
        ctx.ledger.close()
    records.sort(key=_track_order)
    chapters: list[Chapter] = []
    left: list[Left] = []
    for r in records:
        row, ident = int(r["row"]), str(r["id"] if r["id"] is not None else r["row"])
        chosen = _text(r.get("mastered_path")) or _text(r["path"])
        if r["status"] != "done" or chosen is None:
            left.append(Left(row, ident, str(r["status"])))
            continue
        path = folder / chosen
        if not path.is_file():
            left.append(Left(row, ident, f"done, but {path} is not there"))
            continue
        pcm = None
        if path.suffix.lower() == ".pcm":
            pcm = PcmShape(int(r["sample_rate"] or DEFAULT_RATE), int(r["channels"] or DEFAULT_CHANNELS))
        seconds = r.get("length_s") if r.get("mastered_path") else r["duration_s"]
        chapters.append(Chapter(row, ident, _text(r.get("title")) or ident, path, pcm,
                                None if seconds is None else float(seconds)))
    return chapters, left, _book_of(records, manifest_folder, name)


def _text(value: Any) -> str | None:
    """A manifest cell as text; empty cells (None, "", NaN from Parquet) are None."""
    if value is None or value != value:
        return None
    text = str(value).strip()
    return text or None


def _track_order(record: dict[str, Any]) -> tuple[int, float, int]:
    track = _text(record.get("track"))
    if track is None:
        return (1, 0.0, int(record["row"]))
    try:
        number = float(track.split("/", 1)[0])  # "3" or, as in ID3, "3/12"
    except ValueError:
        raise UsageError(f"row {record['row']} (id {record['id']!r}): track {track!r} is not a number") from None
    return (0, number, int(record["row"]))


def _book_of(records: list[dict[str, Any]], manifest_folder: Path, name: str) -> _Book:
    """The book's tags: the first value each column has, down the book; untitled, it is called as
    its file is."""
    def first(column: str) -> str | None:
        return next((v for r in records if (v := _text(r.get(column))) is not None), None)

    album, artist, cover = first("album"), first("artist"), first("cover")
    title = album or name
    return _Book(title, artist, album or title, None if cover is None else _cover(manifest_folder / cover))


def _cover(path: Path) -> _Cover:
    """The image, if FFmpeg reads it as the PNG or JPEG that MP4 and ID3 covers are."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cover {path}: {exc.strerror or exc}") from exc
    try:
        with av.open(str(path)) as container:
            codecs = [stream.codec_context.name for stream in container.streams.video]
    except av.FFmpegError:
        codecs = []
    kind = _COVER_KINDS.get(codecs[0]) if len(codecs) == 1 else None
    if kind is None:
        raise UsageError(f"cover {path}: not a JPEG or PNG image")
    return _Cover(data, kind)


def _unreadable(chapter: Chapter, exc: Exception) -> UsageError:
    return UsageError(f"row {chapter.row} (id {chapter.id!r}): cannot decode {chapter.path}: {exc}")


def _shape_of(chapters: list[Chapter], suffix: str) -> _Shape:
    """The highest rate of any chapter that the encoder takes (no chapter loses detail), in stereo
    only when a chapter is; every file is opened, so one that cannot be read stops the book early."""
    rates, channels = [], []
    for chapter in chapters:
        try:
            with open_audio(chapter.path, chapter.pcm) as container:
                if not container.streams.audio:
                    raise UsageError(f"row {chapter.row} (id {chapter.id!r}): {chapter.path} holds no audio")
                stream = container.streams.audio[0]
                rates.append(stream.rate)
                channels.append(stream.channels)
        except av.FFmpegError as exc:
            raise _unreadable(chapter, exc) from exc
    taken = sorted(av.Codec(_codec(suffix), "w").audio_rates or ())
    rate = next((r for r in taken if r >= max(rates)), taken[-1]) if taken else max(rates)
    return _Shape(rate, "stereo" if max(channels) > 1 else "mono")


def _codec(suffix: str) -> Literal["aac", "libmp3lame"]:
    return "libmp3lame" if suffix == ".mp3" else "aac"


# FFmpeg's "fast" AAC coder takes a third of the CPU of its default (twoloop), and narration it codes
# scores higher in wideband PESQ at 32 and 64 kbps. LAME's quality 5, as the runner's own mp3s: a
# quarter faster than its default, alike for speech.
_ENCODER_OPTIONS = {"aac": {"aac_coder": "fast"}, "libmp3lame": {"compression_level": "5"}}


def _frames(chapter: Chapter, shape: _Shape) -> Iterator[AudioFrame]:
    """The chapter's audio in the book's rate, layout and sample format, a frame at a time, to its
    last sample; frames already in them are handed on as decoded."""
    try:
        with open_audio(chapter.path, chapter.pcm) as container:
            yield from planar_float(container.decode(container.streams.audio[0]), shape.layout, shape.rate)
    except av.FFmpegError as exc:
        raise _unreadable(chapter, exc) from exc


def _estimate(chapter: Chapter, shape: _Shape) -> int:
    """The chapter's length in the book's samples: as the ledger measured it, or, where it has no
    measure, counted from the decoded file."""
    if chapter.seconds is not None:
        return round(chapter.seconds * shape.rate)
    return sum(frame.samples for frame in _frames(chapter, shape))


def _split(chapters: list[Chapter], lengths: Iterable[int], limit: float | None) -> list[list[Chapter]]:
    """Chapters into parts of at most `limit` samples each, a chapter longer than that a part of its
    own; all in one part when there is no limit (then `lengths` is not read)."""
    if limit is None:
        return [chapters]
    parts: list[list[Chapter]] = []
    filled = 0
    for chapter, samples in zip(chapters, lengths, strict=True):
        if not parts or filled + samples > limit:
            parts.append([])
            filled = 0
        parts[-1].append(chapter)
        filled += samples
    return parts


def _encode_aside(chapters: list[Chapter], to: Path, suffix: str, shape: _Shape, bitrate_kbps: int,
                  asides: list[Path]) -> _Part:
    """Encode the chapters into a new file beside `to`, listed in `asides` as soon as it exists."""
    try:
        to.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=to.parent, prefix=".audiobook-", suffix=suffix)
        os.close(handle)
        asides.append(Path(name))
        return _Part(chapters, Path(name), _encode(chapters, Path(name), suffix, shape, bitrate_kbps))
    except (OSError, av.FFmpegError) as exc:
        raise UsageError(f"cannot write {to}: {getattr(exc, 'strerror', None) or exc}") from exc


def _finish(part: _Part, dest: Path, suffix: str, shape: _Shape, book: _Book, track: tuple[int, int] | None
            ) -> BookFile:
    """Tag the part and rename it into place."""
    starts = [0, *accumulate(part.lengths)]
    try:
        if suffix == ".mp3":
            _tag_mp3(part.aside, book, track, part.chapters, [round(s * 1000 / shape.rate) for s in starts])
        else:
            _tag_mp4(part.aside, book, track)
        os.chmod(part.aside, 0o666 & ~_umask())  # as a file written in place would be, not the temporary's 0600
        os.replace(part.aside, dest)
        size = dest.stat().st_size
    except (OSError, MutagenError) as exc:
        raise UsageError(f"cannot write {dest}: {getattr(exc, 'strerror', None) or exc}") from exc
    return BookFile(dest, len(part.chapters), starts[-1] / shape.rate, size)


def _encode(chapters: list[Chapter], to: Path, suffix: str, shape: _Shape, bitrate_kbps: int) -> list[int]:
    """Encode the chapters one after another into one stream; returns each one's length in samples.
    Each frame is stamped with the sample it starts at in the book, so each chapter starts right where
    the one before it ends; the encoder cuts the frames to its own size."""
    mp4 = suffix != ".mp3"
    options = {"brand": "M4B "} if suffix == ".m4b" else {}  # what players file as an audiobook
    codec = _codec(suffix)
    with av.open(str(to), "w", format="ipod" if mp4 else "mp3", options=options) as out:
        stream = out.add_stream(codec, rate=shape.rate, layout=shape.layout, format="fltp",
                                options=_ENCODER_OPTIONS[codec])
        stream.bit_rate = bitrate_kbps * 1000
        time_base = Fraction(1, shape.rate)
        ends: list[int] = []
        at = 0
        for chapter in chapters:
            for frame in _frames(chapter, shape):
                frame.pts, frame.time_base = at, time_base
                at += frame.samples
                out.mux(stream.encode(frame))
            ends.append(at)
        out.mux(stream.encode(None))
        lengths = [end - start for start, end in zip([0, *ends], ends, strict=False)]
        if mp4:
            # The muxer writes chapters with the index, at the end; the encoder's priming samples are
            # outside the edit list, so sample 0 here is the first sample a player plays.
            out.set_chapters(_marks(chapters, lengths, shape.rate))
    return lengths


def _marks(chapters: list[Chapter], lengths: list[int], rate: int) -> list[Mark]:
    marks: list[Mark] = []
    start = 0
    for number, (chapter, samples) in enumerate(zip(chapters, lengths, strict=True), start=1):
        marks.append({"id": number, "start": start, "end": start + samples, "time_base": Fraction(1, rate),
                      "metadata": {"title": chapter.title}})
        start += samples
    return marks


def _tag_mp4(path: Path, book: _Book, track: tuple[int, int] | None) -> None:
    tags = MP4(path)
    if tags.tags is None:
        tags.add_tags()
    assert tags.tags is not None
    values: dict[str, list[Any]] = {"\xa9nam": [book.title], "\xa9alb": [book.album], "stik": [2]}  # 2: audiobook
    if book.artist:
        values["\xa9ART"] = values["aART"] = [book.artist]
    if track is not None:
        values["trkn"] = [track]
    if book.cover is not None:
        kind = MP4Cover.FORMAT_PNG if book.cover.kind == "png" else MP4Cover.FORMAT_JPEG
        values["covr"] = [MP4Cover(book.cover.data, imageformat=kind)]
    tags.tags.update(values)
    tags.save()


def _tag_mp3(path: Path, book: _Book, track: tuple[int, int] | None, chapters: list[Chapter],
             starts_ms: list[int]) -> None:
    """ID3v2.4 with a CHAP frame per chapter and an ordered top-level CTOC listing them, which is how
    podcast and audiobook players find chapters in an mp3."""
    tags = ID3()
    tags.add(TIT2(encoding=3, text=book.title))
    tags.add(TALB(encoding=3, text=book.album))
    if book.artist:
        tags.add(TPE1(encoding=3, text=book.artist))
    if track is not None:
        tags.add(TRCK(encoding=3, text=f"{track[0]}/{track[1]}"))
    if book.cover is not None:
        tags.add(APIC(encoding=3, mime=f"image/{book.cover.kind}", type=3, desc="Cover", data=book.cover.data))
    ids = [f"chp{i}" for i in range(1, len(chapters) + 1)]
    tags.add(CTOC(element_id="toc", flags=CTOCFlags.TOP_LEVEL | CTOCFlags.ORDERED, child_element_ids=ids,
                  sub_frames=[TIT2(encoding=3, text=book.title)]))
    for ident, chapter, start, end in zip(ids, chapters, starts_ms, starts_ms[1:], strict=False):
        tags.add(CHAP(element_id=ident, start_time=start, end_time=end,
                      sub_frames=[TIT2(encoding=3, text=chapter.title)]))
    tags.save(path, v2_version=4)
