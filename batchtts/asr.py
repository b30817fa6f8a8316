"""Word error rates for `--verify asr`: an English row's audio recognised offline by PocketSphinx
(the `asr` extra; its wheel carries the US English model), and scored against the row's text by
jiwer, both lower-cased and without punctuation.

The recogniser holds Python's global lock for a whole utterance (seconds of audio take seconds),
so it runs in processes of its own, never in the run's threads: the event loop and the other rows'
files go on meanwhile. Each process loads the model once (about a second) and then hears row after
row; the processes live as long as the run's process.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import re
import threading
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING, Any

import av
import numpy as np

from .cores import cpus

if TYPE_CHECKING:
    import numpy.typing as npt

RATE = 16000  # what the model was trained on: audio is resampled to it, mono, 16-bit
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")  # letters and digits, with inner apostrophes (don't)


def missing() -> str | None:
    """Why `--verify asr` cannot run here; None when it can."""
    absent = [name for name in ("pocketsphinx", "jiwer") if importlib.util.find_spec(name) is None]
    if not absent:
        return None
    return f"needs {' and '.join(absent)}, which are not installed: pip install 'batchtts[asr]'"


def is_english(language: str | None) -> bool:
    """Whether a row is heard in English: the model knows no other language. A row that names none is."""
    return language is None or language.strip().lower().replace("_", "-").split("-")[0] in ("en", "eng", "english")


def words(text: str) -> list[str]:
    """The words of a text as they are compared: lower case, punctuation dropped."""
    return _WORD.findall(text.lower())


def word_error_rate(reference: str, hypothesis: str) -> float | None:
    """(substitutions + deletions + insertions) / words of the reference; None for a text of no words."""
    import jiwer

    said = words(reference)
    if not said:
        return None
    return float(jiwer.wer(" ".join(said), " ".join(words(hypothesis))))


class Listener:
    """One file's samples on their way to the recogniser: resampled as they come, heard at the end."""

    def __init__(self, rate: int, channels: int) -> None:
        self.rate = rate
        self.layout = "mono" if channels == 1 else "stereo"
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
        self._pcm: list[bytes] = []

    def feed(self, samples: npt.NDArray[np.float32]) -> None:
        """Samples of shape (frames, channels), full scale ±1."""
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples.T), format="fltp", layout=self.layout)
        frame.sample_rate = self.rate
        self._take(self._resampler.resample(frame))

    def _take(self, frames: list[av.AudioFrame]) -> None:
        self._pcm.extend(frame.to_ndarray().tobytes() for frame in frames)

    def transcript(self) -> str:
        """What the recogniser heard: blocks until a process of its own has heard the whole file."""
        self._take(self._resampler.resample(None))
        return _recognisers().submit(_recognise, b"".join(self._pcm)).result()


_pool: ProcessPoolExecutor | None = None
_pool_lock = threading.Lock()  # the run's threads ask for it at once


def _recognisers() -> ProcessPoolExecutor:
    """The processes that recognise, started when first needed: as many as the run may use cores."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ProcessPoolExecutor(max_workers=cpus(), mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_load)
        return _pool


def shutdown() -> None:
    """Stop the recogniser processes, if started: a later word error rate starts them again."""
    global _pool
    with _pool_lock:
        if _pool is not None:
            _pool.shutdown()
            _pool = None


_decoder: Any = None  # the process's recogniser, once loaded


def _load() -> None:
    global _decoder
    from pocketsphinx import Decoder  # type: ignore[import-untyped]  # no inline types, no stubs

    _decoder = Decoder(samprate=RATE, loglevel="FATAL")


def _recognise(pcm: bytes) -> str:
    """In a recogniser's process: the words heard in 16-bit mono audio at RATE."""
    _decoder.start_utt()
    _decoder.process_raw(pcm, full_utt=True)
    _decoder.end_utt()
    hypothesis = _decoder.hyp()
    return str(hypothesis.hypstr) if hypothesis is not None else ""
