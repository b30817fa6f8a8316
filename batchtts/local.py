"""The `local/*` models: the embedded engine as a provider, so a manifest written for OpenRouter
rehearses offline unchanged (OpenAI voice names map to distinct eSpeak NG voices).

A local row's model and voice are known good or bad before anything runs, so planning checks them
for every row: a typo fails the run before it starts, not every row one by one.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from . import manifest
from .audio import encode_mp3, pcm_content_type
from .config import Defaults
from .engine import UnknownVoiceError, engine
from .errors import ManifestError, ManifestProblem, RejectedError, UsageError
from .manifest import ManifestSummary, OnBatch, Row
from .markup import Cast
from .providers import SpeechRequest, is_local
from .speakers import voices_for
from .suggest import did_you_mean

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


@functools.lru_cache(maxsize=4096)
def local_problem(model: str, voice: str | None) -> str | None:
    """Why a local model cannot narrate with this voice (None: it can; a voice of None checks the
    model alone). Cached, as a manifest repeats a few pairs over many rows."""
    if model not in MODELS:
        return f"unknown local model {model!r}{did_you_mean(model, MODELS)}: local models are {', '.join(MODELS)}"
    if voice is None:
        return None
    try:
        engine().check_voice(espeak_voice(voice))
    except UnknownVoiceError as exc:
        openai = "" if "+" in voice else did_you_mean(voice.lower(), OPENAI_VOICES)
        reason = f"unknown voice {voice!r}{openai}" if openai else str(exc)
        return f"{reason}: list the voices with `batchtts voices --model {model}`"
    return None


def validate_manifest(path: Path, defaults: Defaults, on_row: Callable[[Row], None] | None = None,
                      cast: Cast | None = None, on_batch: OnBatch | None = None) -> ManifestSummary:
    """`manifest.validate`, refusing as well the local rows no run could narrate: an unknown local
    model or voice, in the defaults (one line) or in any row (listed with the manifest's problems).
    A list of voices, or a pool of the `cast`, is checked voice by voice; a batch `on_batch` claims
    (columnar.py) has had its voices checked there."""
    cast = cast if cast is not None else Cast()

    def problem_of(model: str, voice: str | None) -> str | None:
        voices = (None,) if voice is None else voices_for(voice, model, cast)
        return next((problem for v in voices if (problem := local_problem(model, v)) is not None), None)

    if defaults.model is not None and is_local(defaults.model):
        problem = problem_of(defaults.model, defaults.voice)
        if problem is not None:
            raise UsageError(f"the default model and voice (--model, --voice, [defaults]): {problem}")
    problems: list[ManifestProblem] = []
    count = 0

    def check(row: Row) -> None:
        nonlocal count
        problem = problem_of(row.model, row.voice) if is_local(row.model) else None
        if problem is None:
            if on_row is not None:
                on_row(row)
            return
        count += 1
        if len(problems) < ManifestError.shown:
            problems.append(ManifestProblem(row.number, problem, row.id))

    try:
        summary = manifest.validate(path, defaults, on_row=check, on_batch=on_batch)
    except ManifestError as exc:
        if not count:
            raise
        merged = sorted([*exc.problems, *problems], key=lambda p: p.row or 0)
        raise ManifestError(exc.path, merged, exc.total + count) from None
    if count:
        raise ManifestError(str(path), problems, count)
    return summary


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
        self.content_length: int | None = len(body)
        self.generation_id: str | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        yield self.body


class LocalSpeechProvider:
    @asynccontextmanager
    async def speak(self, request: SpeechRequest) -> AsyncIterator[_LocalAudio]:
        problem = local_problem(request.model, request.voice)
        if problem is not None:
            raise RejectedError(problem)
        try:
            body, content_type = await synthesize(request.input, request.voice, request.response_format, request.speed)
        except UnknownVoiceError as exc:  # a voice the engine lists but cannot load (its dictionary is missing)
            raise RejectedError(f"{exc}: list the voices with `batchtts voices --model {request.model}`") from None
        yield _LocalAudio(body, content_type)

    async def aclose(self) -> None:
        return None
