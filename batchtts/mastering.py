"""Mastering: narrated files made to a store's spec (ACX, a podcast's loudness), and measured against it.

A file is measured as a listener's tools would measure it, decoded: integrated loudness by
pyloudnorm (ITU-R BS.1770), true peak on a 4x oversampling by scipy, RMS and sample peak, the noise
floor (the quietest 500 ms), and the silence at the head and the tail.

Mastering decodes with PyAV (resampling to the preset's rate with FFmpeg's resampler) and runs
FFmpeg's filters: `volume` for the gain that brings the loudness or RMS to the preset's aim, then
`alimiter` on a 4x oversampling (`aresample`), so that peaks between samples are held under the
ceiling too. A preset with room tone gets the narration's own leading and trailing silence replaced
by its head and tail, and a bed of noise (`anoisesrc`) far below the noise floor limit laid under
the whole file: stores refuse digital silence as room tone. The limiter takes back some of any gain,
so the filters are run in memory, measured and run again until the level is at its aim; the encoder
takes a little off too, which an excerpt of a long file shows before it is encoded. The file written
is measured again and checked, made again if a level still misses, and renamed into place: a final
name only ever holds a whole file.

`master_rows` is a run's mastering: every row done whose mastered file is missing or out of date,
several at once, each recorded in the ledger as it is made.
"""

from __future__ import annotations

import contextlib
import hashlib
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
import pyloudnorm
from scipy.signal import resample_poly  # type: ignore[import-untyped]  # pyloudnorm's dependency, no stubs

from .config import MasteringPreset
from .errors import BatchTTSError, LedgerError
from .ledger import Ledger
from .log import log

Samples = npt.NDArray[np.float32]  # (frames, channels), full scale at ±1

BLOCK_S = 0.01  # the silence at the head and tail is found in blocks this long
SILENCE_DB = -50.0  # a block quieter than this (RMS, dBFS) is silence
FLOOR_WINDOW_S = 0.5  # the noise floor: the RMS of the quietest stretch this long
OVERSAMPLING = 4  # for true peak, and for the limiter to see peaks between samples
_SPEECH_MARGIN_S = 0.02  # kept either side of the speech when its silences are replaced
_ATTEMPTS = 3  # encodings of one file, each corrected by the measurement of the last
_FRAME = 4096  # samples pushed into the filters at a time
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
        encoding=Encoding("mp3", "mp3", "libmp3lame", 192, required=True),
    ),
    "podcast": Preset(
        "podcast", sample_rate=44100, loudness_lufs=Target(-16.0, -17.0, -15.0), true_peak_db=-1.0,
        encoding=Encoding("mp3", "mp3", "libmp3lame", 128, required=False),
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


@dataclass(frozen=True)
class PcmShape:
    """What a raw pcm file (16-bit little-endian, no header) holds; its rate and channels are in the ledger."""

    sample_rate: int
    channels: int


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
    pad, step, peak = 64, 1 << 18, 0.0
    for start in range(0, len(samples), step):
        lead = min(pad, start)
        piece = samples[start - lead:start + step + pad]
        up = resample_poly(piece, OVERSAMPLING, 1, axis=0)
        inner = up[lead * OVERSAMPLING:(lead + min(step, len(samples) - start)) * OVERSAMPLING]
        peak = max(peak, float(np.abs(inner).max(initial=0.0)))
    return peak


def _speech_span(levels: npt.NDArray[np.float64], threshold_db: float) -> tuple[int, int] | None:
    """The first and one past the last block louder than the threshold; None when none is."""
    loud = np.flatnonzero(levels > 10 ** (threshold_db / 10))
    return (int(loud[0]), int(loud[-1]) + 1) if len(loud) else None


def measure(samples: Samples, rate: int) -> Measurement:
    """Measure decoded audio: float samples of shape (frames, channels) or (frames,), full scale ±1."""
    if samples.ndim == 1:
        samples = samples[:, np.newaxis]
    frames, channels = samples.shape
    if frames == 0:
        raise MasteringError("the file holds no audio")
    try:
        loudness: float | None = float(pyloudnorm.Meter(rate).integrated_loudness(samples))
    except ValueError:  # shorter than one 400 ms gating block
        loudness = None
    if loudness is not None and not math.isfinite(loudness):
        loudness = None
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
    return Measurement(
        loudness_lufs=loudness,
        rms_db=_db(_power(samples)),
        peak_db=_peak_db(_peak(samples)),
        true_peak_db=_peak_db(_true_peak(samples)),
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
    return replace(measure(decoded.samples, decoded.rate), container=decoded.container,
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


def _decode(path: Path, pcm: PcmShape | None = None, rate: int | None = None) -> _Decoded:
    """The whole file as float samples (at `rate`, resampled by FFmpeg, or at its own), mono or stereo."""
    try:
        with _opened(path, pcm) as container:
            if not container.streams.audio:
                raise MasteringError(f"{path.name} holds no audio stream")
            stream = container.streams.audio[0]
            channels = 1 if stream.codec_context.channels == 1 else 2
            resampler = av.AudioResampler(format="flt", layout="mono" if channels == 1 else "stereo",
                                          rate=rate or stream.codec_context.sample_rate)
            pieces = [frame.to_ndarray().reshape(-1, channels)
                      for decoded in itertools.chain(container.decode(stream), [None])
                      for frame in resampler.resample(decoded)]
            kbps = round(stream.bit_rate / 1000) if stream.bit_rate else None
            found = _Decoded(np.concatenate(pieces) if pieces else np.zeros((0, channels), np.float32),
                             rate or stream.codec_context.sample_rate, container.format.name, kbps)
    except av.FFmpegError as exc:
        raise MasteringError(f"{path.name} cannot be decoded: {exc}") from exc
    except OSError as exc:
        raise MasteringError(f"{path.name} cannot be read: {exc.strerror or exc}") from exc
    if not len(found.samples):
        raise MasteringError(f"{path.name} holds no audio")
    return found


@contextlib.contextmanager
def _opened(path: Path, pcm: PcmShape | None) -> Iterator[av.container.InputContainer]:
    if pcm is None:
        container = av.open(str(path), metadata_errors="ignore")
    else:
        container = av.open(str(path), format="s16le", options={
            "sample_rate": str(pcm.sample_rate), "ch_layout": "mono" if pcm.channels == 1 else "stereo"})
    with container:
        yield container


@dataclass(frozen=True)
class _Settings:
    """One pass through the filters: the gain before the limiter and the limiter's ceiling, in dB."""

    gain_db: float
    ceiling_db: float


@dataclass(frozen=True)
class _Tried:
    """A pass and how far off its aim it left the level, for the next pass to correct the gain by
    the limiter's response."""

    gain_db: float
    off: float


def master(src: Path, dst: Path, chosen: Preset, *, pcm: PcmShape | None = None, scratch: Path | None = None,
           cancelled: Callable[[], bool] = lambda: False) -> Measurement:
    """Master `src` into `dst` to the preset's spec; returns the measurement of the file written.
    It is encoded in `scratch` (default: beside `dst`, on the same file system) and renamed into place;
    `cancelled` is asked as it goes, and a stop leaves nothing under `dst`."""
    encoding = chosen.encoding
    if encoding is None:
        raise MasteringError(f"the preset {chosen.name!r} makes no mastered files")
    decoded = _decode(src, pcm, chosen.sample_rate)
    rate, samples = decoded.rate, decoded.samples
    head = tail = 0
    if chosen.head_s is not None and chosen.tail_s is not None:
        samples = _speech(samples, rate, chosen)
        head, tail = round(chosen.head_s.aim * rate), round(chosen.tail_s.aim * rate)
    settings = _Settings(_gain(samples, rate, chosen, head + tail), _ceiling(chosen))
    folder = scratch if scratch is not None else dst.parent
    folder.mkdir(parents=True, exist_ok=True)
    aside = folder / f".{dst.name}.mastering-{os.getpid()}-{next(_renders)}"
    try:
        processed, settings = _tuned(samples, rate, head, tail, settings, chosen, 0.0, cancelled)
        # The encoder takes a little off the level (its quantisation, its low-pass): by how much, an
        # excerpt of a long file tells (a short one is simply encoded again), and the passes in
        # memory aim that much higher.
        offset = 0.0
        if len(processed) > 3 * _EXCERPT_S * rate:
            offset = _encoding_loss(processed, rate, encoding, aside, cancelled)
            processed, settings = _tuned(samples, rate, head, tail, settings, chosen, offset, cancelled)
        for attempt in range(_ATTEMPTS):
            _encode(processed, rate, encoding, aside, cancelled)
            measured = measure_file(aside)
            off, over = _miss(_Levels.of(measured, chosen), chosen)
            if (check(measured, chosen).passed and abs(off) <= _ENCODED_CLOSE_DB) or attempt == _ATTEMPTS - 1:
                break
            offset += off
            if over:
                settings = _Settings(settings.gain_db, settings.ceiling_db - over - 0.5)
            processed, settings = _tuned(samples, rate, head, tail, settings, chosen, offset, cancelled)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(aside, dst)
    finally:
        aside.unlink(missing_ok=True)
    return measured


_renders = itertools.count()
_PASSES = 5  # passes through the filters, in memory, to bring one render to its aim
_CLOSE_DB = 0.3  # a level this near its aim needs no other pass in memory
_ENCODED_CLOSE_DB = 0.5  # nor another encoding
_EXCERPT_S = 10.0


def _tuned(samples: Samples, rate: int, head: int, tail: int, settings: _Settings, chosen: Preset, offset: float,
           cancelled: Callable[[], bool]) -> tuple[Samples, _Settings]:
    """Pass the samples through the filters until the result is `offset` dB above the preset's aim
    and under its ceiling: the limiter takes some of any gain back, by how much the last two passes tell."""
    tried: _Tried | None = None
    for _ in range(_PASSES):
        processed = _process(samples, rate, head, tail, settings, chosen, cancelled)
        off, over = _miss(_Levels.measure(processed, rate, chosen), chosen, offset)
        if abs(off) <= _CLOSE_DB and not over:
            break
        gain = settings.gain_db
        if abs(off) > _CLOSE_DB:
            response = 1.0
            if tried is not None and tried.gain_db != gain:
                response = min(1.0, max(0.1, (tried.off - off) / (gain - tried.gain_db)))
            gain += off / response
        tried = _Tried(settings.gain_db, off)
        settings = _Settings(gain, settings.ceiling_db - over - 0.5 if over else settings.ceiling_db)
    return processed, settings


@dataclass(frozen=True)
class _Levels:
    """What a pass is steered by: the level the preset aims at (loudness or RMS), and the peaks."""

    level: float | None
    peak_db: float | None
    true_peak_db: float | None

    @classmethod
    def of(cls, m: Measurement, chosen: Preset) -> _Levels:
        return cls(m.loudness_lufs if chosen.loudness_lufs is not None else m.rms_db, m.peak_db, m.true_peak_db)

    @classmethod
    def measure(cls, samples: Samples, rate: int, chosen: Preset) -> _Levels:
        """Only what the preset holds the file to: a pass in memory measures no more."""
        level: float | None = None
        if chosen.loudness_lufs is not None:
            level = float(pyloudnorm.Meter(rate).integrated_loudness(samples))
            level = level if math.isfinite(level) else None
        elif chosen.rms_db is not None:
            level = _db(_power(samples))
        peak = _peak_db(_peak(samples)) if chosen.peak_db is not None else None
        true_peak = _peak_db(_true_peak(samples)) if chosen.true_peak_db is not None else None
        return cls(level, peak, true_peak)


def _miss(found: _Levels, chosen: Preset, offset: float = 0.0) -> tuple[float, float]:
    """How many dB the level is under its aim (raised by `offset`; negative when over it), and how
    many dB the peaks are over their ceiling (0 when under it)."""
    off = 0.0
    aim = chosen.loudness_lufs or chosen.rms_db
    if aim is not None and found.level is not None:
        off = aim.aim + offset - found.level
    over = 0.0
    for limit, peak in ((chosen.peak_db, found.peak_db), (chosen.true_peak_db, found.true_peak_db)):
        if limit is not None and peak is not None:
            over = max(over, peak - limit)
    return off, over


def _encoding_loss(samples: Samples, rate: int, encoding: Encoding, aside: Path, cancelled: Callable[[], bool]) -> float:
    """The dB an encoding takes off the RMS of this audio, from an excerpt of its middle."""
    size = round(_EXCERPT_S * rate)
    start = max(0, (len(samples) - size) // 2)
    excerpt = samples[start:start + size]
    before = _db(_power(excerpt))
    _encode(excerpt, rate, encoding, aside, cancelled)
    back = _decode(aside).samples
    after = _db(_power(back))
    return before - after if before is not None and after is not None else 0.0


def _speech(samples: Samples, rate: int, chosen: Preset) -> Samples:
    """The narration without its own leading and trailing silence, found at the level that will be
    silence once the gain is applied; the preset's room tone takes their place."""
    gain = _gain(samples, rate, chosen, 0)
    span = _speech_span(_blocks(samples, rate, BLOCK_S), SILENCE_DB - gain)
    if span is None:
        raise MasteringError("the narration is silent: there is nothing to master")
    block, margin = max(1, round(rate * BLOCK_S)), round(rate * _SPEECH_MARGIN_S)
    return samples[max(0, span[0] * block - margin):span[1] * block + margin]


def _gain(samples: Samples, rate: int, chosen: Preset, added: int) -> float:
    """dB that bring the file to the preset's loudness or RMS aim; `added` frames of room tone will
    join it, which count in its RMS but not in its gated loudness."""
    if chosen.loudness_lufs is not None:
        try:
            loudness = float(pyloudnorm.Meter(rate).integrated_loudness(samples))
        except ValueError:
            loudness = -math.inf
        if not math.isfinite(loudness):
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
    """Where the limiter starts: under the spec's ceiling by what encoding may add to the peaks."""
    ceilings = [c for c in (chosen.peak_db, chosen.true_peak_db) if c is not None]
    return min(ceilings) - 1.0 if ceilings else 0.0


def _process(samples: Samples, rate: int, head: int, tail: int, settings: _Settings, chosen: Preset,
             cancelled: Callable[[], bool]) -> Samples:
    """Run the samples through FFmpeg's filters: gain, the limiter on a 4x oversampling, room tone."""
    channels = samples.shape[1]
    layout = "mono" if channels == 1 else "stereo"
    graph = av.filter.Graph()
    source = graph.add_abuffer(sample_rate=rate, format="flt", layout=layout, time_base=Fraction(1, rate))
    chain = [
        source,
        graph.add("volume", volume=f"{settings.gain_db:.4f}dB", precision="float"),
        graph.add("aresample", str(rate * OVERSAMPLING)),
        graph.add("alimiter", limit=f"{10 ** (settings.ceiling_db / 20):.6f}", level="false", latency="true"),
        graph.add("aresample", str(rate)),
    ]
    if head or tail:
        chain += [graph.add("adelay", delays=f"{head}S", all="1"), graph.add("apad", pad_len=str(tail))]
    graph.link_nodes(*chain)
    last = chain[-1]
    if chosen.room_tone_db is not None:
        mix = graph.add("amix", inputs="2", normalize="0", duration="first")
        noise = graph.add("anoisesrc", sample_rate=str(rate), color="white", seed="1",
                          # white noise is uniform in ±amplitude: its RMS is amplitude / √3
                          amplitude=f"{10 ** (chosen.room_tone_db / 20) * math.sqrt(3):.8f}")
        last.link_to(mix, 0, 0)
        noise.link_to(mix, 0, 1)
        last = mix
    shape = graph.add("aformat", sample_fmts="flt", sample_rates=str(rate), channel_layouts=layout)
    sink = graph.add("abuffersink")
    last.link_to(shape)
    shape.link_to(sink)
    graph.configure()
    pieces: list[Samples] = []

    def drain() -> None:
        while True:
            try:
                frame = sink.pull()
            except (av.BlockingIOError, av.EOFError):
                return
            assert isinstance(frame, av.AudioFrame)
            pieces.append(frame.to_ndarray().reshape(-1, channels).astype(np.float32, copy=False))

    for start, frame in _frames(samples, rate, cancelled):
        source.push(frame)
        if start % (_FRAME * 16) == 0:
            drain()
    source.push(None)
    drain()
    return np.concatenate(pieces)


def _frames(samples: Samples, rate: int, cancelled: Callable[[], bool]) -> Iterator[tuple[int, av.AudioFrame]]:
    """The samples as PyAV frames, asking `cancelled` before each."""
    layout = "mono" if samples.shape[1] == 1 else "stereo"
    for start in range(0, len(samples), _FRAME):
        if cancelled():
            raise MasteringCancelled("mastering was stopped")
        piece = np.ascontiguousarray(samples[start:start + _FRAME]).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(piece, format="flt", layout=layout)
        frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
        yield start, frame


def _encode(samples: Samples, rate: int, encoding: Encoding, to: Path, cancelled: Callable[[], bool]) -> None:
    """Write the samples to `to` with the preset's encoder, at a constant bitrate."""
    layout = "mono" if samples.shape[1] == 1 else "stereo"
    with av.open(str(to), "w", format=encoding.container) as out:
        stream = out.add_stream(encoding.codec, rate=rate, layout=layout)
        assert isinstance(stream, av.AudioStream)
        stream.bit_rate = encoding.bitrate_kbps * 1000
        for _, frame in _frames(samples, rate, cancelled):
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


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


_BYTES_PER_SAMPLE = 40  # what mastering or measuring holds at its peak per sample: pyloudnorm's filters in float64


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


def cpus() -> int:
    """The CPUs this process may run on: mastering and QC work on that many files at once."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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
