"""`batchtts serve` hardened: admin endpoints behind the key, bounded request bodies, every refusal in
the API's JSON error shape, quiet client disconnects, start-up mistakes as usage errors. And it
rehearses any manifest: its own model table answers an unknown model with the API's 404, knows each
model's voices (provider voice ids spoken with a stand-in), and lists its models as the API does."""

from __future__ import annotations

import hashlib
import json
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import FAST_RETRY, Server, cli, http, ledger_rows, wait_for, write_csv

from batchtts import models
from batchtts.config import Provider, Timeouts
from batchtts.engine import engine
from batchtts.server import MODELS_FIXTURE, ServeConfig, model_table

SPEECH = {"model": "openai/gpt-4o-mini-tts", "input": "hello", "voice": "alloy"}
DEEP = b"[" * 5000 + b"]" * 5000
MiB = 1 << 20
MAX_BODY = ServeConfig().max_body_bytes


def assert_json_error(response: httpx.Response, status: int) -> str:
    """The API's error shape: {"error": {"code": N, "message": "..."}}; returns the message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == status and isinstance(error["message"], str) and error["message"]
    return error["message"]


def vm_kib(pid: int, field: str) -> int:
    """A /proc/PID/status figure in KiB: VmRSS (resident now) or VmHWM (the peak so far)."""
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith(f"{field}:"))
    return int(line.split()[1])


def open_socket(server: Server, abortive: bool = False) -> socket.socket:
    """A raw connection to the server; `abortive` makes close() a reset rather than a FIN."""
    address = urlsplit(server.url)
    sock = socket.create_connection((address.hostname, address.port), timeout=5)
    if abortive:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return sock


def stderr_after_stop(server: Server) -> str:
    server.process.terminate()
    return server.process.communicate(timeout=10)[1]


def test_admin_endpoints_take_the_servers_key(serve):
    server = serve("--api-key", "k")
    calls = [("GET", "stats", None), ("POST", "faults", {"latency": 0.01}), ("POST", "reset", None)]
    for method, name, body in calls:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k"}):
            response = http.request(method, f"{server.admin}/{name}", json=body, headers=headers, timeout=5)
            assert_json_error(response, 401)
    assert http.get(f"{server.admin}/stats", timeout=5).json()["error"]["message"] == "Missing Authentication header"
    assert http.get(f"{server.admin}/stats?log=0", timeout=5).json()["error"]["code"] == 401
    assert server.process.poll() is None

    key = {"Authorization": "Bearer k"}
    assert http.post(f"{server.admin}/faults", json={}, headers=key, timeout=5).json()["latency"] == 0.0
    assert http.post(f"{server.admin}/faults", json={"latency": 0.01}, headers=key, timeout=5).json()["latency"] == 0.01
    assert http.post(f"{server.admin}/reset", headers=key, timeout=5).json() == {"reset": True}
    assert http.get(f"{server.admin}/stats", headers=key, timeout=5).json()["requests"] == 0


def test_admin_endpoints_stay_open_on_a_server_without_a_key(serve):
    server = serve()
    assert server.faults(latency=0.01)["latency"] == 0.01
    assert http.post(f"{server.admin}/reset", timeout=5).json() == {"reset": True}
    assert server.stats()["requests"] == 0


def test_faults_cannot_change_the_key(serve):
    server = serve("--api-key", "k")
    key = {"Authorization": "Bearer k"}
    for value in (None, "mine"):
        response = http.post(f"{server.admin}/faults", json={"api_key": value}, headers=key, timeout=5)
        assert "api_key" in assert_json_error(response, 400)
    assert_json_error(http.post(f"{server.url}/audio/speech", json=SPEECH, timeout=5), 401)
    assert http.post(f"{server.url}/audio/speech", json=SPEECH, headers=key, timeout=5).status_code == 200

    keyless = serve()
    assert "api_key" in assert_json_error(http.post(f"{keyless.admin}/faults", json={"api_key": "x"}, timeout=5), 400)
    assert http.post(f"{keyless.url}/audio/speech", json=SPEECH, timeout=5).status_code == 200


BAD_FAULTS = [
    (b"[1, 2]", "JSON object"),
    (b'"latency"', "JSON object"),
    (b"{", "Expecting"),
    (DEEP, "nested too deeply"),
    (b'{"latency": "x"}', "latency must be float"),
    (b'{"latency": NaN}', "latency must be float"),
    (b'{"fail_first": 1.5}', "fail_first must be int"),
    (b'{"fail_rate": 2}', "fail_rate must be from 0 to 1"),
    (b'{"latency": -1}', "latency must not be negative"),
    (b'{"fail_statuses": "503"}', "fail_statuses must be"),
    (b'{"fail_statuses": [200]}', "from 400 to 599"),
    (b'{"engine": "loud"}', "engine must be one of"),
    (b'{"nope": 1}', "unknown fields: ['nope']"),
    (b'{"port": 1}', "port"),
]


def test_faults_refuses_a_bad_body_with_a_json_400_and_changes_nothing(serve):
    server = serve()
    before = server.faults()
    for body, says in BAD_FAULTS:
        response = http.post(f"{server.admin}/faults", content=body, headers={"content-type": "application/json"}, timeout=5)
        assert says in assert_json_error(response, 400), body[:40]
    assert server.faults() == before
    assert http.post(f"{server.url}/audio/speech", json=SPEECH, timeout=5).status_code == 200


def test_unknown_paths_wrong_methods_and_bad_json_answer_json_errors(serve):
    server = serve()
    base = server.url.removesuffix("/api/v1")
    assert assert_json_error(http.get(f"{server.url}/nope", timeout=5), 404) == "Resource not found"
    assert_json_error(http.post(f"{server.admin}/nope", timeout=5), 404)
    outside = http.post(f"{base}/audio/speech", json=SPEECH, timeout=5)  # a base URL without /api/v1
    assert outside.status_code == 404 and not outside.headers["content-type"].startswith("application/json")
    wrong_method = http.get(f"{server.url}/audio/speech", timeout=5)
    assert_json_error(wrong_method, 405)
    assert wrong_method.headers["allow"] == "POST"
    assert_json_error(http.get(f"{server.admin}/faults", timeout=5), 405)
    assert_json_error(http.delete(f"{server.url}/models", timeout=5), 405)
    for body in (DEEP, b"{", b"\xff"):
        assert_json_error(http.post(f"{server.url}/audio/speech", content=body, timeout=5), 400)
    assert server.stats()["by_status"] == {"400": 3}
    assert server.process.poll() is None


def test_an_oversized_body_gets_413_without_being_buffered(serve):
    server = serve()
    pid = server.process.pid

    def chunks() -> Iterator[bytes]:
        for _ in range(64):
            yield b"x" * MiB

    assert http.post(f"{server.url}/audio/speech", json=SPEECH, timeout=5).status_code == 200
    rss, peak = vm_kib(pid, "VmRSS"), vm_kib(pid, "VmHWM")
    big = b"x" * (64 * MiB)
    for target in (f"{server.url}/audio/speech", f"{server.admin}/faults"):
        for content in (big, chunks()):  # declared by Content-Length, then streamed chunked
            response = http.post(target, content=content, timeout=10)
            assert "Request body is larger than" in assert_json_error(response, 413)
            assert response.headers["connection"] == "close"
    for _ in range(2):
        assert_json_error(http.post(f"{server.url}/audio/speech", content=big, timeout=10), 413)

    # Six 64 MiB bodies: buffering any one of them would pass these bounds.
    assert vm_kib(pid, "VmRSS") < rss + 32 * 1024
    assert vm_kib(pid, "VmHWM") < peak + 32 * 1024
    assert server.stats()["by_status"] == {"200": 1, "413": 4}
    just_under = {**SPEECH, "input": "hi", "pad": "x" * (MAX_BODY - 200)}
    assert http.post(f"{server.url}/audio/speech", json=just_under, timeout=5).status_code == 200

    assert server.faults(max_body_bytes=10)["max_body_bytes"] == 10  # /faults keeps its own limit
    assert_json_error(http.post(f"{server.url}/audio/speech", json=SPEECH, timeout=5), 413)
    assert server.faults(max_body_bytes=MAX_BODY)["max_body_bytes"] == MAX_BODY


def test_the_model_table_is_the_shipped_fixture_and_max_input_chars_overrides_its_limits(serve):
    server = serve()
    shipped = json.loads(resources.files("batchtts").joinpath(MODELS_FIXTURE).read_text(encoding="utf-8"))
    listed = http.get(f"{server.url}/models", params={"output_modalities": "all"}, timeout=5).json()
    assert listed == {"data": shipped["data"]}  # the voices are the server's to know, not the listing's
    limit = next(m["context_length"] for m in shipped["data"] if m["id"] == SPEECH["model"])
    assert http.post(f"{server.url}/audio/speech", json={**SPEECH, "input": "x" * limit}, timeout=5).status_code == 200

    assert server.faults(max_input_chars=10)["max_input_chars"] == 10
    too_long = http.post(f"{server.url}/audio/speech", json={**SPEECH, "input": "x" * 11}, timeout=5)
    assert "longer than 10 characters" in assert_json_error(too_long, 400)
    assert http.post(f"{server.url}/audio/speech", json={**SPEECH, "input": "x" * 10}, timeout=5).status_code == 200


def test_client_disconnects_leave_stderr_clean(serve):
    server = serve("--latency", "0.5", "--stall-first", "1", "--stall-seconds", "0.5")
    impatient = httpx.Timeout(0.1, connect=5)
    with pytest.raises(httpx.ReadTimeout):  # gone during the latency sleep
        http.post(f"{server.url}/audio/speech", json={**SPEECH, "input": "a"}, timeout=impatient)
    server.faults(latency=0)
    with pytest.raises(httpx.ReadTimeout):  # gone mid-response, while the body stalls
        with http.stream("POST", f"{server.url}/audio/speech", json={**SPEECH, "input": "b"}, timeout=impatient) as response:
            assert response.status_code == 200
            response.read()
    for path in ("/api/v1/audio/speech", "/_batchtts/faults"):  # gone mid-body, politely then abruptly
        for abortive, framing in ((False, b"Content-Length: 1000\r\n\r\n{"), (True, b"Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\n")):
            with open_socket(server, abortive) as sock:
                sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + framing)
    wait_for(lambda: server.stats()["in_flight"] == 0 and server.stats()["requests"] == 4, timeout=5)

    outcomes = [entry["outcome"] for entry in server.stats()["log"]]
    stderr = stderr_after_stop(server)
    assert "Traceback" not in stderr and "ERROR" not in stderr, stderr
    assert outcomes == ["stalled", "stalled", "disconnected", "disconnected"]


def test_the_server_takes_connections_as_soon_as_it_prints_its_url():
    """A client may connect the moment it reads the URL, before uvicorn has started."""
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "batchtts", "serve", "--port", "0", "--engine", "tone"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            address = urlsplit(proc.stdout.readline().rsplit(" ", 1)[1].strip())
            with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
                sock.sendall(f"GET {address.path}/models HTTP/1.1\r\nHost: {address.netloc}\r\n"
                             "Connection: close\r\n\r\n".encode())
                with sock.makefile("rb") as answer:
                    assert answer.readline().startswith(b"HTTP/1.1 200 ")
        finally:
            proc.kill()
            proc.wait(10)
            proc.stdout.close()


def test_a_port_in_use_is_a_one_line_usage_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("serve", "--port", str(port), "--engine", "tone", timeout=20)
    assert result.returncode == 2
    assert result.stderr == f"batchtts: cannot listen on 127.0.0.1:{port}: address already in use\n"
    assert result.stdout == ""


@pytest.mark.parametrize("args, says", [
    (["--fail-status", "5xx"], "statuses are comma-separated numbers from 400 to 599"),
    (["--fail-status", "503,200"], "statuses are comma-separated numbers from 400 to 599"),
    (["--fail-rate", "2"], "'--fail-rate': 2.0 is not in the range 0<=x<=1"),
    (["--latency", "-1"], "'--latency': -1.0 is not in the range x>=0"),
    (["--stall-first", "-1"], "'--stall-first': -1 is not in the range x>=0"),
])
def test_bad_serve_options_are_usage_errors(args, says):
    try:
        result = cli("serve", "--port", "0", "--engine", "tone", *args, timeout=20)
    except TimeoutError:
        pytest.fail(f"batchtts serve started despite {args}")
    assert result.returncode == 2
    assert says in result.stderr and "Traceback" not in result.stderr


# --- rehearsing any manifest: the model table -----------------------------------------------------

TYPO = "openai/gpt-4o-mini-ts"
ELEVEN = "elevenlabs/eleven-turbo-v2"
ELEVEN_IDS = ("21m00Tcm4TlvDq8ikWAM", "JBFqnCBsd6RMkjVDRZzb", "pNInz6obpgDQGcFmaJgB")  # ElevenLabs' premade voices


def rehearse(server: Server, manifest: Path, out: Path, *extra: str) -> tuple[int, dict[str, dict[str, Any]]]:
    """Run the real CLI against the server: its exit code and the ledger's rows by id."""
    result = cli("run", manifest, "--out", out, "--base-url", server.url, "--format", "wav", *FAST_RETRY, *extra,
                 timeout=30)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, ledger_rows(out / "ledger.sqlite")


def test_an_unknown_model_is_the_apis_404_naming_it_and_fails_its_rows(serve, tmp_path):
    server = serve()
    answer = http.post(f"{server.url}/audio/speech", json={**SPEECH, "model": TYPO}, timeout=5)
    message = assert_json_error(answer, 404)
    assert message == f"Model not found: {TYPO} (did you mean {SPEECH['model']}?)"

    manifest = write_csv(tmp_path / "m.csv", [{"id": "typo", "text": "Hello.", "voice": "alloy", "model": TYPO},
                                              {"id": "good", "text": "Hello.", "voice": "alloy"}])
    code, rows = rehearse(server, manifest, tmp_path / "out", "--model", SPEECH["model"])
    assert code == 1  # the typo fails its row, and only it, with the provider's words: not retried
    assert rows["good"]["status"] == "done"
    assert rows["typo"]["status"] == "failed" and rows["typo"]["http_status"] == 404
    assert message in rows["typo"]["error"]
    assert server.stats()["by_status"] == {"404": 2, "200": 1}

    assert server.faults(any_model=True)["any_model"] is True  # --any-model: the old "every model is served"
    assert http.post(f"{server.url}/audio/speech", json={**SPEECH, "model": TYPO, "voice": "v"}, timeout=5).status_code == 200


def test_a_model_the_provider_lacks_costs_a_few_requests_not_one_a_row(serve, tmp_path):
    from batchtts.narrator import NOT_FOUND_AFTER

    server = serve()
    rows = [{"id": f"t{i:02d}", "text": f"Row {i}.", "voice": "alloy", "model": TYPO} for i in range(20)]
    manifest = write_csv(tmp_path / "m.csv", [*rows, {"id": "good", "text": "Hello.", "voice": "alloy"}])
    code, ledger = rehearse(server, manifest, tmp_path / "out", "--model", SPEECH["model"], "--concurrency", "1")
    assert code == 1 and ledger["good"]["status"] == "done"
    assert server.stats()["by_status"] == {"404": NOT_FOUND_AFTER, "200": 1}
    typos = [ledger[row["id"]] for row in rows]
    assert all(r["status"] == "failed" and r["http_status"] == 404 and "Model not found" in r["error"] for r in typos)
    unsent = [r for r in typos if "not sent" in r["error"]]
    assert len(unsent) == len(rows) - NOT_FOUND_AFTER and all(r["attempts"] == 0 for r in unsent)


def test_a_model_with_any_audio_is_never_taken_for_missing():
    from batchtts.narrator import MissingModels

    models = MissingModels(after=2)
    models.not_found("m", "Resource not found")
    models.succeeded("m")  # a 404 was the row's (a voice id the provider lacks), not the model's
    assert not any(models.not_found("m", "Resource not found") for _ in range(5)) and models.missing == {}
    assert not models.not_found("x", "gone") and models.not_found("x", "gone") and "x" in models.missing
    assert not models.not_found("x", "gone")  # said once


def test_an_elevenlabs_manifest_rehearses_unchanged_its_voice_ids_spoken_by_stand_ins(serve, tmp_path):
    server = serve("--engine", "espeak")
    voices = (*ELEVEN_IDS, "alloy")  # OpenRouter's own example asks elevenlabs/eleven-turbo-v2 for alloy
    manifest = write_csv(tmp_path / "m.csv", [{"id": f"v{i}", "text": "The lamp is lit.", "voice": voice}
                                              for i, voice in enumerate(voices)])
    code, rows = rehearse(server, manifest, tmp_path / "out", "--model", ELEVEN)
    assert code == 0 and {row["status"] for row in rows.values()} == {"done"}
    audio = {hashlib.sha256((tmp_path / "out" / row["path"]).read_bytes()).hexdigest() for row in rows.values()}
    assert len(audio) == len(voices)  # each voice id has a stand-in of its own, so speakers stay apart
    assert server.stats()["by_status"] == {"200": len(voices)}


@pytest.mark.parametrize("engine_name", ["tone", "espeak"])
def test_a_voice_its_model_does_not_take_fails_its_row_only(serve, tmp_path, engine_name):
    server = serve("--engine", engine_name)
    openai = SPEECH["model"]
    manifest = write_csv(tmp_path / "m.csv", [
        {"id": "ok", "text": "Fine.", "voice": "nova", "model": openai},
        {"id": "id-to-openai", "text": "Wrong provider.", "voice": ELEVEN_IDS[0], "model": openai},
        {"id": "espeak-to-openai", "text": "Not an OpenAI voice.", "voice": "en-gb", "model": openai},
        {"id": "name-to-eleven", "text": "A name, not an id.", "voice": "rachel", "model": ELEVEN},
    ])
    code, rows = rehearse(server, manifest, tmp_path / "out")
    assert code == 1 and rows["ok"]["status"] == "done"
    for row_id, voice, model in (("id-to-openai", ELEVEN_IDS[0], openai), ("espeak-to-openai", "en-gb", openai),
                                 ("name-to-eleven", "rachel", ELEVEN)):
        row = rows[row_id]
        assert row["status"] == "failed" and row["http_status"] == 400, row
        assert f"{model}: unknown voice {voice!r}" in row["error"] and "it takes alloy, ash" in row["error"]
    assert "or a voice id like 21m00Tcm4TlvDq8ikWAM" in rows["name-to-eleven"]["error"]
    assert server.stats()["by_status"] == {"200": 1, "400": 3}  # a 400 is not asked again


def test_the_model_list_is_what_the_client_parses(serve):
    server = serve()
    answer = http.get(f"{server.url}/models", params={"output_modalities": "speech"}, timeout=5)
    body = answer.json()
    assert answer.status_code == 200 and set(body) == {"data"}
    for model in body["data"]:  # OpenRouter's Model object, as much of it as a speech model fills
        assert {"id", "name", "pricing", "architecture", "context_length", "top_provider"} <= set(model)
        assert model["architecture"]["input_modalities"] == ["text"]
        assert model["architecture"]["output_modalities"] == ["speech"]

    listing = models.fetch(Provider(base_url=server.url), Timeouts(connect=5, read=5))  # the client's own reading
    by_id = {model.id: model for model in listing.models}
    assert set(by_id) == set(model_table().voices)  # every model it lists, it serves, and no other
    assert by_id["openai/gpt-4o-mini-tts"].usd_per_million == pytest.approx(0.60)  # OpenRouter's listed price
    assert by_id["openai/gpt-4o-mini-tts"].max_input_chars == 4096
    assert by_id["local/espeak-ng"].usd_per_million == 0


def test_every_stand_in_is_an_espeak_ng_voice():
    """A stand-in the engine could not speak would fail, as a 500, every request that needs it."""
    table = model_table()
    for voices in (*table.voices.values(), table.unlisted):
        for stand_in in voices.stand_ins:
            engine().check_voice(stand_in)
