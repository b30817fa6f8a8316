"""`batchtts serve`: an OpenRouter-compatible speech server on loopback, with faults on demand.

Tests and rehearsals point the real CLI at it. It validates requests like the API against a model
table of its own (serve_models.json: a model it does not list is a 404, a voice its model does not
take a 400), answers with audio from the embedded eSpeak NG engine (or, with `engine="tone"`, a
cheap synthetic tone for load tests), and injects what production does to a batch job: latency,
error statuses, the limiters API gateways use (a token bucket, fixed or sliding windows, a cap on
requests in flight, a quota: limiters.py) with the 429 headers they send, connections cut after the headers or mid-body,
stalled bodies, exhausted credits, and answers that arrive whole but wrong (silence, half the speech). It counts every request so a test can prove what was sent twice,
and, per limiter, what a benchmark needs to set goodput against capacity.

Admin endpoints (not part of the API): `GET /_batchtts/stats` (`?log=0` for the counts alone), `POST /_batchtts/faults` (a JSON
object of ServeConfig fields to change at runtime), `POST /_batchtts/reset`. When the server has a key
they take the same bearer key as the API. Every refusal under /api/v1 and /_batchtts, theirs and
Starlette's, is the API's JSON error shape; bodies are read up to a limit only (`max_body_bytes`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import hmac
import json
import logging
import math
import random
import re
import socket
import sys
import time
import types
import typing
import uuid
from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from . import local
from .audio import encode_mp3, pcm_params
from .engine import UnknownVoiceError, engine
from .errors import UsageError
from .limiters import SLACK, FixedWindow, InFlightCap, Limiter, Quota, Refusal, SlidingWindow, TokenBucket
from .suggest import did_you_mean
from .tone import synthesize_tone

Endpoint = typing.Callable[[Request], typing.Awaitable[JSONResponse]]

ERROR_MESSAGES = {
    400: "Invalid request parameters",
    401: "Missing Authentication header",
    402: "Insufficient credits. Add more using https://openrouter.ai/credits",
    404: "Resource not found",
    429: "Rate limit exceeded",
    500: "Internal Server Error",
    502: "Provider returned error",
    503: "Service temporarily unavailable",
    524: "Request timed out. Please try again later.",
    529: "Provider returned error",
}
MODELS_FIXTURE = "serve_models.json"
INJECTED_429_WAIT = 1.0  # seconds an injected 429 asks a client to wait when `retry_after` is unset


@dataclass(frozen=True)
class Voices:
    """The voices one model takes, and what speaks each: the OpenAI names (mapped to eSpeak NG voices as
    the local engine maps them), any eSpeak NG voice (`espeak`, for local/*), and provider voice ids
    matching `ids` (ElevenLabs' 21m00Tcm4TlvDq8ikWAM), each spoken with a stand-in picked by the id, so
    a manifest's speakers still sound apart in a rehearsal."""

    names: tuple[str, ...] = ()
    espeak: bool = False
    ids: re.Pattern[str] | None = None
    example_id: str | None = None
    stand_ins: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, spec: Mapping[str, Any]) -> Voices:
        ids = spec.get("ids")
        return cls(tuple(spec.get("names", ())), bool(spec.get("espeak", False)),
                   None if ids is None else re.compile(ids["pattern"]), None if ids is None else ids.get("example"),
                   tuple(spec.get("stand_ins", ())))

    def speaker(self, voice: str) -> str:
        """The voice the engine speaks `voice` with. UnknownVoiceError says what the model takes instead."""
        if voice.lower() in self.names:
            return voice
        if self.ids is not None and self.ids.fullmatch(voice):
            pick = int.from_bytes(hashlib.sha256(voice.encode()).digest()[:4], "big")
            return self.stand_ins[pick % len(self.stand_ins)]
        if self.espeak:
            engine().check_voice(voice)  # its refusal names eSpeak NG's closest voices
            return voice
        takes = ", ".join(self.names)
        if self.ids is not None:
            takes += f", or a voice id like {self.example_id}" if self.example_id else ", or a voice id"
        raise UnknownVoiceError(f"unknown voice {voice!r}{did_you_mean(voice.lower(), self.names)}; it takes {takes}")


@dataclass(frozen=True)
class ModelTable:
    """The server's own fixture: what `GET /models` lists, and the voices of each listed speech model
    (which the listing does not show). `unlisted` are the voices of a model it does not list, served
    only with `any_model`."""

    listed: tuple[dict[str, Any], ...]
    voices: Mapping[str, Voices]
    unlisted: Voices


@functools.cache
def model_table() -> ModelTable:
    """The fixture is the server's own, not the client's tables, so a client that prices, splits or
    names models wrongly is caught. ValueError when a listed speech model has no voices, or voices
    name a model not listed: the listing and the endpoint must agree."""
    fixture = json.loads(resources.files("batchtts").joinpath(MODELS_FIXTURE).read_text(encoding="utf-8"))
    speech = {m["id"] for m in fixture["data"] if "speech" in m["architecture"]["output_modalities"]}
    if speech != set(fixture["voices"]):
        raise ValueError(f"{MODELS_FIXTURE}: the speech models listed and those with voices differ: "
                         f"{sorted(speech ^ set(fixture['voices']))}")
    voices = {model: Voices.from_json(spec) for model, spec in fixture["voices"].items()}
    return ModelTable(tuple(fixture["data"]), voices, Voices.from_json(fixture["unlisted_voices"]))


def listed_models() -> tuple[dict[str, Any], ...]:
    """The models the server lists, prices and serves, in the API's /models shape."""
    return model_table().listed


def models_listing(output_modalities: str | None) -> list[dict[str, Any]]:
    """What `GET /models` answers: as the API does, text-output models unless `output_modalities` names
    others (comma-separated) or is `all`."""
    wanted = {name.strip() for name in (output_modalities or "text").split(",")}
    return [model for model in listed_models()
            if "all" in wanted or wanted & set(model["architecture"]["output_modalities"])]


def input_limit(model_id: str) -> int:
    """A listed model's context_length, in characters for a speech model. A model the server does not
    list (served with `any_model`) is held to the strictest listed limit, which a client splitting for
    any listed model meets."""
    limits: dict[str, int] = {model["id"]: model["context_length"] for model in listed_models()}
    return limits.get(model_id, min(limits.values()))


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 0
    api_key: str | None = None
    latency: float = 0.0
    fail_rate: float = 0.0
    fail_statuses: tuple[int, ...] = (502, 503, 524, 529)
    fail_first: int = 0
    limiter: str = "fixed"
    rate_limit: float = 0.0  # requests per window (fixed, sliding), or tokens a second (bucket); 0: off
    window: float = 1.0
    burst: int = 1
    max_in_flight: int = 0
    quota: int | None = None
    quota_reset: float = 86400.0
    rate_limit_headers: str = "both"
    retry_after: float | None = None
    drop_rate: float = 0.0
    truncate_rate: float = 0.0
    # Answers that arrive whole, as valid audio, and are wrong: silence as long as the speech, or the
    # speech's first half only. Which inputs get them follows a hash of the seed and the text, so every
    # attempt at an input gets the same audio while the rate is on.
    silence_rate: float = 0.0
    short_rate: float = 0.0
    drop_first: int = 0
    truncate_first: int = 0
    stall_first: int = 0
    stall_seconds: float = 5.0
    credits: int | None = None
    max_input_chars: int | None = None  # None: each model's context_length in serve_models.json
    reject_marker: str | None = "[[bad]]"
    seed: int | None = None
    engine: str = "espeak"
    max_body_bytes: int = 1 << 20
    any_model: bool = False  # serve models the table does not list too, as an endpoint that lists less than it serves

    def __post_init__(self) -> None:
        """Limiter settings no limiter can work with are refused whether they come from flags or /faults."""
        if not self.window > 0 or not self.quota_reset > 0:
            raise ValueError("window and quota_reset must be more than 0 seconds")
        if self.burst < 1:
            raise ValueError("burst must be at least 1")
        if self.limiter in ("fixed", "sliding") and not float(self.rate_limit).is_integer():
            raise ValueError(f"a {self.limiter} window counts whole requests: the rate limit must be a whole "
                             f"number, not {self.rate_limit:g}")

    def public(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "api_key": None if self.api_key is None else "<set>"}


FIXED_FIELDS = ("host", "port", "api_key")  # the socket, and the key that guards /_batchtts/faults itself
RATE_FIELDS = ("fail_rate", "drop_rate", "truncate_rate", "silence_rate", "short_rate")
CHOICES = {"rate_limit_headers": ("retry-after", "reset", "both", "none"), "engine": ("espeak", "tone"),
           "limiter": ("bucket", "fixed", "sliding")}
RATE_SETTINGS = ("limiter", "rate_limit", "window", "burst")
QUOTA_SETTINGS = ("quota", "quota_reset")
ADMIN_MAX_BODY_BYTES = 1 << 16  # fixed, so no max_body_bytes sent to /faults can lock /faults out
BACKLOG = 2048  # connections the kernel holds until the server accepts them


def updated(config: ServeConfig, changes: object) -> ServeConfig:
    """`config` with a /faults body applied. ValueError says what is wrong, so a bad value is refused
    at once instead of failing every request after it."""
    if not isinstance(changes, dict):
        raise ValueError("the body must be a JSON object of ServeConfig fields")
    fixed = sorted(set(changes) & set(FIXED_FIELDS))
    if fixed:
        raise ValueError(f"fixed when the server starts, not changeable: {fixed}")
    fields = {f.name: f for f in dataclasses.fields(ServeConfig)}
    unknown = sorted(set(changes) - set(fields))
    if unknown:
        raise ValueError(f"unknown fields: {unknown}")
    hints = typing.get_type_hints(ServeConfig)
    for name, value in changes.items():
        if not _conforms(value, hints[name]):
            raise ValueError(f"{name} must be {fields[name].type}, not {value!r}")
        if isinstance(value, int | float) and value < 0 and name != "seed":
            raise ValueError(f"{name} must not be negative")
        if name in RATE_FIELDS and value > 1:
            raise ValueError(f"{name} must be from 0 to 1")
        if name == "fail_statuses" and not all(400 <= s <= 599 for s in value):
            raise ValueError("fail_statuses must be numbers from 400 to 599")
        if name in CHOICES and value not in CHOICES[name]:
            raise ValueError(f"{name} must be one of {list(CHOICES[name])}")
    if "fail_statuses" in changes:
        changes = {**changes, "fail_statuses": tuple(changes["fail_statuses"])}
    return dataclasses.replace(config, **changes)


def audio_fault(config: ServeConfig, text: str) -> str | None:
    """The wrong audio an input is answered with, "silence" or "short", or None: chosen by a hash of
    the seed and the text, so a test can find its rows and a retry meets the same answer."""
    if not config.silence_rate and not config.short_rate:
        return None
    roll = int.from_bytes(hashlib.sha256(f"{config.seed}:{text}".encode()).digest()[:8], "big") / 2 ** 64
    if roll < config.silence_rate:
        return "silence"
    return "short" if roll < config.silence_rate + config.short_rate else None


def misspoken(pcm: bytes, content_type: str, fault: str, response_format: str) -> tuple[bytes, str]:
    """Speech made wrong as `fault` says, in the format asked for: silence as long, or its first half."""
    rate, channels = pcm_params(content_type)
    frame = 2 * channels
    pcm = bytes(len(pcm)) if fault == "silence" else pcm[:len(pcm) // frame // 2 * frame]
    if response_format == "mp3":
        return encode_mp3(pcm, rate, channels), "audio/mpeg"
    return pcm, content_type


def rate_limiter_for(config: ServeConfig) -> Limiter | None:
    if config.rate_limit <= 0:
        return None
    if config.limiter == "bucket":
        return TokenBucket(config.rate_limit, config.burst)
    window = SlidingWindow if config.limiter == "sliding" else FixedWindow
    return window(int(config.rate_limit), config.window)


def quota_for(config: ServeConfig, origin: float) -> Quota | None:
    return None if config.quota is None else Quota(config.quota, config.quota_reset, origin)


def rate_limit_headers(config: ServeConfig, refusal: Refusal, now: float) -> list[tuple[bytes, bytes]]:
    """A 429's hints as `rate_limit_headers` asks. Retry-After is whole seconds rounded up, as gateways
    send it, unless `retry_after` overrides it; X-RateLimit-Reset is the exact instant in epoch ms."""
    headers = []
    if config.rate_limit_headers in ("retry-after", "both"):
        if config.retry_after is not None:
            value = f"{config.retry_after:g}"
        else:
            value = str(max(1, math.ceil(refusal.retry_at - now - SLACK)))
        headers.append((b"retry-after", value.encode()))
    if config.rate_limit_headers in ("reset", "both"):
        headers += [
            (b"x-ratelimit-limit", str(refusal.limit).encode()),
            (b"x-ratelimit-remaining", b"0"),
            (b"x-ratelimit-reset", str(math.ceil((refusal.retry_at - SLACK) * 1000)).encode()),
        ]
    return headers


def _conforms(value: object, hint: Any) -> bool:
    """Whether a decoded JSON value fits a ServeConfig field's type (a list stands for a tuple)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_conforms(value, arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return isinstance(value, list) and all(_conforms(v, typing.get_args(hint)[0]) for v in value)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


@dataclass
class LimiterStats:
    """What one limiter saw: goodput over its capacity is successes over the span from the first
    success to the last (time.time()), and refused are its 429s."""

    requests: int = 0
    successes: int = 0
    refused: int = 0
    first_success: float | None = None
    last_success: float | None = None


@dataclass
class Stats:
    requests: int = 0
    successes: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    by_input: Counter[str] = field(default_factory=Counter)
    log: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=200_000))
    limiters: defaultdict[str, LimiterStats] = field(default_factory=lambda: defaultdict(LimiterStats))

    def as_json(self, limiters: Iterable[Limiter]) -> dict[str, Any]:
        return {
            "requests": self.requests, "successes": self.successes, "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight, "by_status": {str(k): v for k, v in self.by_status.items()},
            "limiters": {limiter.name: {**dataclasses.asdict(self.limiters[limiter.name]), **limiter.nominal()}
                         for limiter in limiters},
            "by_input": dict(self.by_input), "log": list(self.log),
        }


class _Answered(Exception):
    """Raised by a check that has already sent the whole answer."""


class BodyTooLarge(Exception):
    """A request body over the server's limit: refused before it is buffered."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"Request body is larger than {limit} bytes")


def error_json(status: int, message: str | None = None) -> dict[str, Any]:
    """The API's error body, so a client parses the server's refusals as it parses OpenRouter's."""
    return {"error": {"code": status, "message": message or ERROR_MESSAGES.get(status, "Error")}}


def error_response(status: int, message: str | None = None, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_json(status, message), status_code=status, headers=headers)


async def _refused(request: Request, exc: HTTPException) -> JSONResponse | PlainTextResponse:
    """Starlette's own refusals: no such route (404), or a method the route does not take (405).
    Outside the API the server plays the website, whose 404 is no JSON error: that is how a client
    tells a wrong base URL from the API's own "not found"."""
    if not request.url.path.startswith(("/api/v1/", "/_batchtts/")):
        return PlainTextResponse(exc.detail, exc.status_code, exc.headers)
    return error_response(exc.status_code, ERROR_MESSAGES.get(exc.status_code, exc.detail), exc.headers)


async def _too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
    """Closing the connection is what spares the server the rest of the body."""
    return error_response(413, str(exc), {"connection": "close"})


async def _client_gone(request: Request, exc: ClientDisconnect) -> None:
    """A client that went away mid-body is nobody's error, and there is no one to answer."""


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    """A bug: the client gets the API's 500, and uvicorn logs the traceback for whoever fixes it."""
    return error_response(500)


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, or BodyTooLarge as soon as the declared or received size passes `limit`, so a
    huge upload costs the server no memory."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge(limit)
    return bytes(body)


def parse_json(raw: bytes) -> Any:
    """json.loads with nesting too deep for the parser's recursion as one more ValueError."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def key_problem(request: Request, api_key: str | None) -> str | None:
    """Why the request's bearer key is refused, or None when it may pass."""
    if api_key is None:
        return None
    auth = request.headers.get("authorization", "")
    if not auth:
        return ERROR_MESSAGES[401]
    if not hmac.compare_digest(auth.encode("latin-1"), f"Bearer {api_key}".encode()):
        return "Invalid API key"
    return None


class SpeechServer:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.started = time.time()
        self.stats = Stats()
        self.random = random.Random(config.seed)
        self.attempts: Counter[str] = Counter()
        self.in_flight = InFlightCap(config.max_in_flight)
        self.rate = rate_limiter_for(config)
        self.quota = quota_for(config, self.started)
        self.limiters = self._chain()

    def _chain(self) -> tuple[Limiter, ...]:
        """The limiters a request passes, in order: those that can give an admission back (in flight,
        quota) first, so a request the rate limiter refuses holds no place in them."""
        return tuple(limiter for limiter in (self.in_flight, self.quota, self.rate) if limiter is not None)

    def active_limiters(self) -> list[Limiter]:
        """The limiters in use: the in-flight cap always counts, but caps nothing at 0."""
        return [limiter for limiter in self.limiters if limiter is not self.in_flight or self.in_flight.limit]

    def reconfigure(self, config: ServeConfig) -> None:
        """Take /faults settings. A limiter whose settings change starts afresh, its counts with it; the
        in-flight cap only takes its new limit, since a new one would not know of the requests running."""
        old, self.config = self.config, config
        if [getattr(old, name) for name in RATE_SETTINGS] != [getattr(config, name) for name in RATE_SETTINGS]:
            for name in {old.limiter, config.limiter}:
                self.stats.limiters.pop(name, None)
            self.rate = rate_limiter_for(config)
        if [getattr(old, name) for name in QUOTA_SETTINGS] != [getattr(config, name) for name in QUOTA_SETTINGS]:
            self.stats.limiters.pop(Quota.name, None)
            self.quota = quota_for(config, self.started)
        if old.max_in_flight != config.max_in_flight:
            self.stats.limiters.pop(InFlightCap.name, None)
            self.in_flight.limit = config.max_in_flight
        self.limiters = self._chain()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The speech endpoint as a raw ASGI app, so a fault can cut the response where it likes."""
        request = Request(scope, receive)
        arrived = time.time()
        entry: dict[str, Any] = {"t": arrived, "status": None, "outcome": "error", "input_sha256": None}
        admitted: list[Limiter] = []
        self.stats.requests += 1
        self.stats.in_flight += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
        self.stats.log.append(entry)
        try:
            await self._answer(request, entry, send, admitted)
        except _Answered:
            pass
        except ClientDisconnect:
            entry["outcome"] = "disconnected"
        finally:
            self.stats.in_flight -= 1
            if entry["status"] is not None:
                self.stats.by_status[entry["status"]] += 1
            if admitted:
                self._release(admitted, entry["outcome"] == "ok")

    async def _admit(self, send: Send, entry: dict[str, Any], admitted: list[Limiter]) -> None:
        """Pass the request through each limiter, or answer the first refusal with its 429."""
        now = time.time()
        tallies = self.stats.limiters
        for limiter in self.limiters:
            tally = tallies[limiter.name]
            tally.requests += 1
            refusal = limiter.admit(now)
            if refusal is not None:
                tally.refused += 1
                await self._error(send, entry, 429, refusal.message, refusal=refusal)
            admitted.append(limiter)

    def _release(self, admitted: list[Limiter], ok: bool) -> None:
        """However the response ended (answered, refused, cut, or the client gone), the limiters that
        admitted it hear of it, so no place in flight is held forever."""
        now = time.time()
        tallies = self.stats.limiters
        for limiter in admitted:
            limiter.release(ok)
            if ok:
                tally = tallies[limiter.name]
                tally.successes += 1
                if tally.first_success is None:
                    tally.first_success = now
                tally.last_success = now

    async def _answer(self, request: Request, entry: dict[str, Any], send: Send, admitted: list[Limiter]) -> None:
        config = self.config
        try:
            raw = await read_body(request, config.max_body_bytes)
        except BodyTooLarge as exc:
            await self._error(send, entry, 413, str(exc), close=True)
        try:
            body = parse_json(raw)
        except ValueError:
            body = None
        text = body.get("input") if isinstance(body, dict) else None
        if isinstance(text, str):
            entry["input_sha256"] = hashlib.sha256(text.encode()).hexdigest()
            entry["characters"] = len(text)
            entry["model"] = body.get("model")
            entry["voice"] = body.get("voice")
            self.stats.by_input[entry["input_sha256"]] += 1

        refused = key_problem(request, config.api_key)
        if refused:
            await self._error(send, entry, 401, refused)
        if config.credits is not None and self.stats.successes >= config.credits:
            await self._error(send, entry, 402)
        await self._admit(send, entry, admitted)
        request_format, speed, speaker = await self._validate(body, send, entry)
        assert isinstance(text, str)

        attempt = self.attempts[text]
        self.attempts[text] += 1
        fault = None
        for name, count in (("fail", config.fail_first), ("drop", config.drop_first),
                            ("truncate", config.truncate_first), ("stall", config.stall_first)):
            if attempt < count:
                fault = name
                break
            attempt -= count
        if fault is None:
            roll = self.random.random()
            for name, rate in (("fail", config.fail_rate), ("drop", config.drop_rate), ("truncate", config.truncate_rate)):
                if roll < rate:
                    fault = name
                    break
                roll -= rate
        if config.latency > 0:
            await asyncio.sleep(config.latency)
        if fault == "fail":
            statuses = config.fail_statuses or (503,)
            await self._error(send, entry, statuses[(self.attempts[text] - 1) % len(statuses)])

        wrong = audio_fault(config, text)
        spoken_format = "pcm" if wrong is not None else request_format  # made wrong first, encoded after
        if config.engine == "espeak":
            audio, content_type = await local.synthesize(text, speaker, spoken_format, speed)
        else:
            audio, content_type = synthesize_tone(text, spoken_format, speed)
        if wrong is not None:
            audio, content_type = await asyncio.to_thread(misspoken, audio, content_type, wrong, request_format)
            entry["audio"] = wrong
        headers = [
            (b"content-type", content_type.encode()),
            (b"content-length", str(len(audio)).encode()),
            (b"x-generation-id", f"gen-{uuid.uuid4().hex[:20]}".encode()),
        ]
        entry["status"] = 200
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if fault == "drop":
            entry["outcome"] = "dropped"
            return  # returning mid-response makes uvicorn close the connection
        half = len(audio) // 2
        if fault == "truncate":
            entry["outcome"] = "truncated"
            await send({"type": "http.response.body", "body": audio[:half], "more_body": True})
            return
        if fault == "stall":
            entry["outcome"] = "stalled"
            await send({"type": "http.response.body", "body": audio[:half], "more_body": True})
            await asyncio.sleep(config.stall_seconds)
            await send({"type": "http.response.body", "body": audio[half:]})
            return
        self.stats.successes += 1
        entry["outcome"] = "ok"
        await send({"type": "http.response.body", "body": audio})

    async def _validate(self, body: Any, send: Send, entry: dict[str, Any]) -> tuple[str, float, str]:
        """Refuse what the API refuses; for a request it takes, its format, speed, and the voice that
        speaks it. A model it does not list is the API's 404, naming the model; a voice the model does
        not take, a 400."""
        if not isinstance(body, dict):
            await self._error(send, entry, 400, "Request body must be a JSON object")
        for name in ("model", "input", "voice"):
            value = body.get(name)
            if not isinstance(value, str) or not value.strip():
                await self._error(send, entry, 400, f"Invalid request parameters: '{name}' is required")
        request_format = body.get("response_format", "pcm")
        if request_format not in ("mp3", "pcm"):
            await self._error(send, entry, 400, f"Invalid request parameters: response_format must be mp3 or pcm, not {request_format!r}")
        speed = body.get("speed", 1.0)
        if not isinstance(speed, int | float) or isinstance(speed, bool) or not 0.25 <= speed <= 4.0:
            await self._error(send, entry, 400, "Invalid request parameters: speed must be a number from 0.25 to 4")
        model, table = body["model"], model_table()
        voices = table.voices.get(model)
        if voices is None:
            if not self.config.any_model:
                await self._error(send, entry, 404, f"Model not found: {model}{did_you_mean(model, table.voices)}")
            voices = table.unlisted
        limit = self.config.max_input_chars or input_limit(model)
        if len(body["input"]) > limit:
            await self._error(send, entry, 400, f"Invalid request parameters: input is longer than {limit} characters")
        try:
            speaker = voices.speaker(body["voice"])
        except UnknownVoiceError as exc:
            await self._error(send, entry, 400, f"Invalid request parameters: {model}: {exc}")
        if self.config.reject_marker and self.config.reject_marker in body["input"]:
            await self._error(send, entry, 400)
        return request_format, float(speed), speaker

    async def _error(self, send: Send, entry: dict[str, Any], status: int, message: str | None = None,
                     close: bool = False, refusal: Refusal | None = None) -> None:
        """Answer with the API's JSON error. A 429 carries its hints: a limiter's refusal, or for an
        injected 429 a wait of `retry_after` (INJECTED_429_WAIT when unset)."""
        config = self.config
        headers = [(b"content-type", b"application/json")]
        if close:
            headers.append((b"connection", b"close"))
        if status == 429:
            now = time.time()
            if refusal is None:
                wait = config.retry_after if config.retry_after is not None else INJECTED_429_WAIT
                refusal = Refusal(now + wait, int(config.rate_limit))
            headers += rate_limit_headers(config, refusal, now)
        body = json.dumps(error_json(status, message)).encode()
        headers.append((b"content-length", str(len(body)).encode()))
        entry["status"] = status
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        raise _Answered


def create_app(config: ServeConfig) -> Starlette:
    model_table()  # a broken fixture stops the server at its start, not at its first request
    speech = SpeechServer(config)

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"data": models_listing(request.query_params.get("output_modalities"))})

    def admin(endpoint: Endpoint) -> Endpoint:
        """Guard an admin endpoint with the server's key, when it has one: /faults could otherwise
        switch off every fault a rehearsal relies on."""
        async def guarded(request: Request) -> JSONResponse:
            refused = key_problem(request, speech.config.api_key)
            return error_response(401, refused) if refused else await endpoint(request)
        return guarded

    async def stats(request: Request) -> JSONResponse:
        data = speech.stats.as_json(speech.active_limiters())
        if request.query_params.get("log") == "0":
            data.pop("log")
            data.pop("by_input")
        return JSONResponse(data)

    async def faults(request: Request) -> JSONResponse:
        try:
            changes = parse_json(await read_body(request, ADMIN_MAX_BODY_BYTES))
            speech.reconfigure(updated(speech.config, changes))
        except ValueError as exc:
            return error_response(400, f"Invalid faults: {exc}")
        return JSONResponse(speech.config.public())

    async def reset(request: Request) -> JSONResponse:
        speech.stats = Stats(in_flight=speech.stats.in_flight)  # those still running end after the reset
        speech.attempts.clear()
        return JSONResponse({"reset": True})

    return Starlette(routes=[
        Route("/api/v1/audio/speech", speech, methods=["POST"]),
        Route("/api/v1/models", models),
        Route("/_batchtts/stats", admin(stats)),
        Route("/_batchtts/faults", admin(faults), methods=["POST"]),
        Route("/_batchtts/reset", admin(reset), methods=["POST"]),
    ], exception_handlers={  # Starlette calls each with the exception type it is registered for
        HTTPException: _refused,  # type: ignore[dict-item]
        BodyTooLarge: _too_large,  # type: ignore[dict-item]
        ClientDisconnect: _client_gone,  # type: ignore[dict-item]
        Exception: _internal_error,
    })


class _QuietCuts(logging.Filter):
    """Cut connections are what the server was asked for, not errors worth a log line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "without completing response" not in record.getMessage()


def run_server(config: ServeConfig) -> None:
    """Bind (port 0 picks a free one) and listen, print the base URL on one line, serve until
    SIGINT/SIGTERM. The socket listens before the URL is out, so a client that connects the moment it
    reads the URL waits in the backlog instead of being refused while uvicorn starts. UsageError when
    the address cannot be bound."""
    sock = socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        reason = (exc.strerror or str(exc)).lower()
        raise UsageError(f"cannot listen on {config.host}:{config.port}: {reason}") from exc
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    app = create_app(config)  # first, so a quota's periods have begun by the time the URL is out
    print(f"batchtts serve listening on http://{shown}:{port}/api/v1", flush=True)
    logging.getLogger("uvicorn.error").addFilter(_QuietCuts())
    server = uvicorn.Server(uvicorn.Config(
        app, log_level="warning", access_log=False, timeout_keep_alive=30, backlog=BACKLOG,
    ))
    # Server.run sets up uvloop and httptools when installed (the serve extra brings them), so the
    # test server is not what limits a benchmark.
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    sys.stdout.flush()
