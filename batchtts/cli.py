"""The command line: parse, call the library, report. No work happens here."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from . import __version__, sharding
from .config import (
    FORMATS,
    Budget,
    Defaults,
    Job,
    Provider,
    RetryPolicy,
    Timeouts,
    bounds_of,
    load_job,
    parse_duration,
)
from .errors import EXIT_INTERNAL, EXIT_SIGINT, EXIT_USAGE, BatchTTSError
from .money import usd
from .redact import redact_uri

if TYPE_CHECKING:
    from .runner import RunResult


def _fail(exc: BatchTTSError) -> None:
    _say_error(str(exc), exc.exit_code)
    sys.exit(exc.exit_code)


def _ranged(settings: type, name: str) -> click.IntRange | click.FloatRange:
    """The range the setting takes, so a flag refuses what the job file would."""
    number, bounds = bounds_of(settings, name)
    if number is int:
        low, high = (None if b is None else int(b) for b in (bounds.low, bounds.high))
        return click.IntRange(low, high, min_open=bounds.above)
    return click.FloatRange(bounds.low, bounds.high, min_open=bounds.above)


def _say_error(message: str, exit_code: int) -> None:
    """An expected fault: one line saying what to do, as a JSON event when the logs are JSON lines."""
    from . import log as logs

    if logs.chosen() == "json":
        logs.log.error("error", exit_code=exit_code, message=message)
    else:
        click.echo(f"batchtts: {message}", err=True)


class _Commands(click.Group):
    """Every command ends in a message and an exit code. A fault that no code path expected is said in
    one line, as a bug to report, not as a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort, KeyboardInterrupt):
            raise
        except BatchTTSError as exc:
            _fail(exc)
        except Exception as exc:
            _say_error(f"unexpected {type(exc).__name__}: {exc} (a fault in batchtts itself: please report it with "
                       "the command that led to it)", EXIT_INTERNAL)
            sys.exit(EXIT_INTERNAL)


@click.group(cls=_Commands)
@click.version_option(__version__, prog_name="batchtts")
def main() -> None:
    """Narrate a manifest of texts into one audio file per row, resumably."""


@main.command()
@click.argument("target", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--out", help="Output folder for audio and the ledger, or s3://bucket/prefix (also gs://, hdfs://).")
@click.option("--model", help="Default model for rows without a model column.")
@click.option("--voice", help="Default voice for rows without a voice column.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="Default output format.")
@click.option("--speed", type=_ranged(Defaults, "speed"), help="Default speed multiplier.")
@click.option("--concurrency", type=_ranged(Job, "concurrency"), help="Most requests in flight at once (lowered for a while after 429s).")
@click.option("--rpm", type=_ranged(Job, "requests_per_minute"), help="Cap on requests per minute, for accounts whose limit is known.")
@click.option("--max-attempts", type=_ranged(RetryPolicy, "max_attempts"), help="Attempts per row before it is recorded as failed.")
@click.option("--timeout", type=_ranged(Timeouts, "read"), help="Read timeout in seconds (the wait for each chunk of a body).")
@click.option("--connect-timeout", type=_ranged(Timeouts, "connect"), help="Connect timeout in seconds.")
@click.option("--backoff-initial", type=_ranged(RetryPolicy, "backoff_initial"), help="First retry waits up to this many seconds (doubling after).")
@click.option("--backoff-max", type=_ranged(RetryPolicy, "backoff_max"), help="Longest wait between two attempts, in seconds.")
@click.option("--max-row-seconds", type=_ranged(RetryPolicy, "max_row_seconds"), help="Give up on a row after this many seconds of retrying.")
@click.option("--base-url", envvar="BATCHTTS_BASE_URL", help="Speech API base URL (default OpenRouter's).")
@click.option("--api-key-env", help="Environment variable that holds the API key.")
@click.option("--ledger", type=click.Path(path_type=Path, dir_okay=False),
              help="Ledger file (default OUT/ledger.sqlite; needed with object-store output).")
@click.option("--retry-failed", is_flag=True, default=None, help="Also retry rows that failed permanently before.")
@click.option("--limit", type=_ranged(Job, "limit"), help="Narrate at most N of the rows left to do.")
@click.option("--chunk-chars", type=_ranged(Job, "chunk_chars"),
              help="Split rows longer than this into chunks (default: the model's input limit, 4096 if unknown).")
@click.option("--max-cost", type=_ranged(Budget, "max_cost"), help="Budget in USD for this run: stop taking rows before passing it.")
@click.option("--max-chars", type=_ranged(Budget, "max_chars"), help="Budget in characters sent for this run.")
@click.option("--max-runtime", help="End cleanly within this time: 3600, 50m, 2h, 1h30m.")
@click.option("--max-wait", help="Longest wait a rate limit may ask for before the run stops with exit 3 "
              "(default 5m): 90, 10m, 1h.")
@click.option("--shard", help="Take only shard I of N: --shard 3/8.")
@click.option("--shards", type=click.IntRange(min=1),
              help="Number of shards, the index coming from JOB_COMPLETION_INDEX or SLURM_ARRAY_TASK_ID.")
@click.option("--dry-run", is_flag=True, default=None,
              help="Check the manifest, count what is left and estimate its cost; send nothing.")
@click.option("--grace", "grace_seconds", type=_ranged(Job, "grace_seconds"), help="Seconds in-flight requests get to finish after Ctrl-C.")
@click.option("--progress-interval", type=_ranged(Job, "progress_interval"), help="Seconds between progress events when not on a terminal.")
@click.option("--log-format", type=click.Choice(["auto", "console", "json"]), help="Log rendering (default: auto).")
@click.option("--strict", is_flag=True, default=None,
              help="Refuse to start when a model is not in the provider's model list (default: warn).")
def run(target: Path, **flags: Any) -> None:
    """Narrate TARGET: a job file (.toml) or a manifest (.csv, .tsv, .parquet, .jsonl).

    \b
    Exit codes: 0 all done; 1 some rows failed; 2 usage, config or manifest error (nothing sent);
    3 stopped by the provider (bad key, no credits), progress kept; 4 budget reached; 5 --max-runtime
    reached; 6 halted by a full disk or an unwritable ledger, progress kept; 75 another run holds the
    ledger; 130/143 interrupted, progress kept. Run the same
    command again to resume.
    """
    from . import log as logs

    logs.configure(flags.get("log_format") or "auto")
    is_job = target.suffix.lower() == ".toml"
    try:
        shard = sharding.detect(flags["shard"], flags["shards"])
        max_runtime = parse_duration(flags["max_runtime"]) if flags["max_runtime"] is not None else None
        max_wait = parse_duration(flags["max_wait"]) if flags["max_wait"] is not None else None
    except BatchTTSError as exc:
        _fail(exc)
    overrides = {
        "manifest": None if is_job else target,
        "out": flags["out"],
        "ledger": flags["ledger"],
        "defaults.model": flags["model"],
        "defaults.voice": flags["voice"],
        "defaults.format": flags["fmt"],
        "defaults.speed": flags["speed"],
        "concurrency": flags["concurrency"],
        "requests_per_minute": flags["rpm"],
        "retry.max_attempts": flags["max_attempts"],
        "retry.backoff_initial": flags["backoff_initial"],
        "retry.backoff_max": flags["backoff_max"],
        "retry.max_row_seconds": flags["max_row_seconds"],
        "timeouts.read": flags["timeout"],
        "timeouts.connect": flags["connect_timeout"],
        "provider.base_url": flags["base_url"],
        "provider.api_key_env": flags["api_key_env"],
        "retry_failed": flags["retry_failed"],
        "limit": flags["limit"],
        "chunk_chars": flags["chunk_chars"],
        "budget.max_cost": flags["max_cost"],
        "budget.max_chars": flags["max_chars"],
        "max_runtime": max_runtime,
        "retry.max_wait": max_wait,
        "shard": shard,
        "dry_run": flags["dry_run"],
        "grace_seconds": flags["grace_seconds"],
        "progress_interval": flags["progress_interval"],
        "log_format": flags["log_format"],
        "strict": flags["strict"],
    }
    try:
        job = load_job(target if is_job else None, **overrides)
        if job.log_format != (flags.get("log_format") or "auto"):
            logs.configure(job.log_format)
        from .runner import run as run_job

        result = run_job(job, signals=True)
    except BatchTTSError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        click.echo("batchtts: interrupted before any request was sent", err=True)
        sys.exit(EXIT_SIGINT)
    if job.dry_run:
        _print_plan(result, job)
    else:
        _print_summary(result, job)
    sys.exit(result.exit_code)


def _print_plan(result: RunResult, job: Job) -> None:
    plan, total, prices = result.plan, result.plan.total, result.prices
    shard = f", shard {job.shard}" if job.shard is not None else ""
    limit = f"; 'to do' counts at most the --limit of {job.limit:,}" if job.limit is not None else ""
    click.echo(f"{job.manifest}{shard}: {_count(total.rows, 'row')}, {total.characters:,} characters "
               f"(dry run: nothing sent{limit})")
    click.echo(f"{'model':<30} {'rows':>8} {'done':>8} {'failed':>6} {'to do':>8} {'requests':>8} "
               f"{'chars to send':>13} {'$/1M chars':>10} {'estimate':>9}")
    estimates = plan.estimates(prices)
    for name, m in sorted(plan.models.items()):
        price = prices.of(name)
        click.echo(f"{name:<30} {m.rows:>8,} {m.done:>8,} {m.failed:>6,} {m.pending:>8,} {m.requests:>8,} "
                   f"{m.pending_characters:>13,} {usd(None if price is None else price * 1e6, cents=True):>10} "
                   f"{usd(estimates[name]):>9}")
    click.echo(f"{'total':<30} {total.rows:>8,} {total.done:>8,} {total.failed:>6,} {total.pending:>8,} "
               f"{total.requests:>8,} {total.pending_characters:>13,} {'':>10} {usd(plan.estimate(prices)):>9}")
    unknown = None in estimates.values()
    click.echo(f"prices: {prices.source}" + (
        f"; '?' = no known price{f' ({prices.list_error})' if prices.list_error else ''}: "
        "add the model under [prices] in the job file" if unknown else ""))
    budget, spending = job.budget, plan.budget
    if result.stop_reason:
        _say_error(result.stop_reason, result.exit_code)
    elif spending is not None:
        caps = [usd(budget.max_cost) if budget.max_cost is not None else None,
                f"{budget.max_chars:,} characters" if budget.max_chars is not None else None]
        unpriced = (f" ({spending.unpriced_characters:,} of the characters to models without a known price)"
                    if spending.unpriced_characters else "")
        click.echo(f"budget per run: {' and '.join(c for c in caps if c)}\n"
                   f"  this run takes {spending.rows:,} of the {_count(total.pending, 'row')} to do: "
                   f"{spending.characters:,} characters sent, {usd(spending.cost)}{unpriced}")
        for reason in (f"then {spending.refused}" if spending.refused else None, spending.passed_over):
            if reason:
                click.echo(f"  {reason}")


def _count(n: int, noun: str, plural: str | None = None) -> str:
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


def _where(out: Path | str) -> str:
    return redact_uri(out) if isinstance(out, str) else str(out)


def _size(n: float) -> str:
    units = ("bytes", "KB", "MB", "GB")
    step = 0
    while n >= 1000 and step < len(units) - 1:
        n /= 1000
        step += 1
    return f"{n:.0f} bytes" if step == 0 else f"{n:.1f} {units[step]}"


def _spent(result: RunResult) -> str:
    c, unpriced = result.counters, result.counters.unpriced_characters
    if unpriced and not c.cost_usd:
        return f"estimated cost unknown ({unpriced:,} characters to models without a known price)"
    return f"estimated cost {usd(c.cost_usd)} ({result.prices.source})" + (
        f", plus {unpriced:,} characters to models without a known price" if unpriced else "")


def _print_summary(result: RunResult, job: Job) -> None:
    c, total = result.counters, result.plan.total
    lines = [
        f"narrated {_count(c.done, 'row')}, {c.failed} failed, {total.done} already done"
        + (f", {total.failed} failed earlier (rerun with --retry-failed)" if total.failed else ""),
        f"{_size(c.bytes)}, {c.audio_s:.1f} s of audio, {_count(c.requests, 'request')}, {_count(c.retries, 'retry', 'retries')}, "
        f"{result.wall_s:.1f} s",
        f"{c.characters_sent:,} characters sent" + (f" (and {c.local_characters:,} narrated locally)"
                                                    if c.local_characters else "") + ", " + _spent(result),
        f"files in {_where(job.out)}, ledger at {job.ledger_path}"
        + (f" (shard {job.shard}, from {job.shard.source})" if job.shard is not None else ""),
    ]
    if result.stop_reason:
        lines.insert(0, f"stopped: {result.stop_reason}")
    if result.advice:
        lines.append(result.advice)
    elif result.exit_code == 1:
        lines.append(f"see the failed rows with: batchtts status {job.ledger_path}")
    elif result.stop_reason:
        lines.append("run the same command again to resume")
    click.echo("\n".join(lines))


@main.command()
@click.argument("targets", nargs=-1)
@click.option("--manifest", type=click.Path(path_type=Path, dir_okay=False), help="Manifest to count pending rows against.")
@click.option("--job", "job_file", type=click.Path(path_type=Path, dir_okay=False), help="Job file naming the manifest.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status(targets: tuple[str, ...], manifest: Path | None, job_file: Path | None, as_json: bool) -> None:
    """Show what output folders or ledger files hold: done, failed, pending. Several ledgers (the
    shards of a job, or a folder of them) are merged."""
    from .results import status as status_report

    try:
        report = status_report(targets, manifest, load_job(job_file) if job_file else None)
    except BatchTTSError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(report))
        return
    total = "?" if report["total"] is None else report["total"]
    pending = ("? (pass --manifest)" if report["pending"] is None
               else f"{report['pending']} (with the failed rows the next run retries)" if report["pending"] else "0")
    ledgers = report["ledgers"]
    title = ledgers[0] if len(ledgers) == 1 else f"{os.path.commonpath(ledgers)}/: {len(ledgers)} ledgers, merged"
    if report["missing_shards"]:
        title += (f"\n  no ledger yet for shard{'s' if len(report['missing_shards']) > 1 else ''} "
                  f"{', '.join(map(str, report['missing_shards']))}: their rows count as pending")
    click.echo(
        f"{title}\n  total {total}, done {report['done']}, failed {report['failed']}, pending {pending}\n"
        f"  {_size(report['bytes'])}, {report['audio_s']:.1f} s of audio"
    )
    for f in report["failures"]:
        again = "retried on next run" if f["retryable"] else "rerun with --retry-failed"
        where, _, error = f["error"].partition(": ") if f["error"].startswith("chunk ") else ("", "", f["error"])
        status = f"HTTP {f['http_status']}: " if f["http_status"] is not None else ""
        click.echo(f"  row {f['row_number']} ({f['key']}): {where + ': ' if where else ''}{status}{error} [{again}]")


@main.command()
@click.argument("targets", nargs=-1)
@click.option("--to", "to", help="results.parquet or results.csv, a path or s3://… (default: next to the audio).")
@click.option("--manifest", type=click.Path(path_type=Path, dir_okay=False), help="Manifest (default: the last run's).")
@click.option("--job", "job_file", type=click.Path(path_type=Path, dir_okay=False), help="Job file naming the manifest.")
def export(targets: tuple[str, ...], to: str | None, manifest: Path | None, job_file: Path | None) -> None:
    """Write one row per manifest row with its audio file, status and carried columns. Several
    ledgers (the shards of a job, or a folder of them) are merged."""
    from .results import export as export_results

    try:
        destination, rows = export_results(targets, to, manifest, load_job(job_file) if job_file else None)
    except BatchTTSError as exc:
        _fail(exc)
    click.echo(f"wrote {rows} rows to {_where(destination)}")


@main.group()
def manifest() -> None:
    """Make manifests."""


@manifest.command("from-text")
@click.argument("book", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path, dir_okay=False), help="chapters.csv to write.")
@click.option("--chapter-pattern", help="Regular expression for the lines that start a chapter.")
def from_text(book: Path, out: Path, chapter_pattern: str | None) -> None:
    """Turn a plain-text or Markdown BOOK into a manifest with one row per chapter (id, title, track, text)."""
    from .books import book_to_manifest

    try:
        chapters = book_to_manifest(book, out, chapter_pattern)
    except BatchTTSError as exc:
        _fail(exc)
    characters = sum(len(c.text) for c in chapters)
    click.echo(f"wrote {len(chapters)} chapters ({characters} characters) to {out}")
    for i, c in enumerate(chapters[:50], start=1):
        click.echo(f"  {i:>3}  {len(c.text):>8} chars  {c.title}")


@main.command()
@click.option("--base-url", envvar="BATCHTTS_BASE_URL", help="Speech API base URL (default OpenRouter's).")
@click.option("--job", "job_file", type=click.Path(path_type=Path, dir_okay=False), help="Use the job file's provider.")
@click.option("--refresh", is_flag=True, help="Ask the provider now instead of using the day-old cache.")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
def models(base_url: str | None, job_file: Path | None, refresh: bool, as_json: bool) -> None:
    """List the provider's speech models with their price and input limit (cached for a day)."""
    from . import log as logs
    from .models import speech_models

    logs.configure("auto")  # a stale cache or one that cannot be written is said on stderr

    try:
        job = load_job(job_file) if job_file else None
        provider = job.provider if job is not None else Provider()
        if base_url is not None:
            provider = Provider(base_url=base_url, api_key_env=provider.api_key_env)
        listing = speech_models(provider, job.timeouts if job is not None else Timeouts(), refresh=refresh)
    except BatchTTSError as exc:
        _fail(exc)
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


@main.command()
@click.option("--model", default="local/espeak-ng", show_default=True, help="Model whose voices to list.")
def voices(model: str) -> None:
    """List the voices a model takes (every eSpeak NG voice and variant for local/* models)."""
    from .engine import engine
    from .local import MODELS, OPENAI_VOICES
    from .providers import is_local

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


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
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
@click.option("--drop-first", default=0, type=click.IntRange(min=0), help="First N attempts of each input are cut after the headers.")
@click.option("--truncate-first", default=0, type=click.IntRange(min=0), help="First N attempts of each input are cut half-way.")
@click.option("--stall-first", default=0, type=click.IntRange(min=0), help="First N attempts of each input stall mid-body.")
@click.option("--stall-seconds", default=5.0, show_default=True, type=click.FloatRange(min=0),
              help="How long a stalled answer waits, half its body sent, before sending the rest.")
@click.option("--credits", type=click.IntRange(min=0), help="Answer 402 after this many successes.")
@click.option("--seed", type=int, help="Seed for the random faults.")
@click.option("--engine", default="espeak", show_default=True, type=click.Choice(["espeak", "tone"]),
              help="espeak: real speech from the embedded engine; tone: a cheap synthetic tone for load tests.")
def serve(**options: Any) -> None:
    """Run an OpenRouter-compatible speech server on loopback, with faults on demand."""
    try:
        from .server import ServeConfig, run_server
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
        _fail(exc)
