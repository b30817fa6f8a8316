"""Mastering: narrated files made to a store's spec (ACX, a podcast's loudness), and measured against it.

A file is measured as a listener's tools would measure it, decoded: integrated loudness by
pyloudnorm (ITU-R BS.1770), true peak on a 4x oversampling by scipy, RMS and sample peak, the noise
floor (the quietest 500 ms), and the silence at the head and the tail.

Mastering is one pass. The narrated file is decoded once (PyAV, float32, mono kept mono) and
measured once: the gain that brings its loudness or RMS to the preset's aim, raised by what the
limiter will take back (foreseen from the narration's peaks) and by what the encoder takes off
(LAME scales its input down a little; measured once per encoding, on a tone). Then it streams, a
frame at a time, through FFmpeg's filters into the encoder: `volume` for that gain, resampling to
the preset's rate, and `alimiter` with its ceiling a margin under the spec's, on the samples for a
sample peak (ACX) and on a 2x oversampling for a true peak (podcast), where a peak between samples
counts too. A preset with room tone gets the narration's own leading and trailing silence replaced
by its head and tail, and a bed of noise (`anoisesrc`) far below the noise floor limit laid under
the whole file: stores refuse digital silence as room tone. The file written is measured once, for
the record; one that misses its level or its peak ceiling (the foresight is good to some tenths of
a dB, the spec's windows are wider) is made once more with the gain and the ceiling corrected by
what was measured, never in a loop. It is renamed into place: a final name only ever holds a whole
file. Caption files beside the narrated file are copied beside the mastered one, their cues moved
by the change at the head.

`master_rows` is a run's mastering: every row done whose mastered file is missing or out of date,
several at once, each recorded in the ledger as it is made.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import itertools
import math
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, fields, replace
from fractions import Fraction
from pathlib import Path, PurePosixPath
from typing import Any

import av
import av.filter
import numpy as np
import numpy.typing as npt

from . import captions
from .config import MasteringPreset
from .cores import cpus
from .decoding import PcmShape, channel_layout, open_audio, planar_float
from .errors import BatchTTSError, LedgerError
from .ledger import Ledger
from .log import log

Samples = npt.NDArray[np.float32]  # (frames, channels), full scale at ±1

BLOCK_S = 0.01  # the silence at the head and tail is found in blocks this long
SILENCE_DB = -50.0  # a block quieter than this (RMS, dBFS) is silence
FLOOR_WINDOW_S = 0.5  # the noise floor: the RMS of the quietest stretch this long
OVERSAMPLING = 4  # for true peak, as BS.1770 measures it
LIMITER_OVERSAMPLING = 2  # for the limiter of a preset with a true peak ceiling to see peaks between samples
_SPEECH_MARGIN_S = 0.02  # kept either side of the speech when its silences are replaced
_FRAME = 8192  # samples pushed into the filters at a time
MASTERED_DIR = "mastered"


class MasteringError(BatchTTSError):
    """One file could not be mastered or measured: it is unreadable, silent, or not audio."""


class MasteringCancelled(MasteringError):
    """The run was stopped while the file was being mastered; nothing was written under its name."""


@dataclass(frozen=True)
class Target:
    """A level or a length the spec takes anywhere from `low` to `high`; mastering aims at `aim`."""

    aim: float
    low: float
    high: float

    def holds(self, value: float) -> bool:
        return self.low <= value <= self.high


@dataclass(frozen=True)
class Encoding:
    """What a mastered file is written as."""

    extension: str
    container: str  # FFmpeg's muxer, and the format name a decoder reports
    codec: str  # FFmpeg's encoder
    bitrate_kbps: int  # constant
    required: bool  # the store takes nothing else
    # The encoder's speed for its quality (FFmpeg's compression_level; LAME's -q, 0 best to 9 fastest).
    # LAME's 7 keeps its psychoacoustic model and leaves out noise shaping, twice as fast as its
    # default: at these bitrates for one voice, more bits than speech needs, the difference is not heard.
    compression_level: int | None = None


@dataclass(frozen=True)
class Preset:
    """A store's spec: what `check` holds a file to, and what `master` makes."""

    name: MasteringPreset
    sample_rate: int | None = None
    loudness_lufs: Target | None = None  # integrated loudness
    rms_db: Target | None = None
    peak_db: float | None = None  # sample peak ceiling, dBFS
    true_peak_db: float | None = None  # dBTP
    noise_floor_db: float | None = None
    head_s: Target | None = None  # room tone before the first word
    tail_s: Target | None = None  # and after the last
    room_tone_db: float | None = None  # the RMS of the noise laid under a file with room tone
    max_length_s: float | None = None
    encoding: Encoding | None = None  # None: the preset makes no mastered files (`none`)


PRESETS: dict[str, Preset] = {
    "acx": Preset(
        "acx", sample_rate=44100, rms_db=Target(-20.0, -23.0, -18.0), peak_db=-3.0, noise_floor_db=-60.0,
        head_s=Target(0.75, 0.5, 1.0), tail_s=Target(2.0, 1.0, 5.0), room_tone_db=-72.0, max_length_s=120 * 60,
        encoding=Encoding("mp3", "mp3", "libmp3lame", 192, required=True, compression_level=7),
    ),
    "podcast": Preset(
        "podcast", sample_rate=44100, loudness_lufs=Target(-16.0, -17.0, -15.0), true_peak_db=-1.0,
        encoding=Encoding("mp3", "mp3", "libmp3lame", 128, required=False, compression_level=7),
    ),
    "none": Preset("none"),
}


def preset(name: str) -> Preset:
    """The preset of that name; an unknown one is a usage error."""
    try:
        return PRESETS[name]
    except KeyError:
        raise MasteringError(f"no mastering preset {name!r}: use one of {', '.join(PRESETS)}") from None


@dataclass(frozen=True)
class Measurement:
    """What a file holds, as measured. A level of None is digital silence (or, for loudness, audio
    too short or too quiet for BS.1770's gates)."""

    loudness_lufs: float | None
    rms_db: float | None
    peak_db: float | None
    true_peak_db: float | None
    noise_floor_db: float | None
    head_s: float  # silence before the first sound
    tail_s: float  # and after the last
    room_tone_db: float | None  # the RMS of those silences
    length_s: float
    sample_rate: int
    channels: int
    container: str | None = None  # the file's format, as FFmpeg names it: mp3, wav, s16le
    bitrate_kbps: int | None = None

    def as_dict(self) -> dict[str, float | int | str | None]:
        """Rounded for people and for the ledger: to a thousandth of a dB and of a second."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {name: round(v, 3) if isinstance(v, float) else v for name, v in values.items()}


MEASUREMENTS: tuple[str, ...] = tuple(f.name for f in fields(Measurement))


@dataclass(frozen=True)
class Verdict:
    """A file held to a preset: what misses its spec, said as the store would."""

    preset: str
    problems: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.problems


def mastered_relpath(relpath: str, chosen: Preset) -> str:
    """Where a row's mastered file goes: the same place under `mastered/`, with the preset's extension."""
    assert chosen.encoding is not None
    return str(PurePosixPath(MASTERED_DIR) / PurePosixPath(relpath).with_suffix(f".{chosen.encoding.extension}"))


def _db(power: float) -> float | None:
    """A mean square as dB (full scale 1.0); None for digital silence."""
    return 10 * math.log10(power) if power > 0 else None


def _peak_db(amplitude: float) -> float | None:
    return 20 * math.log10(amplitude) if amplitude > 0 else None


_STRETCH = 1 << 20  # frames measured at a time: an hour's chapter is never copied whole in float64


def _blocks(samples: Samples, rate: int, seconds: float) -> npt.NDArray[np.float64]:
    """The mean square of each block of `seconds` (the last one partial), across channels."""
    size = max(1, round(rate * seconds))
    step = size * (_STRETCH // size)
    means = []
    for start in range(0, len(samples), step):
        squares = np.square(samples[start:start + step], dtype=np.float64).mean(axis=1)
        edges = np.arange(0, len(squares), size)
        means.append(np.add.reduceat(squares, edges) / np.diff(np.append(edges, len(squares))))
    return np.concatenate(means) if means else np.zeros(0)


def _power(samples: Samples) -> float:
    """The mean square of all the samples."""
    total = sum(float(np.square(samples[start:start + _STRETCH], dtype=np.float64).sum())
                for start in range(0, len(samples), _STRETCH))
    return total / samples.size if samples.size else 0.0


def _peak(samples: Samples) -> float:
    return max((float(np.abs(samples[start:start + _STRETCH]).max()) for start in range(0, len(samples), _STRETCH)),
               default=0.0)


def _true_peak(samples: Samples) -> float:
    """The highest absolute value of the signal oversampled 4x (BS.1770's true peak), a stretch at a
    time so that an hour's chapter needs no four hours of samples in memory."""
    from scipy.signal import resample_poly  # type: ignore[import-untyped]  # see _loudness

    pad, step, peak = 64, 1 << 18, 0.0
    for start in range(0, len(samples), step):
        lead = min(pad, start)
        piece = samples[start - lead:start + step + pad]
        up = resample_poly(piece, OVERSAMPLING, 1, axis=0)
        inner = up[lead * OVERSAMPLING:(lead + min(step, len(samples) - start)) * OVERSAMPLING]
        peak = max(peak, float(np.abs(inner).max(initial=0.0)))
    return peak


def _loudness(samples: Samples, rate: int, in_place: bool = False) -> float | None:
    """Integrated loudness (pyloudnorm, BS.1770); None for audio shorter than one 400 ms gating
    block, or too quiet for its gates. pyloudnorm's K-weighting filters are run here a stretch at a
    time, their state carried over, into float32 as pyloudnorm keeps float32 audio: its meter, given
    the whole file, would hold several float64 copies of it at once. `in_place` weights the samples
    themselves, for a caller that needs them no more."""
    # Imported when a file is first measured: scipy.signal, which pyloudnorm loads, takes seconds to
    # import, which a run with nothing to master (or stopped before it measures) need not wait for.
    import pyloudnorm
    from scipy.signal import sosfilt  # pyloudnorm's dependency, no stubs

    meter = pyloudnorm.Meter(rate)
    if len(samples) < meter.block_size * rate:
        return None
    stages = list(meter._filters.values())  # the meter's own K-weighting, two biquads
    sections = np.array([np.concatenate([stage.b, stage.a]) for stage in stages])
    gain = math.prod(stage.passband_gain for stage in stages)
    weighted = samples if in_place else np.empty(samples.shape, np.float32)
    state = np.zeros((len(stages), 2, samples.shape[1]))
    for start in range(0, len(samples), _STRETCH):
        piece = samples[start:start + _STRETCH].astype(np.float64)
        filtered, state = sosfilt(sections, piece, axis=0, zi=state)
        weighted[start:start + _STRETCH] = filtered * gain
    loudness = float(pyloudnorm.Meter(rate, filter_class="custom").integrated_loudness(weighted))
    return loudness if math.isfinite(loudness) else None


def _speech_span(levels: npt.NDArray[np.float64], threshold_db: float) -> tuple[int, int] | None:
    """The first and one past the last block louder than the threshold; None when none is."""
    loud = np.flatnonzero(levels > 10 ** (threshold_db / 10))
    return (int(loud[0]), int(loud[-1]) + 1) if len(loud) else None


def measure(samples: Samples, rate: int) -> Measurement:
    """Measure decoded audio: float samples of shape (frames, channels) or (frames,), full scale ±1."""
    return _measured(samples, rate, spent=False)


def _measured(samples: Samples, rate: int, spent: bool) -> Measurement:
    """The measurement; `spent` samples are the caller's no more, and are overwritten as the last
    level is measured (the loudness, K-weighted in place)."""
    if samples.ndim == 1:
        samples = samples[:, np.newaxis]
    frames, channels = samples.shape
    if frames == 0:
        raise MasteringError("the file holds no audio")
    blocks = _blocks(samples, rate, BLOCK_S)
    per_window = max(1, round(FLOOR_WINDOW_S / BLOCK_S))
    if len(blocks) > per_window:
        floor = float(np.convolve(blocks[:-1], np.full(per_window, 1 / per_window), mode="valid").min())
    else:
        floor = _power(samples)
    span = _speech_span(blocks, SILENCE_DB)
    block = max(1, round(rate * BLOCK_S))
    if span is None:
        head = tail = frames
        quiet = blocks
    else:
        head, tail = span[0] * block, max(0, frames - span[1] * block)
        quiet = np.concatenate([blocks[:span[0]], blocks[span[1]:]])
    rms, peak, true_peak = _db(_power(samples)), _peak_db(_peak(samples)), _peak_db(_true_peak(samples))
    return Measurement(
        loudness_lufs=_loudness(samples, rate, in_place=spent),
        rms_db=rms,
        peak_db=peak,
        true_peak_db=true_peak,
        noise_floor_db=_db(floor),
        head_s=head / rate,
        tail_s=tail / rate,
        room_tone_db=_db(float(quiet.mean())) if len(quiet) else None,
        length_s=frames / rate,
        sample_rate=rate,
        channels=channels,
    )


def measure_file(path: Path, pcm: PcmShape | None = None) -> Measurement:
    """Decode a file with PyAV and measure it; `pcm` for a raw pcm file, which says nothing of itself."""
    decoded = _decode(path, pcm)
    return replace(_measured(decoded.samples, decoded.rate, spent=True), container=decoded.container,
                   bitrate_kbps=decoded.bitrate_kbps)


def check(m: Measurement, chosen: Preset) -> Verdict:
    """Hold a measurement to a preset's spec: the problems found, each said as the store would."""
    problems: list[str] = []

    def level(value: float | None) -> str:
        return "digital silence" if value is None else f"{value:.1f}"

    if chosen.loudness_lufs is not None:
        t = chosen.loudness_lufs
        if m.loudness_lufs is None or not t.holds(m.loudness_lufs):
            problems.append(f"integrated loudness {level(m.loudness_lufs)} LUFS, not {t.low:g} to {t.high:g}")
    if chosen.rms_db is not None:
        t = chosen.rms_db
        if m.rms_db is None or not t.holds(m.rms_db):
            problems.append(f"RMS {level(m.rms_db)} dB, not {t.low:g} to {t.high:g}")
    if chosen.peak_db is not None and m.peak_db is not None and m.peak_db > chosen.peak_db:
        problems.append(f"peak {m.peak_db:.1f} dBFS, above {chosen.peak_db:g}")
    if chosen.true_peak_db is not None and m.true_peak_db is not None and m.true_peak_db > chosen.true_peak_db:
        problems.append(f"true peak {m.true_peak_db:.1f} dBTP, above {chosen.true_peak_db:g}")
    if chosen.noise_floor_db is not None and m.noise_floor_db is not None and m.noise_floor_db > chosen.noise_floor_db:
        problems.append(f"noise floor {m.noise_floor_db:.1f} dB, above {chosen.noise_floor_db:g}")
    for name, have, want in (("head", m.head_s, chosen.head_s), ("tail", m.tail_s, chosen.tail_s)):
        if want is not None and not want.holds(have):
            problems.append(f"{have:.2f} s of room tone at the {name}, not {want.low:g} to {want.high:g}")
    if chosen.head_s is not None and m.room_tone_db is None and (m.head_s or m.tail_s):
        problems.append("the room tone is digital silence: it must be the quiet of a room")
    if chosen.max_length_s is not None and m.length_s > chosen.max_length_s:
        problems.append(f"{m.length_s / 60:.1f} minutes long, over {chosen.max_length_s / 60:g}")
    if chosen.sample_rate is not None and m.sample_rate != chosen.sample_rate:
        problems.append(f"{m.sample_rate} Hz, not {chosen.sample_rate}")
    encoding = chosen.encoding
    if encoding is not None and encoding.required and m.container is not None and (
            m.container != encoding.container or (m.bitrate_kbps or 0) < encoding.bitrate_kbps):
        written = m.container + (f" at {m.bitrate_kbps} kbps" if m.bitrate_kbps else "")
        problems.append(f"{written}, not {encoding.extension} at {encoding.bitrate_kbps} kbps")
    return Verdict(chosen.name, tuple(problems))


@dataclass(frozen=True)
class _Decoded:
    samples: Samples
    rate: int
    container: str
    bitrate_kbps: int | None


_STATED_S = 3 * 3600  # room made at once for no more than this: a longer file's is grown


def _decode(path: Path, pcm: PcmShape | None = None) -> _Decoded:
    """The whole file as float32 samples at its own rate, mono or stereo. The decoder's own planar
    float frames are taken as they are; other formats (16-bit pcm, more channels) are converted by
    FFmpeg's resampler."""
    try:
        with open_audio(path, pcm) as container:
            if not container.streams.audio:
                raise MasteringError(f"{path.name} holds no audio stream")
            stream = container.streams.audio[0]
            channels = 1 if stream.codec_context.channels == 1 else 2
            layout = channel_layout(channels)
            rate = stream.codec_context.sample_rate
            # Filled in place, frame by frame: sized by the length the file states (a little over, in
            # pages never touched), grown if it says too little.
            stated = min((container.duration or 0) / av.time_base, _STATED_S)  # a damaged header may say anything
            planar = np.empty((channels, round(stated * rate) + rate), np.float32)
            filled = 0
            for frame in planar_float(container.decode(stream), layout, rate):
                if filled + frame.samples > planar.shape[1]:
                    planar = np.concatenate([planar[:, :filled], np.empty_like(planar)], axis=1)
                for row, plane in zip(planar, frame.planes, strict=True):
                    row[filled:filled + frame.samples] = np.frombuffer(memoryview(plane), np.float32, frame.samples)
                filled += frame.samples
            kbps = round(stream.bit_rate / 1000) if stream.bit_rate else None
            found = _Decoded(planar[:, :filled].T, rate, container.format.name, kbps)  # (frames, channels), no copy
    except av.FFmpegError as exc:
        raise MasteringError(f"{path.name} cannot be decoded: {exc}") from exc
    except OSError as exc:
        raise MasteringError(f"{path.name} cannot be read: {exc.strerror or exc}") from exc
    if not len(found.samples):
        raise MasteringError(f"{path.name} holds no audio")
    return found


@dataclass(frozen=True)
class _Plan:
    """One pass through the filters: the stretch of the narration kept (source frames), the room
    tone put either side of it (frames at the preset's rate), the gain and the limiter's ceiling."""

    start: int
    end: int
    head: int
    tail: int
    gain_db: float
    ceiling_db: float

    def head_change(self, rate: int, out_rate: int) -> float:
        """Seconds by which a moment of the narration is later in the mastered file."""
        return self.head / out_rate - self.start / rate


@dataclass(frozen=True)
class _Correction:
    """What the measurement of a file that missed its spec adds to the next pass, in dB."""

    gain_db: float = 0.0
    ceiling_db: float = 0.0


# How far under the spec's peak ceiling the limiter holds the samples (or their 2x oversampling):
# the mp3 encoder's quantisation and low-pass move the peaks by some tenths of a dB.
_CEILING_MARGIN_DB = 1.0
_CORRECTION_MARGIN_DB = 0.5  # taken off the ceiling again, past what a file's peaks overshot it


def master(src: Path, dst: Path, chosen: Preset, *, pcm: PcmShape | None = None, scratch: Path | None = None,
           cancelled: Callable[[], bool] = lambda: False) -> Measurement:
    """Master `src` into `dst` to the preset's spec; returns the measurement of the file written.
    It is encoded in `scratch` (default: beside `dst`, on the same file system) and renamed into place;
    `cancelled` is asked as it goes, and a stop leaves nothing under `dst`. Caption files beside
    `src` are copied beside `dst`, moved by the change at the head."""
    encoding = chosen.encoding
    if encoding is None:
        raise MasteringError(f"the preset {chosen.name!r} makes no mastered files")
    folder = scratch if scratch is not None else dst.parent
    folder.mkdir(parents=True, exist_ok=True)
    aside = folder / f".{dst.name}.mastering-{os.getpid()}-{next(_renders)}"
    try:
        plan, rate = _render(src, pcm, chosen, encoding, aside, cancelled, _Correction())
        measured = measure_file(aside)
        if (correction := _correction(measured, chosen)) is not None:
            plan, rate = _render(src, pcm, chosen, encoding, aside, cancelled, correction)
            measured = measure_file(aside)
        moved = _moved_captions(src, plan.head_change(rate, measured.sample_rate), measured.length_s)
        dst.parent.mkdir(parents=True, exist_ok=True)
        for fmt, text in moved.items():  # before the audio: a mastered file is never without its captions
            caption = folder / f".{dst.stem}.{fmt}.mastering-{os.getpid()}-{next(_renders)}"
            try:
                caption.write_text(text, encoding="utf-8")
                os.replace(caption, dst.with_suffix(f".{fmt}"))
            finally:
                caption.unlink(missing_ok=True)
        os.replace(aside, dst)
        for fmt in set(captions.FORMATS) - set(moved):  # an earlier mastering's, of audio since narrated again
            dst.with_suffix(f".{fmt}").unlink(missing_ok=True)
    finally:
        aside.unlink(missing_ok=True)
    return measured


_renders = itertools.count()


def _render(src: Path, pcm: PcmShape | None, chosen: Preset, encoding: Encoding, to: Path,
            cancelled: Callable[[], bool], correction: _Correction) -> tuple[_Plan, int]:
    """Decode `src`, measure it for the pass, and stream it through the filters into the encoder,
    writing `to`; the plan it followed and the narration's rate. The decoded audio is let go on
    return, before the file written is decoded to be measured."""
    decoded = _decode(src, pcm)
    rate, out_rate = decoded.rate, chosen.sample_rate or decoded.rate
    plan = _plan(decoded.samples, rate, out_rate, chosen, correction,
                 _encoder_gain(encoding, out_rate, decoded.samples.shape[1]))
    speech = decoded.samples[plan.start:plan.end]
    channels = speech.shape[1]
    graph, source, sink = _graph(rate, out_rate, channels, plan, chosen)  # kept: its filters hold it weakly
    with av.open(str(to), "w", format=encoding.container) as out:
        stream = _encoder(out, encoding, out_rate, channels)
        for start in range(0, len(speech), _FRAME):
            if cancelled():
                raise MasteringCancelled("mastering was stopped")
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(speech[start:start + _FRAME].T), format="fltp",
                                               layout=channel_layout(channels))
            frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
            source.push(frame)
            for filtered in _pulled(sink):
                out.mux(stream.encode(filtered))
        source.push(None)
        for filtered in _pulled(sink):
            out.mux(stream.encode(filtered))
        out.mux(stream.encode(None))
    return plan, rate


def _encoder(out: av.container.OutputContainer, encoding: Encoding, rate: int, channels: int) -> av.AudioStream:
    """The preset's encoder, fed planar float: what LAME takes without a conversion."""
    options = {} if encoding.compression_level is None else {"compression_level": str(encoding.compression_level)}
    stream = out.add_stream(encoding.codec, rate=rate, layout=channel_layout(channels), options=options)
    assert isinstance(stream, av.AudioStream)
    stream.bit_rate = encoding.bitrate_kbps * 1000
    stream.format = "fltp"
    return stream


@functools.cache
def _encoder_gain(encoding: Encoding, rate: int, channels: int) -> float:
    """The dB the encoder puts on the level of what it encodes, the same at every frequency: LAME
    scales its input by its preset's factor (0.95 up to 160 kbps, 0.97 at 192, 1 from 256), which
    FFmpeg does not let be set. Measured once, on a tone encoded in memory and decoded back."""
    seconds, level = 1.0, 0.1
    tone = (level * np.sin(2 * np.pi * 997 / rate * np.arange(round(rate * seconds)))).astype(np.float32)
    planes = np.ascontiguousarray(np.broadcast_to(tone, (channels, len(tone))))
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=encoding.container) as out:
        stream = _encoder(out, encoding, rate, channels)
        frame = av.AudioFrame.from_ndarray(planes, format="fltp", layout=channel_layout(channels))
        frame.sample_rate = rate
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    buffer.seek(0)
    with av.open(buffer, "r", format=encoding.container) as back:
        decoded = np.concatenate([frame.to_ndarray() for frame in back.decode(audio=0)], axis=1)
    middle = decoded[:, len(tone) // 4:len(tone) * 3 // 4]  # clear of the encoder's start and end
    return 10 * math.log10(float(np.square(middle, dtype=np.float64).mean()) / (level ** 2 / 2))


def _pulled(sink: av.filter.FilterContext) -> Iterator[av.AudioFrame]:
    """The frames the filters have ready."""
    while True:
        try:
            frame = sink.pull()
        except (av.BlockingIOError, av.EOFError):
            return
        assert isinstance(frame, av.AudioFrame)
        frame.pts = None  # the encoder counts its own: the filters' time base is not the stream's
        yield frame


def _plan(samples: Samples, rate: int, out_rate: int, chosen: Preset, correction: _Correction,
          encoder_db: float) -> _Plan:
    """The pass that brings the narration to the preset's aim: its level measured once, the gain
    for it, raised by what the limiter is expected to take back and by what the encoder takes off
    (`encoder_db`, which lowers the peaks too); the room tone in place of its own leading and
    trailing silence."""
    start, end, head, tail = 0, len(samples), 0, 0
    if chosen.head_s is not None and chosen.tail_s is not None:
        # The silence is found at the level that will be silence once the gain is applied.
        span = _speech_span(_blocks(samples, rate, BLOCK_S), SILENCE_DB - _gain(samples, rate, chosen, 0))
        if span is None:
            raise MasteringError("the narration is silent: there is nothing to master")
        block, margin = max(1, round(rate * BLOCK_S)), round(rate * _SPEECH_MARGIN_S)
        start, end = max(0, span[0] * block - margin), min(len(samples), span[1] * block + margin)
        head, tail = round(chosen.head_s.aim * out_rate), round(chosen.tail_s.aim * out_rate)
    speech = samples[start:end]
    wanted = _gain(speech, rate, chosen, round((head + tail) * rate / out_rate)) + correction.gain_db - encoder_db
    ceiling = min(0.0, _ceiling(chosen) + correction.ceiling_db - encoder_db)
    peaks, power = _envelope(speech, rate)
    gain = wanted
    for _ in range(_PREDICTIONS):  # the more gain, the more the limiter takes: a few steps settle it
        gain = wanted + _limited(peaks, power, gain, ceiling)
    return _Plan(start, end, head, tail, gain, ceiling)


_ENVELOPE_S = 0.005  # the limiter's work is foreseen from the peaks and power of blocks this long
_LIMITER_ATTACK_S = 0.005  # alimiter's: how far ahead of a peak it starts to take the gain down
_LIMITER_RELEASE_S = 0.05  # and how long after it the gain takes to come back
_PREDICTIONS = 6


def _envelope(samples: Samples, rate: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64]]:
    """The sample peak and the mean square of each block of `_ENVELOPE_S`, across channels."""
    size = max(1, round(rate * _ENVELOPE_S))
    step = size * (_STRETCH // size)
    peaks, power = [], []
    for start in range(0, len(samples), step):
        piece = samples[start:start + step]
        edges = np.arange(0, len(piece), size)
        peaks.append(np.maximum.reduceat(np.abs(piece).max(axis=1), edges))
        power.append(np.add.reduceat(np.square(piece, dtype=np.float64).mean(axis=1), edges)
                     / np.diff(np.append(edges, len(piece))))
    return np.concatenate(peaks), np.concatenate(power)


def _limited(peaks: npt.NDArray[np.float32], power: npt.NDArray[np.float64], gain_db: float,
             ceiling_db: float) -> float:
    """The dB of level the limiter is expected to take from audio of this envelope at this gain.
    Each block's peak over the ceiling needs its gain taken down by that much; the limiter holds
    the reduction from its attack before the peak to its release after, and eases back within the
    release, so what it takes lies between the reduction of the peaks' own blocks and that held
    over the whole span: the mean of the two, weighted by the power of the blocks, foresees it
    within a few tenths of a dB for speech."""
    if not len(peaks) or not power.sum():
        return 0.0
    reduction = np.minimum(1.0, 10 ** ((ceiling_db - gain_db) / 20) / np.maximum(peaks, 1e-9))
    before, after = round(_LIMITER_RELEASE_S / _ENVELOPE_S), round(_LIMITER_ATTACK_S / _ENVELOPE_S)
    padded = np.pad(reduction, (before, after), constant_values=1.0)
    held = np.lib.stride_tricks.sliding_window_view(padded, before + after + 1).min(axis=1)
    total = power.sum()
    return -5 * (math.log10(float((power * reduction ** 2).sum() / total))
                 + math.log10(float((power * held ** 2).sum() / total)))


def _gain(samples: Samples, rate: int, chosen: Preset, added: int) -> float:
    """dB that bring the file to the preset's loudness or RMS aim; `added` frames of room tone will
    join it, which count in its RMS but not in its gated loudness."""
    if chosen.loudness_lufs is not None:
        loudness = _loudness(samples, rate)
        if loudness is None:
            raise MasteringError("the narration is too short or too quiet to measure its loudness")
        return chosen.loudness_lufs.aim - loudness
    if chosen.rms_db is not None:
        power = _power(samples) * len(samples) / (len(samples) + added)
        rms = _db(power)
        if rms is None:
            raise MasteringError("the narration is silent: there is nothing to master")
        return chosen.rms_db.aim - rms
    return 0.0


def _ceiling(chosen: Preset) -> float:
    """Where the limiter holds the peaks: under the spec's ceiling by what encoding may add to them."""
    ceilings = [c for c in (chosen.peak_db, chosen.true_peak_db) if c is not None]
    return min(ceilings) - _CEILING_MARGIN_DB if ceilings else 0.0


def _correction(m: Measurement, chosen: Preset) -> _Correction | None:
    """What a second pass changes for a file that missed its level or its peak ceiling; None when it
    met them (or missed only what no gain or ceiling changes, such as the narration's own noise)."""
    aim = chosen.loudness_lufs or chosen.rms_db
    level = m.loudness_lufs if chosen.loudness_lufs is not None else m.rms_db
    off = aim.aim - level if aim is not None and level is not None and not aim.holds(level) else 0.0
    over = max((peak - limit for limit, peak in ((chosen.peak_db, m.peak_db), (chosen.true_peak_db, m.true_peak_db))
                if limit is not None and peak is not None), default=0.0)
    if not off and over <= 0:
        return None
    return _Correction(off, -(over + _CORRECTION_MARGIN_DB) if over > 0 else 0.0)


def _graph(rate: int, out_rate: int, channels: int, plan: _Plan,
           chosen: Preset) -> tuple[av.filter.Graph, av.filter.FilterContext, av.filter.FilterContext]:
    """FFmpeg's filters for one pass: gain, resampling, the limiter (on an oversampling for a true
    peak ceiling), room tone. The graph, its source and its sink."""
    layout = channel_layout(channels)
    graph = av.filter.Graph()
    source = graph.add_abuffer(sample_rate=rate, format="fltp", layout=layout, time_base=Fraction(1, rate))
    over = LIMITER_OVERSAMPLING if chosen.true_peak_db is not None else 1
    chain = [source, graph.add("volume", volume=f"{plan.gain_db:.4f}dB", precision="float")]
    if rate != out_rate * over:
        chain.append(graph.add("aresample", str(out_rate * over)))
    chain.append(graph.add("alimiter", limit=f"{10 ** (plan.ceiling_db / 20):.6f}", level="false", latency="true",
                           attack=f"{_LIMITER_ATTACK_S * 1000:g}", release=f"{_LIMITER_RELEASE_S * 1000:g}"))
    if over != 1:
        chain.append(graph.add("aresample", str(out_rate)))
    if plan.head or plan.tail:
        chain += [graph.add("adelay", delays=f"{plan.head}S", all="1"), graph.add("apad", pad_len=str(plan.tail))]
    graph.link_nodes(*chain)
    last = chain[-1]
    if chosen.room_tone_db is not None:
        mix = graph.add("amix", inputs="2", normalize="0", duration="first")
        noise = graph.add("anoisesrc", sample_rate=str(out_rate), color="white", seed="1",
                          # white noise is uniform in ±amplitude: its RMS is amplitude / √3
                          amplitude=f"{10 ** (chosen.room_tone_db / 20) * math.sqrt(3):.8f}")
        spread = graph.add("aformat", channel_layouts=layout)  # the noise is one channel: in each of the narration's
        last.link_to(mix, 0, 0)
        noise.link_to(spread)
        spread.link_to(mix, 0, 1)
        last = mix
    shape = graph.add("aformat", sample_fmts="fltp", sample_rates=str(out_rate), channel_layouts=layout)
    sink = graph.add("abuffersink")
    last.link_to(shape)
    shape.link_to(sink)
    graph.configure()
    return graph, source, sink


def _moved_captions(src: Path, head_change: float, length: float) -> dict[str, str]:
    """The caption files beside the narrated file (srt, vtt: those there), each as its text for the
    mastered file: the cues moved by the change at the head and kept within the file's length."""
    moved = {}
    for fmt in captions.FORMATS:
        narrated = src.with_suffix(f".{fmt}")
        if not narrated.is_file():
            continue
        try:
            found = captions.read(narrated)
        except (av.FFmpegError, UnicodeDecodeError) as exc:
            raise MasteringError(f"{narrated.name} cannot be read as captions: {exc}") from exc
        moved[fmt] = captions.render(captions.shifted(found, head_change, length), fmt)
    return moved


@dataclass(frozen=True)
class Failure:
    """A row whose file could not be mastered, and why."""

    row: int | None
    key: str
    error: str

    def __str__(self) -> str:
        return f"row {self.row} ({self.key}): {self.error}"


@dataclass
class Pass:
    """What a run's mastering did: files made now, files already made to the preset from the same
    audio, files that could not be made, files made (now or before) that miss the spec."""

    preset: str
    mastered: int = 0
    kept: int = 0
    failures: list[Failure] = field(default_factory=list)
    off_spec: int = 0
    stopped: bool = False  # the run was stopped before every file was mastered

    @property
    def failed(self) -> bool:
        """Some row has no mastered file to the spec: the run's exit code says so, as for failed rows."""
        return bool(self.failures or self.off_spec)

    def summary(self) -> dict[str, Any]:
        return {"preset": self.preset, "mastered": self.mastered, "mastered_before": self.kept,
                "master_failed": len(self.failures), "master_off_spec": self.off_spec}


@dataclass(frozen=True)
class _Task:
    row: dict[str, Any]  # the ledger's record of the row: key, row_number, path, sha256, format, rate, channels
    relpath: str


@dataclass(frozen=True)
class _Made:
    task: _Task
    measured: Measurement | None = None
    bytes: int = 0
    sha256: str | None = None
    error: str | None = None


def master_rows(ledger: Ledger, root: Path, scratch: Path, chosen: Preset, stop: Callable[[], bool],
                workers: int | None = None) -> Pass:
    """Master every row the ledger holds as done whose mastered file is missing, or was made to
    another preset or from other audio, several files at once. Each is recorded in the ledger as it
    is made (or fails), so a stopped run leaves the rest to the next. A file that fails is recorded
    and reported; the others go on."""
    outcome = Pass(chosen.name)
    tasks: list[_Task] = []
    done = ledger.done_rows()
    narrated = {row["path"]: row["row_number"] for row, _ in done}
    claimed: dict[str, int | None] = {}
    for row, made in done:
        relpath = mastered_relpath(row["path"], chosen)
        clash = (f"row {claimed[relpath]}'s mastered file is {relpath} too" if relpath in claimed  # a.wav and a.mp3
                 else f"row {narrated[relpath]}'s narrated file is {relpath}" if relpath in narrated else None)
        if clash is not None:
            _record_failure(ledger, outcome, chosen, _Made(_Task(row, relpath), error=(
                f"{clash}: give the rows names that keep them apart")))
            continue
        claimed[relpath] = row["row_number"]
        if _current(made, row, relpath, root, chosen):
            assert made is not None
            outcome.kept += 1
            outcome.off_spec += not made["passed"]
        else:
            tasks.append(_Task(row, relpath))
    if not tasks:
        return outcome
    log.info("mastering", preset=chosen.name, files=len(tasks), mastered_before=outcome.kept)
    failed = False
    budget = MemoryBudget()
    with ThreadPoolExecutor(max_workers=workers or cpus(), thread_name_prefix="batchtts-master") as pool:
        futures = [pool.submit(_master_one, task, root, scratch, chosen, budget, lambda: failed or stop())
                   for task in tasks]
        try:
            for future in as_completed(futures):
                made_now = future.result()
                if made_now is None:
                    outcome.stopped = True
                elif made_now.measured is None:
                    _record_failure(ledger, outcome, chosen, made_now)
                else:
                    _record_made(ledger, outcome, chosen, made_now)
        except LedgerError:
            failed = True  # the workers stop at their next frame: nothing more can be recorded
            raise
    return outcome


# What mastering or measuring holds at its peak per sample: the file written, decoded in float32 and
# K-weighted in place, and pyloudnorm's copy of that; with room to spare (the narration, decoded at its
# own rate, is let go before).
_BYTES_PER_SAMPLE = 12


def memory_for(seconds: float | None, channels: int | None, rate: int) -> int:
    """The bytes mastering or measuring a file of that length is expected to hold at its peak."""
    return round((seconds or 0.0) * rate * (channels or 1) * _BYTES_PER_SAMPLE)


class MemoryBudget:
    """Bytes the files worked on at once may hold between them: a pool sized to the CPUs would
    otherwise take several hour-long chapters at a time, gigabytes each. A file larger than the whole
    budget is worked on alone."""

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity if capacity is not None else _available_memory() // 2
        self._free = self.capacity
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def held(self, size: int, stop: Callable[[], bool] = lambda: False) -> Iterator[None]:
        """Wait until `size` bytes are free and hold them; a stop ends the wait (holding nothing)."""
        size = min(size, self.capacity)
        with self._changed:
            while self._free < size and not stop():
                self._changed.wait(0.2)
            taken = size if self._free >= size else 0
            self._free -= taken
        try:
            yield
        finally:
            with self._changed:
                self._free += taken
                self._changed.notify_all()


def _available_memory() -> int:
    """Memory a process could take now: the system's available memory, within its container's limit."""
    found = [1 << 33]  # 8 GB, where neither says
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo", encoding="ascii") as f:
            found = [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")] or found
    with contextlib.suppress(OSError, ValueError):  # cgroup v2: a container's limit and what it uses
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    return max(min(found), 1 << 28)


def _current(made: dict[str, Any] | None, row: dict[str, Any], relpath: str, root: Path, chosen: Preset) -> bool:
    """Whether the row's mastered file is there as recorded, made to this preset from the row's audio."""
    if made is None or made["status"] != "done" or made["preset"] != chosen.name or made["path"] != relpath:
        return False
    if made["source_sha256"] != row["sha256"]:
        return False
    try:
        return bool(os.stat(root / relpath).st_size == made["bytes"])
    except OSError:
        return False


def _master_one(task: _Task, root: Path, scratch: Path, chosen: Preset, budget: MemoryBudget,
                stop: Callable[[], bool]) -> _Made | None:
    """Master one row's file in a worker thread; None when the run was stopped first."""
    row = task.row
    pcm = PcmShape(row["sample_rate"], row["channels"]) if row["format"] == "pcm" else None
    dst = root / task.relpath
    expected = memory_for(row["duration_s"], row["channels"], chosen.sample_rate or row["sample_rate"] or 44100)
    try:
        with budget.held(expected, stop):
            if stop():
                return None
            measured = master(root / row["path"], dst, chosen, pcm=pcm, scratch=scratch, cancelled=stop)
        with dst.open("rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        return _Made(task, measured, dst.stat().st_size, digest)
    except MasteringCancelled:
        return None
    except MasteringError as exc:
        return _Made(task, error=str(exc))
    except OSError as exc:
        return _Made(task, error=f"{exc.strerror or exc}: {exc.filename or dst}")
    except Exception as exc:  # a fault in one file's work must not stop the others
        return _Made(task, error=f"{type(exc).__name__}: {exc}")


def _record_made(ledger: Ledger, outcome: Pass, chosen: Preset, made: _Made) -> None:
    assert made.measured is not None
    row = made.task.row
    verdict = check(made.measured, chosen)
    ledger.record_mastered(row["key"], row_number=row["row_number"], status="done", preset=chosen.name,
                           source_sha256=row["sha256"], path=made.task.relpath, bytes=made.bytes, sha256=made.sha256,
                           passed=int(verdict.passed), problems="; ".join(verdict.problems) or None,
                           **made.measured.as_dict())
    ledger.commit()
    outcome.mastered += 1
    if verdict.passed:
        log.info("mastered", row=row["row_number"], id=row["key"], path=made.task.relpath, preset=chosen.name)
    else:
        outcome.off_spec += 1
        log.warning("mastered_off_spec", row=row["row_number"], id=row["key"], path=made.task.relpath,
                    preset=chosen.name, problems=list(verdict.problems))


def _record_failure(ledger: Ledger, outcome: Pass, chosen: Preset, made: _Made) -> None:
    assert made.error is not None
    row = made.task.row
    ledger.record_mastered(row["key"], row_number=row["row_number"], status="failed", preset=chosen.name,
                           source_sha256=row["sha256"], error=made.error)
    ledger.commit()
    outcome.failures.append(Failure(row["row_number"], row["key"], made.error))
    log.error("master_failed", row=row["row_number"], id=row["key"], preset=chosen.name, error=made.error)
