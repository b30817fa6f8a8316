"""The HTTP speech client: OpenRouter's `POST /audio/speech`, or any OpenAI-compatible endpoint.

One `httpx.AsyncClient` per run, on the httpx-aiohttp transport: httpx's own pool spends ten times
the CPU per request at high concurrency (encode/httpx#3215), which caps throughput on small machines.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from email.utils import parsedate_to_datetime

import httpx
from httpx_aiohttp import AiohttpTransport

from . import __version__, tls
from .audio import is_audio
from .config import Provider, Timeouts
from .errors import HTTPStatusError, NoAnswerError, ProviderStopError, RateHint, TransportError
from .providers import SpeechRequest
from .redact import redact

_MAX_ERROR_BODY = 64 * 1024


def rate_hint(headers: httpx.Headers, now: float | None = None) -> RateHint:
    """What the answer said of its rate limit. X-RateLimit-Reset is to the millisecond, so it beats a
    Retry-After, which is rounded up to whole seconds (a limit that refills in 20 ms says "1")."""
    now = time.time() if now is None else now
    reset = _number(headers.get("x-ratelimit-reset"))
    if reset is not None:
        # Epoch milliseconds per OpenRouter; tolerate providers that send epoch seconds.
        wait: float | None = max(0.0, (reset / 1000 if reset > 1e11 else reset) - now)
        exact = True
    else:
        value = headers.get("retry-after", "")
        wait = _number(value)
        exact = wait is not None and not wait.is_integer()
        if wait is None and value:
            try:
                wait = parsedate_to_datetime(value).timestamp() - now
            except (TypeError, ValueError):
                wait = None
        wait = None if wait is None else max(0.0, wait)
    limit, remaining = _number(headers.get("x-ratelimit-limit")), _number(headers.get("x-ratelimit-remaining"))
    return RateHint(wait, exact, None if limit is None else int(limit), None if remaining is None else int(remaining))


def _number(value: str | None) -> float | None:
    try:
        number = float(value) if value else None
    except ValueError:
        return None
    return number if number is not None and math.isfinite(number) else None


def error_message(body: bytes, status: int) -> str:
    """The provider's own words from an error body, else the start of the body."""
    try:
        data = json.loads(body)
        error = data.get("error", data) if isinstance(data, dict) else data
        if isinstance(error, dict) and error.get("message"):
            message = str(error["message"])
            meta = error.get("metadata")
            if isinstance(meta, dict) and meta.get("raw"):
                message += f" ({str(meta['raw'])[:300]})"
            return message[:1000]
    except (ValueError, UnicodeDecodeError):
        pass
    text = body.decode("utf-8", "replace").strip()
    return text[:300] if text else httpx.codes.get_reason_phrase(status) or "no message"


def _is_error_object(body: bytes) -> bool:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and "error" in data


def describe_transport_error(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.ConnectTimeout) and not isinstance(exc.__cause__, TimeoutError):
        # httpx-aiohttp maps a refused connection to ConnectTimeout; say what happened.
        kind = "cannot connect"
    else:
        kind = {
            httpx.ConnectTimeout: "connect timed out",
            httpx.ReadTimeout: "read timed out",
            httpx.WriteTimeout: "write timed out",
            httpx.PoolTimeout: "no free connection in time",
            httpx.ConnectError: "cannot connect",
            httpx.RemoteProtocolError: "connection dropped",
            httpx.ReadError: "connection dropped mid-body",
        }.get(type(exc), "connection failed")
    detail = str(exc).strip()
    return f"{kind}: {detail}" if detail else kind


class _HTTPAudio:
    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.content_type = response.headers.get("content-type", "")
        length = response.headers.get("content-length")
        # Content-Length counts encoded bytes; compare it only when the body is sent as is.
        encoded = response.headers.get("content-encoding", "identity").lower() != "identity"
        self.content_length = int(length) if length and length.isdigit() and not encoded else None
        self.generation_id = response.headers.get("x-generation-id")

    def chunks(self) -> AsyncIterator[bytes]:
        return self._response.aiter_bytes()


class HTTPSpeechClient:
    def __init__(
        self,
        provider: Provider,
        api_key: str,
        timeouts: Timeouts,
        max_connections: int,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        headers = {"Authorization": f"Bearer {api_key}", "User-Agent": f"batchtts/{__version__}"}
        if provider.referer:
            headers["HTTP-Referer"] = provider.referer
        if provider.title:
            headers["X-Title"] = provider.title
        self._secrets = (api_key,)
        self._client = httpx.AsyncClient(
            base_url=provider.base_url,
            headers=headers,
            timeout=httpx.Timeout(connect=timeouts.connect, read=timeouts.read, write=timeouts.read, pool=None),
            limits=limits,
            transport=transport or AiohttpTransport(verify=tls.context(), limits=limits, trust_env=True),
        )

    @asynccontextmanager
    async def speak(self, request: SpeechRequest) -> AsyncIterator[_HTTPAudio]:
        answered = False
        try:
            async with self._client.stream("POST", "audio/speech", json=request.to_json()) as response:
                answered = True
                if response.status_code != 200:
                    raise await self._status_error(response)
                audio = _HTTPAudio(response)
                if not is_audio(audio.content_type):
                    body = await _read_bounded(response)
                    raise TransportError(
                        f"the provider answered 200 with {audio.content_type or 'no content type'}, not audio: "
                        f"{self._redact(error_message(body, 200))}"
                    )
                yield audio
        except httpx.TransportError as exc:
            if answered:
                raise TransportError(self._redact(describe_transport_error(exc))) from exc
            raise NoAnswerError(self._redact(f"{describe_transport_error(exc)} ({self._client.base_url})")) from exc

    async def _status_error(self, response: httpx.Response) -> HTTPStatusError:
        body = await _read_bounded(response)
        message = self._redact(error_message(body, response.status_code))
        if response.status_code in (401, 402):
            return ProviderStopError(message, response.status_code)
        if response.status_code == 404 and not _is_error_object(body):
            # Not the API's own "not found" (a JSON error object) but no API there at all: a wrong base URL.
            return ProviderStopError(f"no speech API at {response.request.url}: {message}", 404)
        return HTTPStatusError(message, response.status_code, hint=rate_hint(response.headers))

    def _redact(self, text: str) -> str:
        """The provider's words, without the key should it echo the request's headers."""
        return redact(text, self._secrets)

    async def aclose(self) -> None:
        await self._client.aclose()


async def _read_bounded(response: httpx.Response) -> bytes:
    body = b""
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) >= _MAX_ERROR_BODY:
            break
    return body
