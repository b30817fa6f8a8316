"""One validation pass for every setting: job file, flags, environment and Python-built jobs refused
with one line naming the setting (exit 2, no traceback) before anything is sent; local voices and
models checked per row at plan time; remote model names checked against the provider's list."""

from __future__ import annotations

import ctypes
import datetime
import json
import math
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import cli, error_message, http, ledger_rows, write_csv
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from batchtts import models as listing_module
from batchtts.cli import main
from batchtts.config import Budget, Defaults, Job, Provider, RetryPolicy, Stitching, Timeouts, load_job
from batchtts.engine import UnknownVoiceError, _Voice, engine
from batchtts.errors import ManifestError, UsageError
from batchtts.local import local_problem, validate_manifest
from batchtts.models import ModelInfo, ModelList, check_models
from batchtts.runner import run

SECRET = "sk-or-v1-0123456789abcdef"
LOCAL = "local/espeak-ng"


def refusal(tmp_path: Path, text: str | bytes) -> str:
    """What load_job says of a job file holding `text` after a valid manifest and out; one line."""
    job_file = tmp_path / "job.toml"
    if isinstance(text, bytes):
        job_file.write_bytes(text)
    else:
        job_file.write_text(f'manifest = "m.csv"\nout = "out"\n{text}\n', encoding="utf-8")
    with pytest.raises(UsageError) as caught:
        load_job(job_file)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(("text", "expected"), [
    ('concurrency = "many"', 'concurrency (--concurrency) must be a whole number, from 1 to 4096, not "many"'),
    ("concurrency = true", "concurrency (--concurrency) must be a whole number"),
    ("concurrency = 0", "from 1 to 4096, not 0"),
    ('limit = "x"', 'limit (--limit) must be a whole number, at least 0, not "x"'),
    ('requests_per_minute = "x"', 'requests_per_minute (--rpm) must be a number, more than 0, not "x"'),
    ('progress_interval = "x"', 'progress_interval (--progress-interval) must be a number, more than 0'),
    ("progress_interval = 0", "progress_interval (--progress-interval) must be a number, more than 0, not 0"),
    ('grace_seconds = "x"', 'grace_seconds (--grace) must be a number, at least 0, not "x"'),
    ("grace_seconds = -3", "grace_seconds (--grace) must be a number, at least 0, not -3"),
    ("dry_run = 1", "dry_run (--dry-run) must be true or false, not 1"),
    ('strict = "yes"', 'strict (--strict) must be true or false'),
    ('log_format = "xml"', 'log_format (--log-format) must be one of "auto", "console", "json", not "xml"'),
    ("max_runtime = nan", "max_runtime: not a duration: nan"),
    ("max_runtime = 0", "max_runtime (--max-runtime) must be a number, more than 0, not 0.0"),
    ('max_runtime = "soon"', "max_runtime: not a duration"),
    ("chunk_chars = 1.5", "chunk_chars (--chunk-chars) must be a whole number"),
    ("shard = 3", 'shard takes "I/N"'),
    ('[retry]\nmax_attempts = "3"', '[retry] max_attempts (--max-attempts) must be a whole number, at least 1, not "3"'),
    ('[retry]\nstatuses = ["x"]', '[retry] statuses must be a list of whole numbers, each from 100 to 599, not ["x"]'),
    ("[retry]\nstatuses = [429, 99]", "each from 100 to 599, not [429, 99]"),
    ("[retry]\nstatuses = 429", "[retry] statuses must be a list of whole numbers"),
    ("[retry]\nbackoff_initial = -1", "[retry] backoff_initial (--backoff-initial) must be a number, at least 0"),
    ("[retry]\nmax_row_seconds = 0", "[retry] max_row_seconds (--max-row-seconds) must be a number, more than 0"),
    ('[timeouts]\nread = "slow"', '[timeouts] read (--timeout) must be a number, more than 0, not "slow"'),
    ("[timeouts]\nconnect = -1", "[timeouts] connect (--connect-timeout) must be a number, more than 0, not -1"),
    ("[timeouts]\nread = inf", "[timeouts] read (--timeout) must be a number, more than 0, not Infinity"),
    ("[timeouts]\nread = 1979-05-27", '[timeouts] read (--timeout) must be a number, more than 0, not "1979-05-27"'),
    ('[defaults]\nspeed = "fast"', '[defaults] speed (--speed) must be a number, from 0.25 to 4, not "fast"'),
    ("[defaults]\nspeed = 0", "[defaults] speed (--speed) must be a number, from 0.25 to 4, not 0"),
    ("[defaults]\nspeed = 4.5", "from 0.25 to 4, not 4.5"),
    ('[defaults]\nformat = "ogg"', '[defaults] format (--format) must be one of "mp3", "pcm", "wav", "flac", not "ogg"'),
    ('[defaults]\nmodel = " "', "[defaults] model (--model) must not be empty"),
    ("[defaults]\nvoice = 3", "[defaults] voice (--voice) must be text, not 3"),
    ("[stitching]\nsentence_gap = -0.1", "[stitching] sentence_gap must be a number, from 0 to 60, not -0.1"),
    ('[budget]\nmax_cost = "5"', '[budget] max_cost (--max-cost) must be a number, at least 0, not "5"'),
    ("[budget]\nmax_chars = 1.5", "[budget] max_chars (--max-chars) must be a whole number, at least 0, not 1.5"),
    ('[provider]\ntitle = "Hörbuch"', "[provider] title is sent as an HTTP header: use printable ASCII"),
    ("[provider]\nreferer = 1", "[provider] referer must be text, not 1"),
    ('limits = { "openai/" = "a" }', '[limits] "openai/" must be a whole number, at least 1, not "a"'),
    ('limits = { "openai/" = 0 }', '[limits] "openai/" must be a whole number, at least 1, not 0'),
    ("prices = 3", "[prices] must be a table of numbers, not 3"),
    ('prices = { "m" = -1 }', '[prices] "m" must be a number, at least 0, not -1'),
    ("defaults = 3", "[defaults] must be a table of settings, not 3"),
])
def test_job_file_values_of_the_wrong_type_or_range_name_the_setting(tmp_path, text, expected):
    assert expected in refusal(tmp_path, text)


def test_paths_must_be_text_and_an_unreadable_file_is_a_usage_error(tmp_path):
    job_file = tmp_path / "job.toml"
    job_file.write_text('manifest = [1]\nout = "o"\n')
    with pytest.raises(UsageError, match=r"manifest must be a path \(text\), not \[1\]"):
        load_job(job_file)
    assert "is not UTF-8 text" in refusal(tmp_path, b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    assert "not valid TOML" in refusal(tmp_path, b'manifest = "m.csv"\nout = \n')
    with pytest.raises(UsageError, match="cannot read job file"):
        load_job(tmp_path)


@pytest.mark.parametrize(("text", "expected"), [
    ("concurency = 3", "unknown job setting: concurency (did you mean concurrency?)"),
    ("[retyr]\nmax_attempts = 3", "unknown job setting: retyr (did you mean retry?)"),
    ("[retry]\nmax_attemps = 3", "unknown key in [retry]: max_attemps (did you mean max_attempts or max_wait?); [retry] takes "),
    ("[retry]\ntries = 3", "unknown key in [retry]: tries; [retry] takes statuses, max_attempts, backoff_initial"),
    ("[defaults]\nconcurrency = 3", "unknown key in [defaults]: concurrency (it goes at the top of the job file"),
    ("[defaults]\nread = 3", "unknown key in [defaults]: read (it goes under [timeouts])"),
    ('model = "m"', "unknown job setting: model (it goes under [defaults])"),
])
def test_unknown_keys_and_sections_say_what_was_meant(tmp_path, text, expected):
    assert expected in refusal(tmp_path, text)


def test_jobs_built_in_python_pass_the_same_checks(tmp_path):
    def job(**settings: object) -> Job:
        return Job(manifest=tmp_path / "m.csv", out=tmp_path / "out", **settings)

    for bad, expected in [
        (job(concurrency="many"), "concurrency"), (job(concurrency=True), "concurrency"),
        (job(timeouts=Timeouts(read="slow")), "[timeouts] read"), (job(defaults=Defaults(speed=0)), "[defaults] speed"),
        (job(retry=RetryPolicy(statuses=(429, 1000))), "[retry] statuses"), (job(retry=RetryPolicy(max_attempts=True)), "max_attempts"),
        (job(stitching=Stitching(paragraph_gap=float("nan"))), "paragraph_gap"), (job(budget=Budget(max_chars=-1)), "max_chars"),
        (job(defaults={"model": "m"}), "defaults must be a Defaults"), (job(shard="0/2"), "shard (--shard) must be a Shard"),
        (job(limits={"m": 10**400}), None), (job(requests_per_minute=10**400), "requests_per_minute"),
        (job(provider=Provider(base_url=f"https://me:{SECRET}@openrouter.ai/api/v1")), "user name or key"),
    ]:
        if expected is None:
            bad.validate()  # a huge whole number is still a whole number: no overflow on the way
            continue
        with pytest.raises(UsageError, match=re.escape(expected)):
            bad.validate()
    with pytest.raises(UsageError, match="must be a number"):  # run() refuses before it reads or writes anything
        run(job(timeouts=Timeouts(connect="10")))
    assert not (tmp_path / "out").exists()
    assert job().manifest == tmp_path / "m.csv" and Job(manifest="m.csv", out="o", ledger="l.db").ledger == Path("l.db")


@pytest.mark.parametrize("url", [
    f"https://me:{SECRET}@openrouter.ai/api/v1", f"https://{SECRET}@openrouter.ai/api/v1",
    f"http://u:{SECRET}@127.0.0.1:8787/api/v1",
])
def test_a_base_url_holding_a_key_is_refused_without_echoing_it(tmp_path, url):
    message = refusal(tmp_path, f'[provider]\nbase_url = "{url}"')
    assert "must not hold a user name or key" in message and "OPENROUTER_API_KEY" in message
    assert SECRET not in message and "me:" not in message


@pytest.mark.parametrize("url", [
    f"http://127.0.0.1:8787/api/v1?key={SECRET}", f"https://openrouter.ai/api/v1?x=1&api_key={SECRET}",
    f"https://openrouter.ai/api/v1?{SECRET}", f"https://openrouter.ai/api/v1#{SECRET}", f"ftp://example.com/v1?{SECRET}",
])
def test_a_base_url_with_a_query_or_fragment_is_refused_without_echoing_it(tmp_path, url):
    with pytest.raises(UsageError, match="must not hold a query string or fragment") as caught:
        Job(manifest=tmp_path / "m.csv", out=tmp_path / "out", provider=Provider(base_url=url)).validate()
    assert SECRET not in str(caught.value)
    message = refusal(tmp_path, f'[provider]\nbase_url = "{url}"')
    assert "must not hold a query string or fragment" in message and SECRET not in message


@pytest.mark.parametrize("url", ["ftp://example.com/api/v1", "openrouter.ai/api/v1", "https://", "http://:80/v1",
                                 "https://host:port/v1", "https://open router.ai/api/v1", ""])
def test_a_base_url_must_be_http_or_https_with_a_host(tmp_path, url):
    assert "[provider] base_url (--base-url, BATCHTTS_BASE_URL) " in refusal(tmp_path, f'[provider]\nbase_url = "{url}"')


def test_the_key_variable_is_checked_by_name_and_by_content(tmp_path, monkeypatch):
    message = refusal(tmp_path, f'[provider]\napi_key_env = "{SECRET}"')
    assert "name of the environment variable" in message and SECRET not in message
    monkeypatch.setenv("MY_KEY", f"{SECRET}\nX-Injected: 1")
    with pytest.raises(UsageError, match="MY_KEY environment variable holds") as caught:
        Provider(api_key_env="MY_KEY").api_key()
    assert SECRET not in str(caught.value)


def invoke(*args: str, **env: str):
    result = CliRunner().invoke(main, list(args), env={"OPENROUTER_API_KEY": None, "BATCHTTS_BASE_URL": None, **env})
    assert "Traceback" not in result.output and not isinstance(result.exception, (TypeError, ValueError)), result.output
    return result


@pytest.mark.parametrize(("flag", "value"), [
    ("--speed", "0"), ("--speed", "-1"), ("--speed", "4.5"), ("--timeout", "-1"), ("--timeout", "0"),
    ("--connect-timeout", "0"), ("--grace", "-3"), ("--backoff-initial", "-1"), ("--backoff-max", "-0.5"),
    ("--max-row-seconds", "0"), ("--progress-interval", "0"), ("--concurrency", "0"), ("--concurrency", "5000"),
    ("--rpm", "0"), ("--limit", "-1"), ("--chunk-chars", "0"), ("--max-cost", "-1"), ("--max-chars", "-1"),
    ("--max-attempts", "0"), ("--speed", "fast"), ("--concurrency", "many"),
])
def test_flags_out_of_range_exit_2_naming_the_flag(tmp_path, flag, value):
    result = invoke("run", str(tmp_path / "m.csv"), "--out", str(tmp_path / "out"), flag, value)
    assert result.exit_code == 2 and f"'{flag}'" in result.output, result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("args", "expected"), [
    (["--speed", "nan"], "[defaults] speed (--speed) must be a number, from 0.25 to 4, not NaN"),
    (["--timeout", "inf"], "[timeouts] read (--timeout) must be a number, more than 0, not Infinity"),
    (["--model", " "], "[defaults] model (--model) must not be empty"),
    (["--base-url", "openrouter.ai/api/v1"], "[provider] base_url (--base-url, BATCHTTS_BASE_URL) must be an http"),
    (["--api-key-env", "OPENROUTER-KEY"], "[provider] api_key_env (--api-key-env) must be the name"),
])
def test_flag_values_the_library_refuses_exit_2_with_one_line(tmp_path, args, expected):
    result = invoke("run", str(tmp_path / "m.csv"), "--out", str(tmp_path / "out"), "--log-format", "console", *args)
    assert result.exit_code == 2 and expected in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_base_url_with_a_key_in_the_environment_or_for_models_is_refused_unechoed(tmp_path):
    url = f"https://me:{SECRET}@openrouter.ai/api/v1"
    result = invoke("run", str(tmp_path / "m.csv"), "--out", str(tmp_path / "out"), "--log-format", "console",
                    BATCHTTS_BASE_URL=url)
    assert result.exit_code == 2 and "must not hold a user name or key" in result.output and SECRET not in result.output
    listing = invoke("models", "--base-url", url)
    assert listing.exit_code == 2 and "must not hold a user name or key" in listing.output
    assert SECRET not in listing.output


def test_the_engine_finds_voices_as_espeak_ng_does():
    eng = engine()
    assert eng.resolve("en-gb") == "gmw/en" and eng.resolve("EN-GB+f3") == "gmw/en+f3"
    assert eng.resolve("pt-br") == "roa/pt-BR" and eng.resolve("es-419") == "roa/es-419"
    assert eng.resolve("es-mx") == "roa/es-419" and eng.resolve("en-uk") == "gmw/en"  # by language, scored
    assert eng.resolve("English (America)") == "gmw/en-US" and eng.resolve("gmw/en-US") == "gmw/en-US"
    assert eng.resolve("en-us+alex") == "gmw/en-US+Alex"
    with pytest.raises(UnknownVoiceError, match=r"unknown eSpeak NG voice 'frr' \(did you mean fr"):
        eng.check_voice("frr")
    # The library's own search by language, asked directly, picks the same voice for every code.
    eng._lib.espeak_GetCurrentVoice.restype = ctypes.POINTER(_Voice)
    codes = {lang for v in eng.voices for _, lang in v.languages}
    for code in [*codes, "en-uk", "zh", "de-de", "fr-fr", "pt-pt", "en-gb-x", "zh-yue", "hbs", "no", "xx", "eng"]:
        wanted = ctypes.create_string_buffer(code.encode())
        found = eng._lib.espeak_SetVoiceByProperties(ctypes.byref(_Voice(languages=ctypes.addressof(wanted)))) == 0
        ours = eng._by_language(code)
        assert (ours.identifier if ours else None) == (
            eng._lib.espeak_GetCurrentVoice().contents.identifier.decode() if found else None), code
    assert all(len(eng.synthesize("Tomato.", voice)) > 10_000 for voice in ("en-gb", "pt-br", "es-419", "es-mx+f2"))


def test_local_problems_are_cheap_and_say_what_was_meant():
    assert local_problem(LOCAL, "en-gb") is None and local_problem(LOCAL, "Alloy") is None
    assert local_problem(LOCAL, None) is None
    assert "unknown local model 'local/espeak' (did you mean local/espeak-ng?)" in local_problem("local/espeak", "alloy")
    assert local_problem(LOCAL, "allloy").startswith("unknown voice 'allloy' (did you mean alloy?)")
    assert "unknown eSpeak NG variant 'nobody'" in local_problem(LOCAL, "en-us+nobody")
    assert "batchtts voices --model local/espeak-ng" in local_problem(LOCAL, "vulcan")
    before = local_problem.cache_info().hits
    local_problem(LOCAL, "allloy")
    assert local_problem.cache_info().hits == before + 1


def test_local_rows_are_checked_at_plan_time_with_row_numbers(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", [
        {"id": "a", "text": "Hi.", "voice": "en-gb", "model": LOCAL},
        {"id": "b", "text": "Hi.", "voice": "allloy", "model": LOCAL},
        {"id": "c", "text": "", "voice": "alloy", "model": "openai/gpt-4o-mini-tts"},
        {"id": "d", "text": "Hi.", "voice": "nova", "model": "local/espeak"},
        {"id": "e", "text": "Hi.", "voice": "allloy", "model": "openai/gpt-4o-mini-tts"},  # a remote row's voice is the provider's
    ])
    seen: list[str] = []
    with pytest.raises(ManifestError) as caught:
        validate_manifest(manifest, Defaults(), on_row=lambda row: seen.append(row.key))
    assert caught.value.total == 3 and [p.row for p in caught.value.problems] == [2, 3, 4]
    assert "row 2 (id 'b'): unknown voice 'allloy' (did you mean alloy?)" in str(caught.value)
    assert "row 4 (id 'd'): unknown local model 'local/espeak' (did you mean local/espeak-ng?)" in str(caught.value)
    assert seen == ["a", "e"]
    with pytest.raises(UsageError, match=r"^the default model and voice .*unknown voice 'allloy' \(did you mean alloy\?\)"):
        validate_manifest(manifest, Defaults(model=LOCAL, voice="allloy"))


def listing_of(*ids: str) -> ModelList:
    return ModelList("https://provider/api/v1", 0.0, tuple(ModelInfo(i, i, 1e-6, 4096) for i in ids))


def test_remote_models_are_checked_against_the_list(tmp_path, monkeypatch):
    asked: list[str] = []

    def listing(provider, timeouts):
        asked.append(provider.base_url)
        return listing_of("openai/gpt-4o-mini-tts", "elevenlabs/eleven-turbo-v2")

    monkeypatch.setattr(listing_module, "speech_models", listing)
    job = Job(manifest=tmp_path / "m.csv", out=tmp_path / "out")
    check_models(job, [LOCAL, "local/whatever"])
    assert asked == []  # a run whose rows are all local never asks for the list
    with capture_logs() as logs:
        check_models(job, ["openai/gpt-4o-mini-tts", "openai/gpt-4o-mini-ts", LOCAL])
    assert [(e["event"], e["log_level"], e["model"]) for e in logs] == [("unknown_model", "warning", "openai/gpt-4o-mini-ts")]
    assert "(did you mean openai/gpt-4o-mini-tts?)" in logs[0]["message"]
    with pytest.raises(UsageError, match=r"'openai/gpt-4o-mini-ts' is not one of .*did you mean openai/gpt-4o-mini-tts\?"):
        check_models(Job(manifest=tmp_path / "m.csv", out=tmp_path / "out", strict=True), ["openai/gpt-4o-mini-ts"])


def test_a_model_list_that_cannot_be_had_skips_the_check_quietly(tmp_path, monkeypatch):
    def unreachable(provider, timeouts):
        raise UsageError("cannot reach https://provider/api/v1/models")

    monkeypatch.setattr(listing_module, "speech_models", unreachable)
    strict = Job(manifest=tmp_path / "m.csv", out=tmp_path / "out", strict=True)
    with capture_logs() as logs:
        check_models(strict, ["openai/gpt-4o-mini-ts"])
    assert [(e["event"], e["log_level"]) for e in logs] == [("models_unchecked", "info")]
    monkeypatch.setattr(listing_module, "speech_models", lambda provider, timeouts: listing_of())
    check_models(strict, ["openai/gpt-4o-mini-ts"])  # an empty list (no speech filter) checks nothing


def test_an_unreachable_model_list_is_asked_once_a_minute(monkeypatch):
    calls: list[str] = []

    def fail(provider, timeouts):
        calls.append(provider.base_url)
        raise UsageError("cannot reach http://127.0.0.1:9/api/v1/models")

    monkeypatch.setattr(listing_module, "_ask", fail)
    monkeypatch.setattr(listing_module, "_unreachable", {})
    provider = Provider(base_url="http://127.0.0.1:9/api/v1")
    for _ in range(2):
        with pytest.raises(UsageError, match="cannot reach"):
            listing_module.fetch(provider, Timeouts())
    assert len(calls) == 1


def test_a_strict_dry_run_shows_the_plan_with_the_refusal(tmp_path, monkeypatch):
    monkeypatch.setattr(listing_module, "speech_models", lambda provider, timeouts: listing_of("openai/gpt-4o-mini-tts"))
    manifest = write_csv(tmp_path / "m.csv", [{"id": "a", "text": "Hello.", "voice": "alloy"}])
    job = Job(manifest=manifest, out=tmp_path / "out", defaults=Defaults(model="openai/gpt-4o-mini-ts"),
              dry_run=True, strict=True)
    with capture_logs():
        result = run(job)
    assert result.exit_code == 2 and result.plan.total.pending == 1
    assert "did you mean openai/gpt-4o-mini-tts?" in result.stop_reason


def test_local_typos_fail_the_run_before_it_starts(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", [{"id": "a", "text": "Hi.", "voice": "alloy"}])
    for args, expected in [(["--model", "local/espeak"], "did you mean local/espeak-ng?"),
                           (["--model", LOCAL, "--voice", "allloy"], "did you mean alloy?")]:
        result = invoke("run", str(manifest), "--out", str(tmp_path / "out"), "--log-format", "console", *args)
        assert result.exit_code == 2 and expected in result.output, result.output
    assert not (tmp_path / "out" / "ledger.sqlite").exists()


# End to end, through the real CLI against `batchtts serve`: bad settings send nothing.

def test_bad_job_file_settings_send_no_request(serve, tmp_path):
    server = serve()
    write_csv(tmp_path / "m.csv", [{"id": "a", "text": "Hello.", "voice": "alloy"}])
    for setting in ('[timeouts]\nread = "slow"', "concurency = 3"):
        job_file = tmp_path / "job.toml"
        job_file.write_text(f'manifest = "m.csv"\nout = "out"\n{setting}\n')
        result = cli("run", job_file, "--model", "openai/gpt-4o-mini-tts", "--base-url", server.url)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert "\n" not in error_message(result).strip()
    assert server.stats()["requests"] == 0 and not (tmp_path / "out").exists()


def test_strict_refuses_an_unlisted_model_and_without_it_the_run_warns(serve, tmp_path):
    server = serve()
    manifest = write_csv(tmp_path / "m.csv", [{"id": "a", "text": "Hello.", "voice": "alloy"}])
    args = ["run", manifest, "--model", "openai/gpt-4o-mini-ts", "--base-url", server.url]
    strict = cli(*args, "--out", tmp_path / "strict", "--strict")
    assert strict.returncode == 2 and "did you mean openai/gpt-4o-mini-tts?" in error_message(strict)
    assert server.stats()["requests"] == 0 and ledger_rows(tmp_path / "strict" / "ledger.sqlite") == {}
    warned = cli(*args, "--out", tmp_path / "warned")
    events = [json.loads(line) for line in warned.stderr.splitlines() if line.startswith("{")]
    # Warned, the row is sent, and the provider's 404 fails it: its message names the model.
    assert warned.returncode == 1 and [e["model"] for e in events if e["event"] == "unknown_model"] == ["openai/gpt-4o-mini-ts"]
    assert server.stats()["requests"] == 1
    assert "Model not found: openai/gpt-4o-mini-ts" in ledger_rows(tmp_path / "warned" / "ledger.sqlite")["a"]["error"]


def test_a_base_url_with_a_key_sends_nothing_and_records_nothing(serve, tmp_path):
    server = serve()
    manifest = write_csv(tmp_path / "m.csv", [{"id": "a", "text": "Hello.", "voice": "alloy"}])
    with_key = server.url.replace("http://", f"http://me:{SECRET}@")
    result = cli("run", manifest, "--out", tmp_path / "out", "--model", "openai/gpt-4o-mini-tts",
                      "--base-url", with_key, key="k")
    assert result.returncode == 2 and "must not hold a user name or key" in error_message(result)
    assert SECRET not in result.stderr + result.stdout
    assert server.stats()["requests"] == 0 and not (tmp_path / "out").exists()


def test_language_codes_narrate_locally_and_through_serve(serve, tmp_path):
    rows = [{"id": code, "text": "Good morning.", "voice": code} for code in ("en-gb", "pt-br", "es-419", "es-mx")]
    manifest = write_csv(tmp_path / "m.csv", rows)
    with capture_logs():
        result = run(Job(manifest=manifest, out=tmp_path / "out", defaults=Defaults(model=LOCAL)))
    assert result.exit_code == 0 and result.counters.done == 4
    server = serve("--engine", "espeak")
    for voice in ("en-gb", "pt-br", "es-419", "en-gb+f3"):
        answer = http.post(f"{server.url}/audio/speech", timeout=30,
                            json={"model": LOCAL, "input": "Good morning.", "voice": voice})
        assert answer.status_code == 200 and answer.content, (voice, answer.text)


# Any job file, however wrong, is a Job or a UsageError: never another exception.

TOP_KEYS = ["manifest", "out", "ledger", "chunk_chars", "concurrency", "requests_per_minute", "limit", "retry_failed",
            "dry_run", "grace_seconds", "max_runtime", "shard", "progress_interval", "log_format", "strict",
            "concurency", "max_chars"]
SECTION_KEYS = {
    "defaults": ["model", "voice", "format", "speed"],
    "provider": ["base_url", "api_key_env", "referer", "title"],
    "timeouts": ["connect", "read"],
    "retry": ["statuses", "max_attempts", "backoff_initial", "backoff_max", "max_row_seconds"],
    "stitching": ["sentence_gap", "paragraph_gap"],
    "budget": ["max_cost", "max_chars"],
}
TABLES = ["limits", "prices"]

scalars = st.one_of(
    st.text(max_size=12), st.sampled_from(["m.csv", "out", "0/2", "45s", "mp3", "json", "en-gb", "https://x/api/v1",
                                           "s3://b/p", "~", "", "nan"]),
    st.integers(min_value=-(10**20), max_value=10**20), st.sampled_from([0, 1, 429, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.datetimes(), st.dates(),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)), max_leaves=6)


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


@st.composite
def job_documents(draw) -> str:
    lines = ['manifest = "m.csv"' if draw(st.booleans()) else f"manifest = {toml_value(draw(values))}",
             'out = "out"' if draw(st.booleans()) else f"out = {toml_value(draw(values))}"]
    for key in draw(st.lists(st.sampled_from(TOP_KEYS + TABLES), unique=True, max_size=5)):
        if key not in ("manifest", "out"):
            lines.append(f"{key} = {toml_value(draw(values))}")
    for section in draw(st.lists(st.sampled_from([*SECTION_KEYS, "retyr"]), unique=True, max_size=3)):
        lines.append(f"[{section}]")
        for key in draw(st.lists(st.sampled_from(SECTION_KEYS.get(section, ["x"]) + ["extra"]), unique=True, max_size=3)):
            lines.append(f"{key} = {toml_value(draw(values))}")
    return "\n".join(lines) + "\n"


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=job_documents())
def test_any_job_file_is_a_job_or_a_usage_error(tmp_path, document):
    job_file = tmp_path / "job.toml"
    job_file.write_text(document, encoding="utf-8")
    try:
        job = load_job(job_file)
    except UsageError as exc:
        assert "\n" not in str(exc)
        return
    job.validate()
    assert isinstance(job, Job) and isinstance(job.manifest, Path)
