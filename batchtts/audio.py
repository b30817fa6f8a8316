"""Audio formats: what to ask the provider for, how to write its answer, and what the file holds.

`wav` is not a wire format: we ask for pcm and wrap it in a RIFF header whose rate and channels come
from the response's Content-Type (`audio/pcm;rate=24000;channels=1`). Nor is `flac`: we ask for pcm,
keep it raw, and encode it as the file lands (conform.py).
"""

from __future__ import annotations

import wave
from dataclasses import dataclass
from typing import BinaryIO

from .errors import RejectedError, TransportError

DEFAULT_RATE = 24000
DEFAULT_CHANNELS = 1
SAMPLE_WIDTH = 2


def encode_mp3(pcm: bytes, rate: int, channels: int = 1, kbps: int = 48) -> bytes:
    """16-bit PCM to mp3; 48 kbps is plenty for speech at 22.05 or 24 kHz."""
    import lameenc  # loaded by what encodes: `batchtts serve` and the local engine, not every command

    encoder = lameenc.Encoder()
    encoder.set_bit_rate(kbps)
    encoder.set_in_sample_rate(rate)
    encoder.set_channels(channels)
    encoder.set_quality(5)
    return bytes(encoder.encode(pcm) + encoder.flush())


def pcm_content_type(rate: int, channels: int = 1) -> str:
    return f"audio/pcm;rate={rate};channels={channels}"


PCM_FORMATS = ("pcm", "wav", "flac")  # asked of the provider as pcm


def wire_format(fmt: str) -> str:
    return "pcm" if fmt in PCM_FORMATS else fmt


def is_audio(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower().startswith("audio/")


def pcm_params(content_type: str) -> tuple[int, int]:
    """Sample rate and channels from `audio/pcm;rate=24000;channels=1`; defaults where absent."""
    rate, channels = DEFAULT_RATE, DEFAULT_CHANNELS
    for part in content_type.split(";")[1:]:
        name, _, value = part.partition("=")
        name = name.strip().lower()
        try:
            if name in ("rate", "samplerate", "sample_rate"):
                rate = int(value.strip())
            elif name == "channels":
                channels = int(value.strip())
        except ValueError:
            raise TransportError(f"unreadable Content-Type {content_type!r}") from None
    return rate, channels


@dataclass(frozen=True)
class AudioInfo:
    sample_rate: int | None
    channels: int | None
    duration_s: float | None


class AudioWriter:
    """Streams one response body into a file in the row's output format (flac: its raw pcm, encoded
    once it is whole)."""

    def __init__(self, f: BinaryIO, fmt: str, content_type: str) -> None:
        self.f = f
        self.fmt = fmt
        self.received = 0
        kind = content_type.split(";", 1)[0].strip().lower()
        if fmt in PCM_FORMATS and kind in ("audio/mpeg", "audio/mp3", "audio/wav", "audio/x-wav", "audio/ogg"):
            raise RejectedError(f"asked for raw pcm, the provider sent {kind}: this model may not offer pcm")
        self.rate: int | None = None
        self.channels: int | None = None
        self._wave: wave.Wave_write | None = None
        if fmt in PCM_FORMATS:
            rate, channels = pcm_params(content_type)
            self.rate, self.channels = rate, channels
            if fmt == "wav":
                self._wave = wave.open(f, "wb")
                self._wave.setnchannels(channels)
                self._wave.setsampwidth(SAMPLE_WIDTH)
                self._wave.setframerate(rate)

    def write(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self._wave is not None:
            self._wave.writeframesraw(chunk)
        else:
            self.f.write(chunk)

    def finish(self) -> AudioInfo:
        """Check the body is whole audio of its kind and say what it holds."""
        if self.received == 0:
            raise TransportError("the provider answered 200 with an empty body")
        if self.fmt == "mp3":
            import mutagen.mp3  # loaded by a run that writes mp3, not by `batchtts serve`

            self.f.flush()
            self.f.seek(0)
            try:
                info = mutagen.mp3.MP3(fileobj=self.f).info
            except mutagen.MutagenError as exc:
                raise TransportError(f"the body is not valid mp3: {exc}") from exc
            finally:
                self.f.seek(0, 2)
            # mutagen declares FileType.info as None (an MP3 that loads holds its MPEGInfo there), and
            # MPEGInfo sets these in code mypy cannot read.
            return AudioInfo(info.sample_rate, info.channels, round(info.length, 3))  # type: ignore[attr-defined]
        assert self.rate is not None and self.channels is not None
        frame = SAMPLE_WIDTH * self.channels
        if self.received % frame:
            raise TransportError(f"the pcm body ends mid-sample ({self.received} bytes)")
        if self._wave is not None:
            self._wave.close()
        return AudioInfo(self.rate, self.channels, round(self.received / frame / self.rate, 3))

    def close(self) -> None:
        """Release the RIFF writer; safe to call twice and after a failed body."""
        if self._wave is not None:
            self._wave.close()
