"""eSpeak NG, embedded: real speech with no key and no network.

The library and its data come from the `espeakng-loader` wheel and are driven through ctypes in
synchronous mode, a callback collecting 16-bit samples at the engine's native rate. eSpeak NG keeps
global state and is not thread-safe, so the process has one engine and every call goes through the
one thread of `EspeakEngine.executor`.

A voice is found as the `espeak-ng -v NAME` command finds it: by the voice's file or name, else by
language (`en-gb`, `pt-br`, `es-mx`), scored as eSpeak NG scores its voices. The search runs here,
over the voice list read once, so checking a voice touches no engine state and is safe from any
thread.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import espeakng_loader

from .suggest import did_you_mean

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
    name: str  # the voice file's name, lower case: "en-us"
    description: str  # eSpeak NG's name for the voice: "English (America)"
    identifier: str  # the voice file under espeak-ng-data: "gmw/en-US"
    languages: tuple[tuple[int, str], ...]  # (priority, language code); a lower priority is preferred


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
        self._listed = self._list_voices()
        self.voices = sorted(self._listed, key=lambda v: v.name)
        self.variants = self._list_variants()
        self._variants = {v.lower(): v for v in self.variants}

    def _collect(self, wav: ctypes._Pointer[ctypes.c_short], count: int, events: int) -> int:
        if wav and count > 0:
            self._chunks.append(ctypes.string_at(wav, count * 2))
        return 0

    def _list_voices(self) -> list[VoiceInfo]:
        """Voices by the name espeak_SetVoiceByName takes: the voice file's name ("en-us", "fr"), in the
        library's order (by language), the order its search by name goes through them."""
        found = self._lib.espeak_ListVoices(None)
        voices = []
        i = 0
        while found[i]:
            v = found[i].contents
            identifier = v.identifier.decode()
            voices.append(VoiceInfo(identifier.rsplit("/", 1)[-1].lower(), v.name.decode(), identifier,
                                    tuple(_languages(v.languages))))
            i += 1
        return voices

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
        """Raise UnknownVoiceError unless `voice` is a voice or language, maybe with a variant: en-us+f3."""
        self.resolve(voice)

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - the process's one engine lives as long as the cache
    def resolve(self, voice: str) -> str:
        """The voice file (and variant) `voice` names, as espeak_SetVoiceByName takes it: "gmw/en+f3"
        for "en-gb+f3". Raises UnknownVoiceError, with the closest names, for a voice nothing matches."""
        name, plus, variant = voice.strip().partition("+")
        found = self._by_name(name) or self._by_language(name)
        if found is None:
            raise UnknownVoiceError(f"unknown eSpeak NG voice {name!r}{did_you_mean(name.lower(), self.names)}")
        if not plus:
            return found.identifier
        if variant.lower() not in self._variants:
            raise UnknownVoiceError(f"unknown eSpeak NG variant {variant!r}{did_you_mean(variant, self.variants)}")
        return f"{found.identifier}+{self._variants[variant.lower()]}"

    def _by_name(self, name: str) -> VoiceInfo | None:
        """The first way `espeak-ng -v` looks: the voice's name, else its file, else the file's last part."""
        wanted = name.lower()
        by_file = by_last_part = None
        for v in self._listed:
            if v.description.lower() == wanted:
                return v
            if v.identifier.lower() == wanted:
                by_file = v
            elif v.name == wanted:
                by_last_part = v
        return by_file or by_last_part

    def _by_language(self, name: str) -> VoiceInfo | None:
        """The second way: the best voice for a language code, scored as eSpeak NG's ScoreVoice does:
        the leading parts of the code that match count, parts asked for but not matched cost, and so do
        parts the voice's language has beyond them, then the voice's priority for that language. Ties
        go to the voice whose name sorts first, as in the library."""
        if not name:
            return None
        parts = name.lower().split("-")
        scored = []
        for v in self._listed:
            score = 0
            for priority, language in v.languages:
                theirs = language.split("-")
                matching = 0
                while matching < min(len(parts), len(theirs)) and parts[matching] == theirs[matching]:
                    matching += 1
                if matching:
                    score = max(score, (5 - (len(parts) - matching) - (len(theirs) - matching)) * 100 - priority * 2)
            if score > 0:
                scored.append((-score, v.description.encode(), v))
        return min(scored, key=lambda s: s[:2])[2] if scored else None

    @functools.cached_property
    def names(self) -> list[str]:
        """Every voice file name and language code a voice answers to (Cherokee's mixed-case code,
        for one, is listed but not matched, by the library either)."""
        languages = {lang for v in self.voices for _, lang in v.languages if self._by_language(lang) is not None}
        return sorted({v.name for v in self.voices} | languages)

    def synthesize(self, text: str, voice: str, speed: float | None = None) -> bytes:
        """16-bit mono samples at `sample_rate`. Call only from `executor`."""
        if self._lib.espeak_SetVoiceByName(self.resolve(voice).encode()) != 0:
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


def _languages(packed: int | None) -> Iterator[tuple[int, str]]:
    """espeak_VOICE.languages: a priority byte, then a language code ending in NUL, until a zero byte."""
    if not packed:
        return
    data = ctypes.cast(packed, ctypes.POINTER(ctypes.c_ubyte))
    i = 0
    while data[i]:
        priority, start = data[i], i + 1
        i = start
        while data[i]:
            i += 1
        yield priority, bytes(data[start:i]).decode()
        i += 1


_lock = threading.Lock()
_engine: EspeakEngine | None = None


def engine() -> EspeakEngine:
    """The process's one engine, loaded on first use."""
    global _engine
    with _lock:
        if _engine is None:
            _engine = EspeakEngine()
        return _engine
