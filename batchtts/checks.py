"""Audio checks: each narrated file measured as it lands, and held to the job's [checks] bounds.

Measured from the decoded samples: the length, the speaking rate (characters of the row's text as
narrated, the lexicon applied, per second of audio), the silence at the head and at the tail and the
longest inside the speech, the sample peak and the RMS (dBFS), and clipping: the share of samples at
full scale. Silence is what mastering takes it to be, 10 ms blocks quieter than -50 dBFS RMS; a
file with no block louder is silent.

A run measures every file it writes, tens of millions in a dataset job, so measuring is cheap: pcm
and wav are read with numpy straight from their bytes, mp3 and flac are decoded by PyAV, a stretch at
a time (an hour's chapter needs no hour of samples in memory), in the run's threads, off the event loop.
With `verify = "asr"` an English row is also heard by an offline recogniser (asr.py), for a word
error rate.

A file outside a bound is kept and its row flagged with the reasons. Narrated again
(`--redo-flagged`), the new take replaces the kept one only when it is better (`Verdict.replaces`):
when it passes, or when it is nearer its bounds than the kept one, nearness being the sum over the
bounds it misses of how far past each it is, relatively (digital silence is infinitely far).
"""

from __future__ import annotations

import contextlib
import math
import os
import wave
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import numpy.typing as npt

from .audio import SAMPLE_WIDTH, AudioInfo
from .config import Checks

if TYPE_CHECKING:
    from .asr import Listener

BLOCK_S = 0.01  # silence is found in blocks this long, as mastering finds it
SILENCE_DB = -50.0  # a block quieter than this (RMS, dBFS) is silence
FULL_SCALE = 32767 / 32768  # a sample this loud (16-bit's largest values, or past them) is clipped
_STRETCH = 1 << 16  # frames read from a pcm or wav file at a time
_DECODED = ("mp3", "flac")  # formats PyAV decodes; pcm and wav are read as they are

Samples = npt.NDArray[np.float32]  # (frames, channels), full scale at ±1


@dataclass(frozen=True)
class Measurement:
    duration_s: float
    lead_silence_s: float
    trail_silence_s: float
    max_inner_silence_s: float  # the longest silence between the first and the last sound
    peak_db: float | None  # dBFS; None for digital silence
    rms_db: float | None
    clipping: float  # the share of samples at full scale

    @property
    def silent(self) -> bool:
        """No block louder than SILENCE_DB: all of it is leading silence."""
        return self.lead_silence_s >= self.duration_s


class Meter:
    """Measures samples fed a stretch at a time, keeping only a number per 10 ms block."""

    def __init__(self, rate: int, channels: int) -> None:
        self.rate = rate
        self.channels = channels
        self.block = max(1, round(rate * BLOCK_S))
        self.frames = 0
        self._carry: Samples = np.zeros((0, channels), np.float32)  # frames short of a whole block
        self._blocks: list[npt.NDArray[np.float64]] = []  # the mean square of each block
        self._squares = 0.0
        self._peak = 0.0
        self._clipped = 0

    def feed(self, samples: Samples) -> None:
        if not len(samples):
            return
        self.frames += len(samples)
        high, low = float(samples.max()), float(samples.min())
        self._peak = max(self._peak, high, -low)
        if high >= FULL_SCALE or low <= -FULL_SCALE:
            self._clipped += int(np.count_nonzero(np.abs(samples) >= FULL_SCALE))
        joined = np.concatenate((self._carry, samples)) if len(self._carry) else samples
        whole = len(joined) // self.block * self.block
        sums = np.square(joined[:whole]).reshape(-1, self.block * self.channels).sum(axis=1)
        self._squares += float(sums.sum(dtype=np.float64))
        self._blocks.append(sums.astype(np.float64) / (self.block * self.channels))
        self._carry = joined[whole:]

    def measurement(self) -> Measurement:
        if len(self._carry):
            squares = np.square(self._carry)
            self._squares += float(squares.sum(dtype=np.float64))
            self._blocks.append(np.array([squares.mean(dtype=np.float64)]))
            self._carry = self._carry[:0]
        powers = np.concatenate(self._blocks) if self._blocks else np.zeros(0)
        loud = np.flatnonzero(powers > 10 ** (SILENCE_DB / 10))
        duration = self.frames / self.rate
        if len(loud):
            lead = int(loud[0]) * self.block / self.rate
            trail = max(0, self.frames - (int(loud[-1]) + 1) * self.block) / self.rate
            inner = int((np.diff(loud) - 1).max(initial=0)) * self.block / self.rate
        else:
            lead, trail, inner = duration, duration, 0.0
        samples = self.frames * self.channels
        return Measurement(
            duration_s=round(duration, 3), lead_silence_s=round(lead, 3), trail_silence_s=round(trail, 3),
            max_inner_silence_s=round(inner, 3), peak_db=_db(self._peak ** 2),
            rms_db=_db(self._squares / samples if samples else 0.0), clipping=self._clipped / samples if samples else 0.0,
        )


def _db(power: float) -> float | None:
    return round(10 * math.log10(power), 2) if power > 0 else None


def measure(samples: npt.NDArray[Any], rate: int) -> Measurement:
    """Measure samples held whole: 16-bit integers or floats at full scale ±1, of shape (frames,) or
    (frames, channels)."""
    if samples.ndim == 1:
        samples = samples[:, np.newaxis]
    meter = Meter(rate, samples.shape[1])
    meter.feed(_float(samples) if samples.dtype == np.int16 else samples.astype(np.float32, copy=False))
    return meter.measurement()


def _float(pcm: npt.NDArray[np.int16]) -> Samples:
    return pcm.astype(np.float32) * np.float32(1 / 32768)


@dataclass
class _Decoded:
    rate: int
    channels: int
    pieces: Iterator[Samples]


@contextlib.contextmanager
def _decoded(f: BinaryIO, fmt: str, info: AudioInfo) -> Iterator[_Decoded]:
    """A file being written, read from its start: its rate, its channels and its samples a stretch at
    a time. The file is left as it was found, at its end, open."""
    f.flush()
    f.seek(0)
    try:
        if fmt in _DECODED:
            from .decoding import open_audio  # PyAV: loaded by the runs that write mp3 or flac

            with open_audio(f, container=fmt) as container:
                stream = container.streams.audio[0]
                context = stream.codec_context
                yield _Decoded(context.sample_rate, context.channels, _frames(container, stream, context.channels))
        elif fmt == "wav":
            with wave.open(f, "rb") as riff:
                yield _Decoded(riff.getframerate(), riff.getnchannels(), _pcm(riff.readframes, riff.getnchannels()))
        else:
            assert info.sample_rate is not None and info.channels is not None
            frame = SAMPLE_WIDTH * info.channels
            yield _Decoded(info.sample_rate, info.channels, _pcm(lambda n: f.read(n * frame), info.channels))
    finally:
        f.seek(0, os.SEEK_END)


def _pcm(read: Any, channels: int) -> Iterator[Samples]:
    while data := read(_STRETCH):
        yield _float(np.frombuffer(data, "<i2").reshape(-1, channels))


def _frames(container: Any, stream: Any, channels: int) -> Iterator[Samples]:
    """Decoded frames as float samples, gathered into stretches (an mp3 or flac frame is a few hundred
    to a few thousand samples: measured one by one, numpy's cost per call would outweigh the
    decoding). The decoder's own planar floats (mp3's) are read where they are; other sample formats
    (flac's 16-bit) are converted."""
    from .decoding import channel_layout, planar_float

    layout = channel_layout(channels)
    planes: list[list[npt.NDArray[np.float32]]] = [[] for _ in range(channels)]
    held = 0
    for each in planar_float(container.decode(stream), layout, stream.codec_context.sample_rate):
        for channel, plane in zip(planes, each.planes, strict=True):
            channel.append(np.frombuffer(memoryview(plane), np.float32, each.samples))
        held += each.samples
        if held >= _STRETCH:
            yield _joined(planes)
            planes, held = [[] for _ in range(channels)], 0
    if held:
        yield _joined(planes)


def _joined(planes: list[list[npt.NDArray[np.float32]]]) -> Samples:
    if len(planes) == 1:
        return np.concatenate(planes[0])[:, np.newaxis]
    return np.stack([np.concatenate(channel) for channel in planes], axis=1)


@dataclass(frozen=True)
class Verdict:
    """A file's measurement held to the bounds: why it is flagged (nothing when it passes)."""

    measurement: Measurement
    chars_per_second: float | None
    wer: float | None  # with verify = "asr", for an English row
    reasons: tuple[str, ...]
    distance: float  # how far outside its bounds: 0 within them

    @property
    def flagged(self) -> bool:
        return bool(self.reasons)

    def replaces(self, kept: Verdict) -> bool:
        """Whether this take, of a flagged row narrated again, is better than the take kept so far."""
        return not self.flagged or self.distance < kept.distance

    def record(self) -> dict[str, Any]:
        """The ledger's columns (the checks table's, but the row's key, file and redos)."""
        return {**asdict(self.measurement), "chars_per_second": self.chars_per_second, "wer": self.wer,
                "flagged": int(self.flagged), "flag_reasons": "; ".join(self.reasons) or None}


def judge(m: Measurement, characters: int, bounds: Checks, wer: float | None = None) -> Verdict:
    """Hold a measurement of a row's file to the bounds; `characters`: of the text it says."""
    rate = round(characters / m.duration_s, 2) if m.duration_s > 0 else None
    misses: list[tuple[str, float]] = []  # the reason, and how far past its bound

    def past(value: float, bound: float) -> float:
        return value / bound - 1 if bound > 0 else math.inf

    if m.silent:
        misses.append((f"silent: no 10 ms of it above {SILENCE_DB:g} dBFS", math.inf))
    if bounds.min_duration is not None and m.duration_s < bounds.min_duration:
        misses.append((f"short: {m.duration_s:.2f} s, under {bounds.min_duration:g} s", past(bounds.min_duration, m.duration_s)))
    if bounds.max_duration is not None and m.duration_s > bounds.max_duration:
        misses.append((f"long: {m.duration_s:.2f} s, over {bounds.max_duration:g} s", past(m.duration_s, bounds.max_duration)))
    if rate is not None and rate < bounds.min_chars_per_second:
        misses.append((f"slow: {rate:.1f} characters/s, under {bounds.min_chars_per_second:g}",
                       past(bounds.min_chars_per_second, rate)))
    if rate is not None and rate > bounds.max_chars_per_second:
        misses.append((f"fast: {rate:.1f} characters/s, over {bounds.max_chars_per_second:g}",
                       past(rate, bounds.max_chars_per_second)))
    if m.max_inner_silence_s > bounds.max_inner_silence:
        misses.append((f"inner silence: {m.max_inner_silence_s:.2f} s, over {bounds.max_inner_silence:g} s",
                       past(m.max_inner_silence_s, bounds.max_inner_silence)))
    if m.clipping > bounds.max_clipping:
        misses.append((f"clipping: {m.clipping:.3%} of samples, over {bounds.max_clipping:.3%}",
                       (m.clipping - bounds.max_clipping) * 100))
    if wer is not None and wer > bounds.max_wer:
        misses.append((f"wer: {wer:.2f}, over {bounds.max_wer:g}", past(wer, bounds.max_wer)))
    return Verdict(m, rate, wer, tuple(reason for reason, _ in misses), sum(far for _, far in misses))


def _undecodable(fmt: str) -> tuple[type[Exception], ...]:
    """What reading a file of the format raises for audio that does not decode."""
    if fmt not in _DECODED:
        return (wave.Error, EOFError, ValueError)
    import av

    return (av.FFmpegError, EOFError, ValueError)


class Checker:
    """The job's [checks], applied to files as they land. Blocking: call it from the run's threads."""

    def __init__(self, bounds: Checks) -> None:
        self.bounds = bounds

    def check(self, f: BinaryIO, fmt: str, info: AudioInfo, text: str, language: str | None) -> Verdict:
        """Measure an open file, written whole (`info`: what its writer found), saying `text`."""
        try:
            with _decoded(f, fmt, info) as audio:
                meter = Meter(audio.rate, audio.channels)
                listener = self._listener(audio.rate, audio.channels, language)
                for piece in audio.pieces:
                    meter.feed(piece)
                    if listener is not None:
                        listener.feed(piece)
        except _undecodable(fmt) as exc:  # its writer took it whole, its decoder cannot read it through
            nothing = Measurement(0.0, 0.0, 0.0, 0.0, None, None, 0.0)
            return Verdict(nothing, None, None, (f"undecodable: {exc}",), math.inf)
        wer = None
        if listener is not None:
            from .asr import word_error_rate

            wer = word_error_rate(text, listener.transcript())
        return judge(meter.measurement(), len(text), self.bounds, wer)

    def _listener(self, rate: int, channels: int, language: str | None) -> Listener | None:
        """What hears the file for a word error rate: with verify = "asr", for an English row."""
        if self.bounds.verify != "asr":
            return None
        from .asr import Listener, is_english  # the recogniser: loaded by the runs that verify

        return Listener(rate, channels) if is_english(language) else None

    def recorded(self, record: dict[str, Any], text: str) -> Verdict:
        """A take the ledger holds (its checks record), held to these bounds."""
        measured = Measurement(**{f.name: record[f.name] for f in fields(Measurement)})
        return judge(measured, len(text), self.bounds, record["wer"])
