"""Joining the chunks of a long row into one file that plays as if it were one request.

pcm and wav: samples concatenated with silence at each seam; flac the same, as raw pcm, encoded as
the row's file lands (conform.py). mp3: frame-level concatenation with every ID3 tag and
Xing/Info/VBRI header frame removed, silence as encoded silent frames of the same rate, channel mode
and bitrate, so the result is one clean constant-bitrate stream that plays gaplessly and whose
duration players compute correctly. Chunks whose rate or channels differ are an error, never a
corrupt file.

The silence before a chunk is the pause voice markup asks for there, else the gap of its seam (a
paragraph's or a sentence's); a pause before the first chunk opens the file. The stitcher says where
each chunk's audio lies in the file, which is what captions are timed by.
"""

from __future__ import annotations

import functools
import wave
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

from .audio import SAMPLE_WIDTH, AudioInfo, encode_mp3
from .errors import RejectedError
from .work import Part

_BITRATES_V1 = (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)
_BITRATES_V2 = (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)
_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


@dataclass(frozen=True)
class Mp3Stream:
    frames: list[bytes]
    sample_rate: int
    channels: int
    bitrate_kbps: int
    samples_per_frame: int


class StitchError(RejectedError):
    pass


@dataclass(frozen=True)
class Stitched:
    info: AudioInfo
    spans: tuple[tuple[float, float], ...]  # where each part's audio starts and ends in the file, in seconds


def _gap(index: int, part: Part, sentence_gap: float, paragraph_gap: float) -> float:
    if part.pause is not None:
        return part.pause
    if not index:
        return 0.0
    return paragraph_gap if part.paragraph_before else sentence_gap


def mp3_frames(data: bytes) -> Mp3Stream:
    """The audio frames of an mp3, without tags or VBR header frames."""
    pos = 0
    if data[:3] == b"ID3":
        size = (data[6] & 0x7F) << 21 | (data[7] & 0x7F) << 14 | (data[8] & 0x7F) << 7 | (data[9] & 0x7F)
        pos = 10 + size + (10 if data[5] & 0x10 else 0)
    frames: list[bytes] = []
    shape: set[tuple[int, int]] = set()
    bitrate = spf = 0
    while pos + 4 <= len(data):
        header = int.from_bytes(data[pos:pos + 4], "big")
        if header >> 21 != 0x7FF:
            if data[pos:pos + 3] == b"TAG" or data[pos:pos + 8] == b"APETAGEX":
                break
            raise StitchError(f"not an mp3 frame at byte {pos}")
        version = (header >> 19) & 3
        layer = (header >> 17) & 3
        rate_index = (header >> 10) & 3
        bitrate_index = (header >> 12) & 0xF
        if version == 1 or layer != 1 or rate_index == 3 or bitrate_index in (0, 15):
            raise StitchError(f"unsupported mp3 frame at byte {pos} (only MPEG layer III at a fixed bitrate index)")
        rate = _RATES[version][rate_index]
        kbps = (_BITRATES_V1 if version == 3 else _BITRATES_V2)[bitrate_index]
        spf = 1152 if version == 3 else 576
        length = spf // 8 * kbps * 1000 // rate + ((header >> 9) & 1)
        mode = (header >> 6) & 3
        frame = data[pos:pos + length]
        pos += length
        if len(frame) < length:
            raise StitchError("the last mp3 frame is cut short")
        side_info = (17 if mode == 3 else 32) if version == 3 else (9 if mode == 3 else 17)
        if frame[4 + side_info:8 + side_info] in (b"Xing", b"Info") or frame[36:40] == b"VBRI":
            continue
        frames.append(frame)
        shape.add((rate, 1 if mode == 3 else 2))
        bitrate = bitrate or kbps
    if not frames:
        raise StitchError("no mp3 audio frames")
    if len(shape) > 1:
        raise StitchError("the mp3 changes sample rate or channel mode mid-stream")
    rate, channels = shape.pop()
    return Mp3Stream(frames, rate, channels, bitrate, spf)


@functools.lru_cache(maxsize=16)
def silent_frames(sample_rate: int, channels: int, bitrate_kbps: int, seconds: float) -> tuple[bytes, ...]:
    """Encoded silence that can sit between frames of a stream of the same shape."""
    if seconds <= 0:
        return ()
    samples = int(round(seconds * sample_rate))
    pcm = bytes(samples * SAMPLE_WIDTH * channels)
    return tuple(mp3_frames(encode_mp3(pcm, sample_rate, channels, bitrate_kbps)).frames)


def stitch(parts: Sequence[Part], fmt: str, out: BinaryIO, sentence_gap: float, paragraph_gap: float) -> Stitched:
    """Write the parts, in order, into `out` as one file of format `fmt`."""
    if fmt == "mp3":
        return _stitch_mp3(parts, out, sentence_gap, paragraph_gap)
    shapes = {(p.sample_rate, p.channels) for p in parts}
    if len(shapes) != 1:
        raise StitchError(f"chunks differ in sample rate or channels: {sorted(shapes, key=str)}")
    rate, channels = shapes.pop()
    assert rate is not None and channels is not None
    frame = SAMPLE_WIDTH * channels
    writer = wave.open(out, "wb") if fmt == "wav" else None
    if writer is not None:
        writer.setnchannels(channels)
        writer.setsampwidth(SAMPLE_WIDTH)
        writer.setframerate(rate)
    samples = 0
    spans: list[tuple[float, float]] = []
    for i, part in enumerate(parts):
        silence = bytes(int(round(_gap(i, part, sentence_gap, paragraph_gap) * rate)) * frame)
        audio = part.path.read_bytes()
        for piece in (silence, audio):
            samples += len(piece) // frame
            if writer is not None:
                writer.writeframesraw(piece)
            else:
                out.write(piece)
        spans.append(((samples - len(audio) // frame) / rate, samples / rate))
    if writer is not None:
        writer.close()
    return Stitched(AudioInfo(rate, channels, round(samples / rate, 3)), tuple(spans))


def _stitch_mp3(parts: Sequence[Part], out: BinaryIO, sentence_gap: float, paragraph_gap: float) -> Stitched:
    streams = [mp3_frames(p.path.read_bytes()) for p in parts]
    shapes = {(s.sample_rate, s.channels) for s in streams}
    if len(shapes) != 1:
        raise StitchError(f"chunks differ in sample rate or channel mode: {sorted(shapes)}")
    first = streams[0]
    def seconds(frames: int) -> float:
        return frames * first.samples_per_frame / first.sample_rate

    frames = 0
    spans: list[tuple[float, float]] = []
    for i, (part, stream) in enumerate(zip(parts, streams, strict=True)):
        gap = _gap(i, part, sentence_gap, paragraph_gap)
        silence = silent_frames(first.sample_rate, first.channels, first.bitrate_kbps, gap)
        out.write(b"".join(silence))
        frames += len(silence)
        out.write(b"".join(stream.frames))
        spans.append((seconds(frames), seconds(frames + len(stream.frames))))
        frames += len(stream.frames)
    info = AudioInfo(first.sample_rate, first.channels, round(seconds(frames), 3))
    return Stitched(info, tuple(spans))
