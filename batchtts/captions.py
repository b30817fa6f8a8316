"""Captions beside a row's audio file: SRT or WebVTT, one cue a sentence, timed from the audio itself.

Each chunk's cues span the chunk's audio, where the stitcher placed it in the file (the silence
between chunks has no cue); within a chunk, each sentence (pysbd, as the chunker finds them) gets
the share of the chunk's time that its share of the characters is. A row narrated in one request
is one chunk. The words are the manifest's, without markup and before the lexicon rewrote any. Cues
never overlap, and the last one ends where the file does. A mastered file's captions are these read
back (`read`) and moved with its speech (`shifted`).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .chunking import sentences

FORMATS = ("srt", "vtt")


@dataclass(frozen=True)
class Cue:
    start: float
    end: float
    text: str


def cues(chunks: Sequence[tuple[str, float, float]], duration: float) -> list[Cue]:
    """Cues for the chunks' words, each given with where its audio starts and ends in the file."""
    found: list[Cue] = []
    for words, start, end in chunks:
        said = [" ".join(sentence.split()) for sentence in sentences(words)]
        total = sum(map(len, said))
        done = 0
        for sentence in said:
            begin = start + (end - start) * done / total
            done += len(sentence)
            found.append(Cue(begin, end if done == total else start + (end - start) * done / total, sentence))
    if found:
        found[-1] = Cue(found[-1].start, max(duration, found[-1].start), found[-1].text)
    return found


def render(found: Sequence[Cue], fmt: str) -> str:
    """The caption file's text in `fmt` (srt or vtt)."""
    if fmt == "srt":
        return "".join(f"{number}\n{_time(cue.start, ',')} --> {_time(cue.end, ',')}\n{_line(cue.text)}\n\n"
                       for number, cue in enumerate(found, 1))
    if fmt == "vtt":
        body = "".join(f"{_time(cue.start, '.')} --> {_time(cue.end, '.')}\n{_escaped(_line(cue.text))}\n\n"
                       for cue in found)
        return "WEBVTT\n\n" + body
    raise ValueError(f"no caption format {fmt!r}: use one of {', '.join(FORMATS)}")


def caption_path(relpath: str, fmt: str) -> str:
    """Beside the audio: `ch01.srt` for `ch01.mp3`."""
    return str(PurePosixPath(relpath).with_suffix(f".{fmt}"))


def read(path: Path) -> list[Cue]:
    """The cues of a caption file this module wrote (SRT or WebVTT, by its extension), read with
    FFmpeg's subtitle demuxers through PyAV."""
    import av  # only mastering reads captions back: narrating needs no FFmpeg

    with av.open(str(path), format="webvtt" if path.suffix == ".vtt" else "srt") as container:
        if not container.streams.subtitles:  # a file of no cues
            return []
        stream = container.streams.subtitles[0]
        base = stream.time_base
        assert base is not None  # both demuxers count in milliseconds
        found = []
        for packet in container.demux(stream):
            if packet.pts is None or packet.duration is None:  # the end of the stream
                continue
            text = bytes(packet).decode("utf-8").strip()
            start = float(packet.pts * base)
            found.append(Cue(start, start + float(packet.duration * base),
                             html.unescape(text) if path.suffix == ".vtt" else text))
    return found


def shifted(found: Sequence[Cue], by: float, duration: float) -> list[Cue]:
    """The cues `by` seconds later (earlier when negative) in a file `duration` seconds long: each
    kept within the file, and a cue left with no time in it dropped."""
    moved = [Cue(max(0.0, cue.start + by), min(duration, cue.end + by), cue.text) for cue in found]
    return [cue for cue in moved if cue.end > cue.start]


def _time(seconds: float, separator: str) -> str:
    ms = max(0, round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    whole, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{whole:02d}{separator}{ms:03d}"


def _line(text: str) -> str:
    """One line of cue text: an arrow in it would read as a cue's timing line."""
    return text.replace("-->", "->")


def _escaped(text: str) -> str:
    """WebVTT reads & and < as the start of markup."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
