"""A narrated file opened with PyAV and decoded into planar float frames, as mastering, the audio
checks and the audiobook encoders take them: one reader for all, raw pcm included."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import av


@dataclass(frozen=True)
class PcmShape:
    """What a raw pcm file (16-bit little-endian, no header) holds; its rate and channels are in the ledger."""

    sample_rate: int
    channels: int


def channel_layout(channels: int) -> str:
    """FFmpeg's name for the layout of so many channels."""
    return {1: "mono", 2: "stereo"}.get(channels, f"{channels}c")


def open_audio(source: Path | BinaryIO, pcm: PcmShape | None = None,
               container: str | None = None) -> av.container.InputContainer:
    """The file (a path, or a file open for reading) opened for decoding; `pcm` for a raw pcm file,
    which says nothing of itself; `container`, FFmpeg's name for the file's format when it is known,
    which spares probing a file being written."""
    file = str(source) if isinstance(source, Path) else source
    if pcm is None:
        return av.open(file, "r", format=container, metadata_errors="ignore")
    return av.open(file, "r", format="s16le",
                   options={"sample_rate": str(pcm.sample_rate), "ch_layout": channel_layout(pcm.channels)})


def planar_float(decoded: Iterator[av.AudioFrame], layout: str, rate: int) -> Iterator[av.AudioFrame]:
    """The decoder's frames as planar float32 in `layout` at `rate`: as they come when the decoder
    gives them so (mp3's does), else converted by FFmpeg's resampler, from the first frame that is not on."""
    first = next(decoded, None)
    as_given = first is not None and first.format.name == "fltp" and first.layout.name == layout
    converter: av.AudioResampler | None = None
    for frame in itertools.chain([first] if first is not None else [], decoded, [None]):
        if converter is None and frame is not None and as_given and frame.sample_rate == rate:
            yield frame
        elif converter is not None or frame is not None:
            converter = converter or av.AudioResampler(format="fltp", layout=layout, rate=rate)
            yield from converter.resample(frame)
