"""The `local/*` models: the embedded engine as a provider, so a manifest written for OpenRouter
rehearses offline unchanged (OpenAI voice names map to distinct eSpeak NG voices)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from .audio import encode_mp3, pcm_content_type
from .engine import UnknownVoiceError, engine
from .errors import RejectedError
from .providers import SpeechRequest

MODELS = ("local/espeak-ng",)
OPENAI_VOICES = {
    "alloy": "en-us",
    "ash": "en-us+m3",
    "ballad": "en-gb-x-rp+m2",
    "coral": "en-us+f2",
    "echo": "en+m1",
    "fable": "en-gb-x-rp+m4",
    "nova": "en-us+f3",
    "onyx": "en-us+m7",
    "sage": "en+f4",
    "shimmer": "en-us+f5",
    "verse": "en-gb-scotland+m2",
}


def espeak_voice(voice: str) -> str:
    return OPENAI_VOICES.get(voice.lower(), voice)


async def synthesize(text: str, voice: str, response_format: str, speed: float | None = None) -> tuple[bytes, str]:
    """Audio and its content type. Synthesis runs on the engine's own thread, encoding on another,
    so the event loop keeps serving network rows meanwhile."""
    eng = engine()
    loop = asyncio.get_running_loop()
    pcm = await loop.run_in_executor(eng.executor, eng.synthesize, text, espeak_voice(voice), speed)
    if response_format == "mp3":
        return await asyncio.to_thread(encode_mp3, pcm, eng.sample_rate), "audio/mpeg"
    return pcm, pcm_content_type(eng.sample_rate)


class _LocalAudio:
    def __init__(self, body: bytes, content_type: str) -> None:
        self.body = body
        self.content_type = content_type
        self.content_length = len(body)
        self.generation_id = None

    async def chunks(self) -> AsyncIterator[bytes]:
        yield self.body


class LocalSpeechProvider:
    @asynccontextmanager
    async def speak(self, request: SpeechRequest) -> AsyncIterator[_LocalAudio]:
        if request.model not in MODELS:
            raise RejectedError(f"unknown local model {request.model!r}: use one of {', '.join(MODELS)}")
        try:
            body, content_type = await synthesize(request.input, request.voice, request.response_format, request.speed)
        except UnknownVoiceError as exc:
            raise RejectedError(
                f"{exc} (voice {request.voice!r}): list the voices with `batchtts voices --model {request.model}`"
            ) from None
        yield _LocalAudio(body, content_type)

    async def aclose(self) -> None:
        return None
