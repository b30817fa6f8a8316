"""The seam where speech comes from: a provider turns one SpeechRequest into a stream of audio.

The HTTP client (`client.py`) is one provider; anything with the same `speak` shape plugs into the
runner the same way, as transports do in httpx.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .errors import TransportError

if TYPE_CHECKING:
    from .config import Job

LOCAL_PREFIX = "local/"


def is_local(model: str) -> bool:
    """`local/*` models are narrated in-process by the embedded engine; all others over HTTP."""
    return model.startswith(LOCAL_PREFIX)


@dataclass(frozen=True)
class SpeechRequest:
    model: str
    input: str
    voice: str
    response_format: str
    speed: float | None = None
    provider_options: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The body as the API's SpeechRequest: optional fields only when set."""
        body: dict[str, Any] = {
            "model": self.model,
            "input": self.input,
            "voice": self.voice,
            "response_format": self.response_format,
        }
        if self.speed is not None:
            body["speed"] = self.speed
        if self.provider_options is not None:
            body["provider"] = {"options": self.provider_options}
        return body


class AudioStream(Protocol):
    content_type: str
    content_length: int | None
    generation_id: str | None

    def chunks(self) -> AsyncIterator[bytes]: ...


class SpeechProvider(Protocol):
    def speak(self, request: SpeechRequest) -> AbstractAsyncContextManager[AudioStream]:
        """Raise a SpeechError subclass for anything but a stream of audio."""
        ...

    async def aclose(self) -> None: ...


def for_job(job: Job, models: Iterable[str]) -> SpeechProvider:
    """The embedded engine for `local/*` rows; the HTTP client, and so the key, only if `models`
    (those with work left) include another."""
    from .local import LocalSpeechProvider

    remote = None
    if any(not is_local(name) for name in models):
        from .client import HTTPSpeechClient  # the HTTP stack, only for a run that sends requests

        remote = HTTPSpeechClient(job.provider, job.provider.api_key(), job.timeouts, job.concurrency)
    return RoutingProvider(LocalSpeechProvider(), remote)


class RoutingProvider:
    """One provider for the pool, so a manifest can mix local and remote rows in one run."""

    def __init__(self, local: SpeechProvider, remote: SpeechProvider | None) -> None:
        self.local = local
        self.remote = remote

    def speak(self, request: SpeechRequest) -> AbstractAsyncContextManager[AudioStream]:
        if is_local(request.model):
            return self.local.speak(request)
        if self.remote is None:
            # Only if a remote row's file vanished between planning and narrating: the run began
            # with nothing remote to do, so without a client (or a key).
            raise TransportError(f"{request.model!r} needs the remote provider, which this run did not set up: "
                                "run again")
        return self.remote.speak(request)

    async def aclose(self) -> None:
        await self.local.aclose()
        if self.remote is not None:
            await self.remote.aclose()
