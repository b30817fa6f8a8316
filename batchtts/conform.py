"""A row's file made into its shape as it lands: its format at the job's [output] rate and channels.

The provider's answer (or a long row's stitched chunks) is decoded, resampled and encoded by PyAV
(`datasets.shape.reshape`, as the dataset exports convert), before the file is tagged, checked and
put in place, so that the file, the ledger's record of it and the checks all describe the same
audio. flac is always converted here: it is asked for as pcm. A file already in shape is left as it
is; pcm stays raw pcm at the new rate. Each file is converted in memory. PyAV is loaded by the
runs that convert.
"""

from __future__ import annotations

import functools
import io
import os
import wave
from typing import TYPE_CHECKING, BinaryIO

from .audio import AudioInfo
from .config import Output
from .errors import RejectedError, UsageError

if TYPE_CHECKING:
    from .datasets.shape import AudioFormat

# What each row format is encoded as: pcm as 16-bit wav, whose samples are then taken out of it.
_ENCODED: dict[str, AudioFormat] = {"flac": "flac", "wav": "wav", "mp3": "mp3", "pcm": "wav"}
_RAW = ("pcm", "flac")  # written as the provider's raw pcm until converted: their rate and channels are the writer's


class ConversionError(RejectedError):
    """A row's file that could not be made into its shape: the row fails, the run goes on."""


def converts(fmt: str, output: Output) -> bool:
    """Whether a row's file is converted as it lands."""
    return fmt == "flac" or output.shaped


@functools.cache
def refused(fmt: str, rate: int) -> str | None:
    """What the encoder of the row format says to the rate, or None when it takes it."""
    from .datasets.shape import Shape

    try:
        Shape(_ENCODED[fmt], rate).check()
    except UsageError as exc:
        return str(exc)
    return None


def conform(f: BinaryIO, fmt: str, info: AudioInfo, output: Output) -> AudioInfo:
    """Make the open file, written whole, into `fmt` at the shape `output` sets, in place, and say
    what it now holds; the file is left at its end. Raises ConversionError."""
    if fmt != "flac" and output.sample_rate in (None, info.sample_rate) and output.channels in (None, info.channels):
        return info  # the writer read the rate and channels of pcm, wav and mp3 exactly: in shape already
    from .datasets.shape import Shape, Unreadable, reshape

    pcm = None
    if fmt in _RAW:
        assert info.sample_rate is not None and info.channels is not None
        pcm = (info.sample_rate, info.channels)
    f.flush()
    f.seek(0)
    try:
        audio = reshape(f.read(), Shape(_ENCODED[fmt], output.sample_rate, output.channels), pcm)
    except Unreadable as exc:
        raise ConversionError(f"cannot make the audio {_described(fmt, output)}: {exc}") from exc
    if audio.copied:
        return info
    f.seek(0)
    f.truncate()
    f.write(_samples(audio.data) if fmt == "pcm" else audio.data)
    f.seek(0, os.SEEK_END)
    return AudioInfo(audio.rate, audio.channels, round(audio.duration, 3))


def _samples(riff: bytes) -> bytes:
    """The 16-bit samples of a wav, without its header: a pcm row's file."""
    with wave.open(io.BytesIO(riff), "rb") as reader:
        return reader.readframes(reader.getnframes())


def _described(fmt: str, output: Output) -> str:
    """`flac at 16000 Hz, mono`: the shape a file was to be made into, in a message."""
    rate = f" at {output.sample_rate} Hz" if output.sample_rate is not None else ""
    layout = {None: "", 1: ", mono", 2: ", stereo"}.get(output.channels, f", {output.channels} channels")
    return f"{fmt}{rate}{layout}"
