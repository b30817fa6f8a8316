"""Audio in the shape a trainer reads: a format (flac, 16-bit wav, mp3), a sample rate and a number
of channels. PyAV decodes, resamples (libswresample) and encodes; a file already in that shape is
copied byte for byte, never encoded again.

Each file is converted in memory, a row at a time: dataset rows are utterances of seconds.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal

import av

from ..decoding import PcmShape, channel_layout, open_audio
from ..errors import UsageError

AudioFormat = Literal["flac", "wav", "mp3"]
AUDIO_FORMATS: tuple[AudioFormat, ...] = ("flac", "wav", "mp3")
_ENCODERS: dict[str, str] = {"flac": "flac", "wav": "pcm_s16le", "mp3": "libmp3lame"}
_SAMPLE_FORMATS: dict[str, str] = {"flac": "s16", "wav": "s16", "mp3": "s16p"}  # 16-bit throughout
_DECODERS: dict[str, tuple[str, ...]] = {"flac": ("flac",), "wav": ("pcm_s16le",), "mp3": ("mp3float", "mp3")}
_MP3_BITRATE = 64_000  # a channel: clear speech
# Enough of a file to read its header: FFmpeg's default probe (5 MB, and decoding to guess at
# durations) costs ten times the copy of a short wav. A file that says too little in that much is
# opened again with the default.
_PROBE = {"probesize": "1024", "analyzeduration": "0"}
_CHANNELS = (1, 2)  # what the encoders are given: mono or stereo


@dataclass(frozen=True)
class Shape:
    """What every file of a dataset is made into; a rate or channels of None keeps the file's own."""

    format: AudioFormat
    rate: int | None = None
    channels: int | None = None

    def check(self) -> None:
        """Refuse, before any file is read, a shape the encoder cannot make."""
        if self.channels is not None and self.channels not in _CHANNELS:
            raise UsageError(f"--channels takes 1 or 2, not {self.channels}")
        rates = av.Codec(_ENCODERS[self.format], "w").audio_rates
        if self.rate is not None and rates and self.rate not in rates:
            taken = ", ".join(map(str, sorted(rates)))
            raise UsageError(f"{self.format} takes the sample rates {taken}; not {self.rate}")


@dataclass(frozen=True)
class Audio:
    """One row's file in the dataset's shape."""

    data: bytes
    format: AudioFormat
    rate: int
    channels: int
    samples: int  # a channel's: what a decoder gives back
    copied: bool  # the file as narrated, not encoded again

    @property
    def duration(self) -> float:
        return self.samples / self.rate


class Unreadable(Exception):
    """A file that does not decode as audio."""


def reshape(data: bytes, shape: Shape, pcm: tuple[int, int] | None = None) -> Audio:
    """The file's audio in `shape`. `pcm` is the rate and channels of raw 16-bit PCM, which says
    neither itself. Raises Unreadable."""
    try:
        with _open(data, pcm) as source:
            if not source.streams.audio:
                raise Unreadable("no audio stream")
            stream = source.streams.audio[0]
            rate, channels = shape.rate or stream.rate, shape.channels or stream.channels
            if not rate or not channels:
                raise Unreadable("no sample rate or channels in its header")
            if pcm is None and _in_shape(source, shape.format, rate, channels):
                audio = Audio(data, shape.format, rate, channels, _length(source), copied=True)
            else:
                audio = _encode(source, shape.format, rate, channels)
    except av.FFmpegError as exc:
        raise Unreadable(str(exc)) from exc
    if not audio.samples:
        raise Unreadable("no audio in it")
    return audio


def _open(data: bytes, pcm: tuple[int, int] | None) -> av.container.InputContainer:
    if pcm is None:
        quick = av.open(io.BytesIO(data), "r", options=_PROBE)
        if quick.streams.audio and quick.streams.audio[0].rate and quick.streams.audio[0].channels:
            return quick
        quick.close()
        return av.open(io.BytesIO(data), "r")
    return open_audio(io.BytesIO(data), PcmShape(*pcm))


def _in_shape(source: av.container.InputContainer, fmt: AudioFormat, rate: int, channels: int) -> bool:
    stream = source.streams.audio[0]
    sample_format = stream.format.name if stream.format is not None else None
    return (fmt in source.format.name.split(",") and stream.codec_context.name in _DECODERS[fmt]
            and stream.rate == rate and stream.channels == channels
            and (fmt == "mp3" or sample_format == _SAMPLE_FORMATS[fmt]))


def _length(source: av.container.InputContainer) -> int:
    """Samples a channel, from the header where it says them exactly (wav, flac), else decoded."""
    stream = source.streams.audio[0]
    if stream.codec_context.name != "mp3float" and stream.duration and stream.time_base is not None:
        return round(stream.duration * stream.time_base * stream.rate)
    return sum(frame.samples for frame in source.decode(stream))


def _encode(source: av.container.InputContainer, fmt: AudioFormat, rate: int, channels: int) -> Audio:
    layout = channel_layout(channels)
    buffer = io.BytesIO()
    samples = 0
    with av.open(buffer, "w", format=fmt) as out:
        stream = out.add_stream(_ENCODERS[fmt], rate=rate, layout=layout)
        assert isinstance(stream, av.AudioStream)
        if fmt == "mp3":
            stream.bit_rate = _MP3_BITRATE * channels
        out.start_encoding()
        # The encoder takes frames of its own size (flac, mp3) but the last: the resampler cuts them.
        resampler = av.AudioResampler(format=_SAMPLE_FORMATS[fmt], layout=layout, rate=rate,
                                      frame_size=stream.codec_context.frame_size or None)

        def encode(frames: list[av.AudioFrame]) -> None:
            nonlocal samples
            for frame in frames:
                frame.pts = samples
                samples += frame.samples
                out.mux(stream.encode(frame))

        for frame in source.decode(source.streams.audio[0]):
            encode(resampler.resample(frame))
        encode(resampler.resample(None))
        out.mux(stream.encode(None))
    return Audio(buffer.getvalue(), fmt, rate, channels, samples, copied=False)
