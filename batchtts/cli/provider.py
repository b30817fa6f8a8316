"""What a provider offers and one to test against: `models`, `voices` and `serve`."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from ..config import Provider, Timeouts, load_job
from ..errors import EXIT_USAGE, BatchTTSError
from ..money import usd
from .common import env_file_option, examples, fail, given


@click.command(epilog=examples(
    "batchtts models",
    "batchtts models --refresh --json | jq '.models[].id'",
    "BATCHTTS_BASE_URL=http://127.0.0.1:8787/api/v1 batchtts models",
))
@click.option("--base-url", envvar="BATCHTTS_BASE_URL", show_envvar=True, default=Provider.base_url, show_default=True,
              help="Speech API base URL.")
@click.option("--job", "job_file", type=click.Path(path_type=Path, dir_okay=False), help="Use the job file's provider.")
@click.option("--refresh", is_flag=True, help="Ask the provider now instead of using the day-old cache.")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@env_file_option
def models(base_url: str | None, job_file: Path | None, refresh: bool, as_json: bool) -> None:
    """List the provider's speech models with their price and input limit (cached for a day).
    Reads the key from OPENROUTER_API_KEY (or the job file's api_key_env) where the provider wants one."""
    from .. import log as logs
    from ..models import speech_models

    logs.configure("auto")  # a stale cache or one that cannot be written is said on stderr

    try:
        job = load_job(job_file) if job_file else None
        provider = job.provider if job is not None else Provider()
        if base_url is not None and given({"base_url": base_url})["base_url"] is not None:  # or BATCHTTS_BASE_URL
            provider = Provider(base_url=base_url, api_key_env=provider.api_key_env)
        listing = speech_models(provider, job.timeouts if job is not None else Timeouts(), refresh=refresh)
    except BatchTTSError as exc:
        fail(exc)
    if as_json:
        click.echo(json.dumps({"base_url": listing.base_url, "fetched_at": listing.fetched_at,
                               "models": [{**asdict(m), "usd_per_million_chars": m.usd_per_million}
                                          for m in listing.models]}))
        return
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(listing.fetched_at))
    click.echo(f"{listing.base_url}: {len(listing.models)} speech models "
               f"({f'cached at {when}; --refresh asks again' if listing.from_cache else 'fetched now'})")
    click.echo(f"  {'model':<36} {'$/1M chars':>10} {'input limit':>12}  name")
    for m in listing.models:
        limit = f"{m.max_input_chars:,}" if m.max_input_chars else "?"
        click.echo(f"  {m.id:<36} {usd(m.usd_per_million, cents=True):>10} {limit:>12}  {m.name}")


@click.command(epilog=examples("batchtts voices", "batchtts voices | grep -i scot", "batchtts voices -m openai/gpt-4o-mini-tts"))
@click.option("-m", "--model", default="local/espeak-ng", show_default=True, help="Model whose voices to list.")
def voices(model: str) -> None:
    """List the voices a model takes (every eSpeak NG voice and variant for local/* models)."""
    from ..engine import engine
    from ..local import MODELS, OPENAI_VOICES
    from ..providers import is_local

    if not is_local(model):
        click.echo(f"{model} is narrated by a remote provider, whose voices batchtts cannot list; OpenAI-family "
                   f"models take: {', '.join(OPENAI_VOICES)}")
        return
    if model not in MODELS:
        click.echo(f"batchtts: unknown local model {model!r}: use one of {', '.join(MODELS)}", err=True)
        sys.exit(EXIT_USAGE)
    eng = engine()
    click.echo(f"{model}: OpenAI voice names, mapped so a manifest written for OpenRouter rehearses unchanged")
    for name, espeak in OPENAI_VOICES.items():
        click.echo(f"  {name:<10} -> {espeak}")
    click.echo(f"\neSpeak NG voices ({len(eng.voices)}), usable as they are or with a variant: en-us+f3")
    for v in eng.voices:
        click.echo(f"  {v.name:<16} {v.description}")
    click.echo(f"\nvariants ({len(eng.variants)}): {', '.join(eng.variants)}")


@click.command(context_settings={"show_default": True}, epilog=examples(
    "batchtts serve                                  # then, in another shell:",
    "BATCHTTS_BASE_URL=http://127.0.0.1:8787/api/v1 batchtts run sample_manifests/lines.csv -o out/rehearsal",
    "batchtts serve --fail-rate 0.2 --limiter bucket --rate-limit 20 --burst 3",
    "batchtts serve --port 0 --engine tone --latency 0.05   # a free port, printed on start",
))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on: keep it loopback.")
@click.option("--port", default=8787, show_default=True, type=click.IntRange(0, 65535), help="0 picks a free port.")
@click.option("--api-key", envvar="BATCHTTS_SERVE_KEY",
              help="Require this bearer key, on the API and on the /_batchtts admin endpoints.")
@click.option("--latency", default=0.0, type=click.FloatRange(min=0), help="Seconds before each answer.")
@click.option("--fail-rate", default=0.0, type=click.FloatRange(0, 1), help="Share of requests answered with an error status.")
@click.option("--fail-status", default="502,503,524,529", help="Statuses for --fail-rate / --fail-first, comma-separated.")
@click.option("--fail-first", default=0, type=click.IntRange(min=0), help="First N attempts of each input fail.")
@click.option("--limiter", default="fixed", show_default=True, type=click.Choice(["bucket", "fixed", "sliding"]),
              help="How --rate-limit counts: a token bucket, windows aligned on the clock, or any --window-long span.")
@click.option("--rate-limit", default=0.0, type=click.FloatRange(min=0),
              help="Requests per --window (fixed, sliding), or tokens a second (bucket), before 429s (0: off).")
@click.option("--window", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds a fixed or sliding window spans.")
@click.option("--burst", default=1, show_default=True, type=click.IntRange(min=1), help="The token bucket's size.")
@click.option("--max-in-flight", default=0, type=click.IntRange(min=0),
              help="Requests served at once before 429s with Retry-After: 1 (0: no cap).")
@click.option("--quota", type=click.IntRange(min=0), help="Successful requests before 429s until --quota-reset.")
@click.option("--quota-reset", default=86400.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds until a spent quota starts afresh (periods counted from the server's start).")
@click.option("--rate-limit-headers", default="both", show_default=True,
              type=click.Choice(["retry-after", "reset", "both", "none"]),
              help="Which hints a 429 carries: Retry-After (whole seconds), X-RateLimit-* (Reset in epoch ms), both, or none.")
@click.option("--retry-after", type=click.FloatRange(min=0),
              help="Retry-After value to send with 429s (default: until the limiter would admit, rounded up).")
@click.option("--drop-rate", default=0.0, type=click.FloatRange(0, 1), help="Share of answers cut after the headers.")
@click.option("--truncate-rate", default=0.0, type=click.FloatRange(0, 1), help="Share of answers cut half-way through the body.")
@click.option("--silence-rate", default=0.0, type=click.FloatRange(0, 1),
              help="Share of inputs answered, whole, with silence as long as their speech (by a hash of --seed and the text).")
@click.option("--short-rate", default=0.0, type=click.FloatRange(0, 1),
              help="Share of inputs answered, whole, with the first half of their speech only (as --silence-rate picks).")
@click.option("--drop-first", default=0, type=click.IntRange(min=0), help="First N attempts of each input are cut after the headers.")
@click.option("--truncate-first", default=0, type=click.IntRange(min=0), help="First N attempts of each input are cut half-way.")
@click.option("--stall-first", default=0, type=click.IntRange(min=0), help="First N attempts of each input stall mid-body.")
@click.option("--stall-seconds", default=5.0, show_default=True, type=click.FloatRange(min=0),
              help="How long a stalled answer waits, half its body sent, before sending the rest.")
@click.option("--credits", type=click.IntRange(min=0), help="Answer 402 after this many successes.")
@click.option("--seed", type=int, help="Seed for the random faults.")
@click.option("--engine", default="espeak", show_default=True, type=click.Choice(["espeak", "tone"]),
              help="espeak: real speech from the embedded engine; tone: a cheap synthetic tone for load tests.")
@click.option("--any-model", is_flag=True,
              help="Serve models the table does not list too, with any voice, instead of answering 404.")
def serve(**options: Any) -> None:
    """Run an OpenRouter-compatible speech server on loopback, with faults on demand: a rehearsal of a
    job, free and offline. Point the runner at the URL it prints, http://HOST:PORT/api/v1, through
    BATCHTTS_BASE_URL or --base-url (any key will do unless --api-key is set). Needs the serve extra:
    pip install 'batchtts[serve]'."""
    try:
        from ..server import ServeConfig, run_server
    except ImportError as exc:
        click.echo(f"batchtts serve needs the serve extra: pip install 'batchtts[serve]' ({exc})", err=True)
        sys.exit(EXIT_USAGE)
    try:
        statuses = tuple(int(s) for s in options.pop("fail_status").split(",") if s.strip())
    except ValueError:
        statuses = ()
    if not statuses or not all(400 <= s <= 599 for s in statuses):
        raise click.BadParameter("statuses are comma-separated numbers from 400 to 599, e.g. 502,503",
                                 param_hint="'--fail-status'")
    try:
        config = ServeConfig(fail_statuses=statuses, **options)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        run_server(config)
    except BatchTTSError as exc:
        fail(exc)

