"""Synthetic speech for load tests and rehearsals: a tone as long as the text would take to say."""

from __future__ import annotations

import functools
import hashlib
import math

from .audio import encode_mp3, pcm_content_type

RATE = 24000
SECONDS_PER_CHAR = 0.06
MIN_SECONDS = 0.2
PCM_CONTENT_TYPE = pcm_content_type(RATE)


def tone_seconds(text: str, speed: float = 1.0) -> float:
    return max(MIN_SECONDS, len(text) * SECONDS_PER_CHAR / (speed or 1.0))


@functools.lru_cache(maxsize=32)
def _one_second(hz: int) -> bytes:
    import numpy as np  # loaded by the first tone, not by every command

    # A whole number of cycles, so seconds repeat without a click at the joins.
    wave = 6000 * np.sin(np.arange(RATE) * (2 * math.pi * hz / RATE))
    samples: np.ndarray[tuple[int], np.dtype[np.int16]] = wave.astype("<i2")
    return samples.tobytes()


def _pcm(samples: int, hz: int) -> bytes:
    second = _one_second(hz)
    return (second * (samples // RATE + 1))[: samples * 2]


@functools.lru_cache(maxsize=64)
def _mp3(samples: int, hz: int) -> bytes:
    return encode_mp3(_pcm(samples, hz), RATE)


def synthesize_tone(text: str, response_format: str, speed: float = 1.0) -> tuple[bytes, str]:
    """Audio bytes and their content type. The pitch (one of 16) follows a hash of the text, so
    different rows sound different while repeated lengths hit the cache."""
    samples = int(tone_seconds(text, speed) * RATE)
    hz = 220 + 40 * (hashlib.blake2b(text.encode(), digest_size=1).digest()[0] % 16)
    if response_format == "mp3":
        return _mp3(samples, hz), "audio/mpeg"
    return _pcm(samples, hz), PCM_CONTENT_TYPE
