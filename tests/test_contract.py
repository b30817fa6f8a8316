"""Contract tests: `batchtts serve` answers in the shapes OpenRouter documents, so a client proven against
it is proven against the API and not against itself.

Every expected value here is a literal copied from ../shared/spec/openrouter-audio-speech.openapi.md
(`paths./audio/speech.post` and `components.schemas`), or, where that spec is silent (rate-limit
headers, the model list), from OpenRouter's documentation, as each comment says. None comes from
batchtts's own code.
"""

from __future__ import annotations

import sys
import time
from array import array
from typing import Any

import httpx
import miniaudio
import pytest
from conftest import Server, http

# requestBody.content.application/json.example
SPEC_REQUEST = {"input": "Hello world", "model": "elevenlabs/eleven-turbo-v2", "response_format": "pcm", "speed": 1,
                "voice": "alloy"}
# responses.<status>.content.application/json.example.error.message
SPEC_MESSAGES = {
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
# components.schemas.BadRequestResponse (and each other *Response): properties, and required: [error]
ERROR_BODY_KEYS = {"error", "openrouter_metadata", "user_id"}
# components.schemas.BadRequestResponseErrorData (and each other *ErrorData): properties, and required: [code, message]
ERROR_DATA_KEYS = {"code", "message", "metadata"}
# responses.200.content.audio/*.schema.description: "audio/mpeg for mp3, audio/pcm for pcm — 16-bit little-endian"
MP3_TYPE = "audio/mpeg"
PCM_TYPE = "audio/pcm"
# OpenAI's pcm, which OpenRouter passes on: 24 kHz mono. The spec names the media type only.
PCM_CONTENT_TYPE = "audio/pcm;rate=24000;channels=1"


def speak(server: Server, headers: dict[str, str] | None = None, **changes: Any) -> httpx.Response:
    """The spec's example request, with `changes`, to the server's speech endpoint."""
    return http.post(f"{server.url}/audio/speech", json={**SPEC_REQUEST, **changes}, headers=headers, timeout=10)


def media_type(response: httpx.Response) -> str:
    return response.headers["content-type"].split(";", 1)[0].strip().lower()


def spec_error(response: httpx.Response, status: int) -> str:
    """Check `response` is the spec's error response for `status`; return its message."""
    assert response.status_code == status, response.text
    assert media_type(response) == "application/json"
    body = response.json()
    assert "error" in body and set(body) <= ERROR_BODY_KEYS, body
    error = body["error"]
    assert {"code", "message"} <= set(error) <= ERROR_DATA_KEYS, error
    assert type(error["code"]) is int and error["code"] == status
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error.get("metadata", {}), dict | None)
    return error["message"]


def int16_le(body: bytes) -> array[int]:
    samples = array("h")
    samples.frombytes(body)
    if sys.byteorder == "big":
        samples.byteswap()
    return samples


def sounds_smooth(samples: array[int]) -> bool:
    """Whether the samples change little from one to the next for their level, as sampled speech or a tone
    does, unlike the same bytes read with the wrong byte order, which are as rough as noise."""
    level = sum(map(abs, samples)) / len(samples)
    step = sum(abs(b - a) for a, b in zip(samples, samples[1:], strict=False)) / (len(samples) - 1)
    return level > 0 and step < level / 2


@pytest.mark.parametrize("engine", ["tone", "espeak"])
def test_200_is_raw_audio_of_the_format_asked_for_with_a_generation_id(serve, engine):
    server = serve("--engine", engine)
    pcm = speak(server)
    assert pcm.status_code == 200
    assert media_type(pcm) == PCM_TYPE
    assert pcm.content and len(pcm.content) % 2 == 0  # whole 16-bit samples
    samples = int16_le(pcm.content)
    assert sounds_smooth(samples)
    samples.byteswap()
    assert not sounds_smooth(samples)  # so the order the test reads is the one the server wrote

    mp3 = speak(server, response_format="mp3")
    assert mp3.status_code == 200
    assert media_type(mp3) == MP3_TYPE
    decoded = miniaudio.mp3_read_s16(mp3.content)  # DecodeError for anything but mp3
    assert decoded.num_frames > 0 and decoded.nchannels in (1, 2)
    assert decoded.sample_rate in (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)  # MPEG's rates

    # X-Generation-Id: the id OpenRouter gives each generation; the spec file names no response header.
    ids = [response.headers.get("x-generation-id") for response in (pcm, mp3)]
    assert all(ids) and ids[0] != ids[1]


def test_pcm_declares_openais_rate_and_channels(serve):
    response = speak(serve())
    assert response.status_code == 200
    assert response.headers["content-type"].replace(" ", "") == PCM_CONTENT_TYPE


# SpeechRequest.required: model, input, voice; SpeechRequest.properties.response_format.enum: mp3, pcm
OUTSIDE_THE_SCHEMA = [{"voice": None}, {"model": None}, {"input": None}, {"response_format": "wav"}]


def test_every_refusal_is_the_specs_error_response(serve):
    server = serve()
    assert spec_error(speak(server, input="Hello [[bad]] world"), 400) == SPEC_MESSAGES[400]
    for changes in OUTSIDE_THE_SCHEMA:
        request = {k: v for k, v in {**SPEC_REQUEST, **changes}.items() if v is not None}
        response = http.post(f"{server.url}/audio/speech", json=request, timeout=10)
        assert spec_error(response, 400).startswith(SPEC_MESSAGES[400]), changes

    assert spec_error(http.get(f"{server.url}/no/such/resource", timeout=10), 404) == SPEC_MESSAGES[404]
    assert spec_error(speak(server, model="test/missing-model"), 404)

    for status in (429, 500, 502, 503, 524, 529):
        server.faults(fail_first=1, fail_statuses=[status])
        assert spec_error(speak(server, input=f"status {status}"), status) == SPEC_MESSAGES[status]
        assert speak(server, input=f"status {status}").status_code == 200  # the input's second attempt passes
    server.faults(fail_first=0, credits=0)
    assert spec_error(speak(server), 402) == SPEC_MESSAGES[402]


def test_401_without_a_key_is_the_specs_example(serve):
    server = serve("--api-key", "sk-or-contract")
    assert spec_error(speak(server), 401) == SPEC_MESSAGES[401]
    assert spec_error(speak(server, headers={"Authorization": "Bearer wrong"}), 401)
    assert speak(server, headers={"Authorization": "Bearer sk-or-contract"}).status_code == 200


def test_a_429_says_when_to_come_back_in_seconds_and_in_epoch_milliseconds(serve):
    server = serve("--limiter", "sliding", "--rate-limit", "1", "--window", "30")
    before = time.time()
    assert speak(server, input="first").status_code == 200
    sent = time.time()
    refused = speak(server, input="second")
    answered = time.time()
    assert spec_error(refused, 429) == SPEC_MESSAGES[429]
    # Retry-After is RFC 9110's delay-seconds, a whole number; X-RateLimit-Limit/Remaining/Reset are
    # OpenRouter's rate-limit headers (its errors documentation), Reset in epoch milliseconds.
    retry_after = refused.headers["retry-after"]
    assert retry_after.isdigit() and 1 <= int(retry_after) <= 30
    assert refused.headers["x-ratelimit-limit"] == "1"
    assert refused.headers["x-ratelimit-remaining"] == "0"
    reset_ms = refused.headers["x-ratelimit-reset"]
    assert reset_ms.isdigit()
    assert before * 1000 - 1 <= int(reset_ms) - 30_000 <= sent * 1000 + 1  # 30 s after the first was admitted
    assert abs(int(retry_after) - (int(reset_ms) / 1000 - answered)) <= 1  # both hints name the same instant


def models(server: Server, output_modalities: str | None) -> list[dict[str, Any]]:
    params = {} if output_modalities is None else {"output_modalities": output_modalities}
    response = http.get(f"{server.url}/models", params=params, timeout=10)
    assert response.status_code == 200 and media_type(response) == "application/json"
    body = response.json()
    assert set(body) == {"data"} and isinstance(body["data"], list)
    return body["data"]


def test_the_model_list_has_openrouters_shape_and_filters_on_output_modalities(serve):
    server = serve()
    speech = models(server, "speech")
    assert speech
    for model in speech:  # OpenRouter's Models API: the Model, Architecture, Pricing and Top Provider objects
        assert isinstance(model["id"], str) and isinstance(model["name"], str)
        assert type(model["context_length"]) is int and model["context_length"] > 0
        assert "text" in model["architecture"]["input_modalities"]
        assert "speech" in model["architecture"]["output_modalities"]
        assert all(isinstance(model["pricing"][k], str) and float(model["pricing"][k]) >= 0
                   for k in ("prompt", "completion"))
        assert type(model["top_provider"]["context_length"]) is int
    by_id = {m["id"]: m for m in speech}
    # OpenRouter lists openai/gpt-4o-mini-tts at $0.60 per million characters; OpenAI's speech models
    # take at most 4,096 characters.
    assert by_id["openai/gpt-4o-mini-tts"]["pricing"]["prompt"] == "0.0000006"
    assert by_id["openai/gpt-4o-mini-tts"]["context_length"] == 4096

    text = models(server, "text")  # OpenRouter's default: text-output models only
    assert all("text" in m["architecture"]["output_modalities"] for m in text)
    assert models(server, None) == text
    assert {m["id"] for m in models(server, "all")} >= set(by_id) | {m["id"] for m in text}


def test_each_listed_input_limit_is_the_one_enforced(serve):
    server = serve()
    for model in models(server, "speech"):
        limit = model["context_length"]
        assert speak(server, model=model["id"], input="x" * limit).status_code == 200, model["id"]
        assert spec_error(speak(server, model=model["id"], input="x" * (limit + 1)), 400).startswith(SPEC_MESSAGES[400])


def test_an_unlisted_model_is_held_to_the_strictest_listed_limit(serve):
    server = serve("--any-model")  # an endpoint that serves models it does not list
    strictest = min(m["context_length"] for m in models(server, "speech"))
    assert speak(server, model="acme/new-tts", input="y" * strictest).status_code == 200
    assert spec_error(speak(server, model="acme/new-tts", input="y" * (strictest + 1)), 400)
