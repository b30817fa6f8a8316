"""The seam where speech comes from: a provider turns one SpeechRequest into a stream of audio.

The HTTP client (`client.py`) is one provider; anything with the same `speak` shape plugs into the
runner the same way, as transports do in httpx.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol


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
