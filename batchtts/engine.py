"""eSpeak NG, embedded: real speech with no key and no network.

The library and its data come from the `espeakng-loader` wheel and are driven through ctypes in
synchronous mode, a callback collecting 16-bit samples at the engine's native rate. eSpeak NG keeps
global state and is not thread-safe, so the process has one engine and every call goes through the
one thread of `EspeakEngine.executor`.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import espeakng_loader

_SYNCHRONOUS = 2
_CHARS_UTF8 = 1
_ENDPAUSE = 0x1000
_POS_CHARACTER = 1
_PARAM_RATE = 1
_DEFAULT_WPM = 175
_MIN_WPM, _MAX_WPM = 80, 450
_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class _Voice(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p), ("languages", ctypes.c_void_p), ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte), ("age", ctypes.c_ubyte), ("variant", ctypes.c_ubyte), ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int), ("spare", ctypes.c_void_p),
    ]


@dataclass(frozen=True)
class VoiceInfo:
    name: str
    description: str


class UnknownVoiceError(ValueError):
    pass


class EspeakEngine:
    def __init__(self) -> None:
        self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self._lib.espeak_Initialize.restype = ctypes.c_int
        self._lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_Voice))
        self.sample_rate = self._lib.espeak_Initialize(_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
        if self.sample_rate <= 0:
            raise RuntimeError("eSpeak NG failed to initialise")
        self._chunks: list[bytes] = []
        self._callback = _SynthCallback(self._collect)  # kept referenced for as long as the library may call it
        self._lib.espeak_SetSynthCallback(self._callback)
        self.voices = self._list_voices()
        self.variants = self._list_variants()
        self._names = {v.name for v in self.voices}

    def _collect(self, wav: ctypes.POINTER(ctypes.c_short), count: int, events: int) -> int:
        if wav and count > 0:
            self._chunks.append(ctypes.string_at(wav, count * 2))
        return 0

    def _list_voices(self) -> list[VoiceInfo]:
        """Voices by the name espeak_SetVoiceByName takes: the voice file's name ("en-us", "fr")."""
        found = self._lib.espeak_ListVoices(None)
        voices = []
        i = 0
        while found[i]:
            v = found[i].contents
            voices.append(VoiceInfo(v.identifier.decode().rsplit("/", 1)[-1].lower(), v.name.decode()))
            i += 1
        return sorted(voices, key=lambda v: v.name)

    def _list_variants(self) -> list[str]:
        wanted = ctypes.create_string_buffer(b"variant")
        spec = _Voice(languages=ctypes.addressof(wanted))
        found = self._lib.espeak_ListVoices(ctypes.byref(spec))
        variants = []
        i = 0
        while found[i]:
            variants.append(found[i].contents.identifier.decode().rsplit("/", 1)[-1])
            i += 1
        return sorted(variants, key=str.lower)

    def check_voice(self, voice: str) -> None:
        """Raise UnknownVoiceError unless `voice` is `language` or `language+variant`."""
        language, _, variant = voice.partition("+")
        if language.lower() not in self._names:
            raise UnknownVoiceError(f"unknown eSpeak NG voice {language!r}")
        if variant and variant not in self.variants:
            raise UnknownVoiceError(f"unknown eSpeak NG variant {variant!r}")

    def synthesize(self, text: str, voice: str, speed: float | None = None) -> bytes:
        """16-bit mono samples at `sample_rate`. Call only from `executor`."""
        self.check_voice(voice)
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise UnknownVoiceError(f"eSpeak NG refused voice {voice!r}")
        wpm = round(_DEFAULT_WPM * (speed or 1.0))
        self._lib.espeak_SetParameter(_PARAM_RATE, max(_MIN_WPM, min(_MAX_WPM, wpm)), 0)
        data = text.encode("utf-8") + b"\0"
        self._chunks = []
        status = self._lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8 | _ENDPAUSE, None, None)
        self._lib.espeak_Synchronize()
        if status != 0:
            raise RuntimeError(f"eSpeak NG failed to synthesise (error {status})")
        pcm, self._chunks = b"".join(self._chunks), []
        return pcm

    @functools.cached_property
    def executor(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="espeak-ng")


_lock = threading.Lock()
_engine: EspeakEngine | None = None


def engine() -> EspeakEngine:
    """The process's one engine, loaded on first use."""
    global _engine
    with _lock:
        if _engine is None:
            _engine = EspeakEngine()
        return _engine
