"""`batchtts run`: a job or a manifest narrated, its plan (--dry-run) and its summary."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .. import sharding
from ..config import (
    FORMATS,
    MASTERING_PRESETS,
    VERIFICATIONS,
    Budget,
    Checks,
    Defaults,
    Job,
    Mastering,
    Output,
    Provider,
    RetryPolicy,
    Timeouts,
    load_job,
    parse_duration,
)
from ..errors import EXIT_SIGINT, BatchTTSError
from ..money import usd
from .common import count, env_file_option, examples, fail, given, say_error, setting_flag, size, where

if TYPE_CHECKING:
    from ..mastering import Pass
    from ..narrator import Counters
    from ..runner import RunResult


@click.command(epilog=examples(
    "batchtts run jobs/demo.toml",
    "batchtts run sample_manifests/lines.csv -o out/lines -m openai/gpt-4o-mini-tts -v alloy",
    "batchtts run big.parquet -o out/big -c 64 --max-cost 20 --dry-run",
    "BATCHTTS_BASE_URL=http://127.0.0.1:8787/api/v1 batchtts run lines.csv -o out/rehearsal",
))
@click.argument("target", type=click.Path(path_type=Path, dir_okay=False))
@click.option("-o", "--out", help="Output folder for audio and the ledger, or s3://bucket/prefix (also gs://, hdfs://). "
              "Required unless the job file names it.")
@setting_flag(Defaults, "model", "-m", "--model", help="Default model for rows without a model column.")
@setting_flag(Defaults, "voice", "-v", "--voice", help="Default voice for rows without a voice column.")
@setting_flag(Defaults, "format", "-f", "--format", "fmt", type=click.Choice(FORMATS),
              help="Default output format (flac: asked for as pcm, encoded as it lands).")
@setting_flag(Defaults, "speed", "--speed", help="Default speed multiplier.")
@setting_flag(Output, "sample_rate", "--sample-rate", help="Make every file this sample rate, in Hz, as it lands "
              "(default: the provider's); part of each row's fingerprint, so a change narrates again.")
@setting_flag(Output, "channels", "--channels", help="Make every file mono (1) or stereo (2) as it lands (default: the "
              "provider's); part of each row's fingerprint, so a change narrates again.")
@setting_flag(Job, "concurrency", "-c", "--concurrency", help="Most requests in flight at once (lowered for a while after 429s).")
@setting_flag(Job, "requests_per_minute", "--rpm", help="Cap on requests per minute, for accounts whose limit is known.")
@setting_flag(RetryPolicy, "max_attempts", "--max-attempts", help="Attempts per row before it is recorded as failed.")
@setting_flag(Timeouts, "read", "--timeout", help="Read timeout in seconds (the wait for each chunk of a body).")
@setting_flag(Timeouts, "connect", "--connect-timeout", help="Connect timeout in seconds.")
@setting_flag(RetryPolicy, "backoff_initial", "--backoff-initial", help="First retry waits up to this many seconds (doubling after).")
@setting_flag(RetryPolicy, "backoff_max", "--backoff-max", help="Longest wait between two attempts, in seconds.")
@setting_flag(RetryPolicy, "max_row_seconds", "--max-row-seconds", help="Give up on a row after this many seconds of retrying.")
@setting_flag(Provider, "base_url", "--base-url", envvar="BATCHTTS_BASE_URL", show_envvar=True, help="Speech API base URL.")
@setting_flag(Provider, "api_key_env", "--api-key-env", help="Environment variable that holds the API key.")
@click.option("--ledger", type=click.Path(path_type=Path, dir_okay=False),
              help="Ledger file (default OUT/ledger.sqlite; needed with object-store output).")
@click.option("--retry-failed", is_flag=True, default=None, help="Also retry rows that failed permanently before.")
@click.option("--verify-files", is_flag=True, default=None,
              help="On a rerun, look at the size of every file done, not one in 64 (files are found by listing "
              "their folders).")
@click.option("--redo-flagged", is_flag=True, default=None,
              help="Narrate again the rows the audio checks flagged (at most [checks] max_redo times each), "
              "keeping a row's file until a better take lands.")
@setting_flag(Checks, "verify", "--verify", type=click.Choice(VERIFICATIONS),
              help="asr: also hear each English row with an offline recogniser for a word error rate, "
              "flagged over [checks] max_wer (needs the asr extra: pip install 'batchtts[asr]').")
@setting_flag(Job, "limit", "--limit", help="Narrate at most N of the rows left to do.")
@setting_flag(Job, "chunk_chars", "--chunk-chars",
              help="Split rows longer than this into chunks (default: the model's input limit, 4096 if unknown).")
@setting_flag(Budget, "max_cost", "--max-cost", help="Budget in USD for this run: stop taking rows before passing it.")
@setting_flag(Budget, "max_chars", "--max-chars", help="Budget in characters sent for this run.")
@setting_flag(Mastering, "preset", "--master", "master", type=click.Choice(MASTERING_PRESETS),
              help="Master each narrated file to a store's spec into OUT/mastered/: acx (RMS -23 to -18 dB, peaks "
              "under -3 dBFS, room tone, mp3 192 kbps) or podcast (-16 LUFS, true peak under -1 dBTP).")
@click.option("--max-runtime", help="End cleanly within this time: 3600, 50m, 2h, 1h30m.")
@click.option("--max-wait", default="5m", show_default=True,
              help="Longest wait a rate limit may ask for before the run stops with exit 3: 90, 10m, 1h.")
@click.option("--shard", help="Take only shard I of N: --shard 3/8.")
@click.option("--shards", type=click.IntRange(min=1),
              help="Number of shards, the index coming from JOB_COMPLETION_INDEX or SLURM_ARRAY_TASK_ID.")
@click.option("-n", "--dry-run", is_flag=True, default=None,
              help="Check the manifest, count what is left and estimate its cost; send nothing.")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: print the plan as one JSON object.")
@setting_flag(Job, "grace_seconds", "--grace", "grace_seconds", help="Seconds in-flight requests get to finish after Ctrl-C.")
@setting_flag(Job, "progress_interval", "--progress-interval", help="Seconds between progress events when not on a terminal.")
@setting_flag(Job, "log_format", "--log-format", type=click.Choice(["auto", "console", "json"]),
              help="Log rendering: a console for people on a terminal, JSON lines otherwise (auto).")
@click.option("--strict", is_flag=True, default=None,
              help="Refuse to start when a model is not in the provider's model list (default: warn).")
@click.option("--lexicon", type=click.Path(path_type=Path, dir_okay=False),
              help="Pronunciation lexicon, CSV or TSV (pattern, replacement[, model, voice, language, regex]): "
              "words rewritten before they are sent; in place of the job file's [lexicon] file.")
@setting_flag(Job, "captions", "--captions", type=click.Choice(["srt", "vtt"]),
              help="Write captions beside each audio file (ch01.srt next to ch01.mp3), timed from the audio.")
@env_file_option
def run(target: Path, **flags: Any) -> None:
    """Narrate TARGET: a job file (.toml) or a manifest (.csv, .tsv, .parquet, .jsonl).

    Flags override the job file. Run the same command again at any time: only the rows left are
    narrated.

    \b
    Environment:
      OPENROUTER_API_KEY   the API key (or the variable --api-key-env names); not needed for local/* models
      BATCHTTS_BASE_URL    another OpenAI-compatible endpoint, or a `batchtts serve` rehearsal
      JOB_COMPLETION_INDEX, SLURM_ARRAY_TASK_ID   the shard index, with --shards N
      .env                 read from the working folder (or --env-file); never overrides the environment

    \b
    Exit codes: 0 all done; 1 some rows failed; 2 usage, config or manifest error (nothing sent);
    3 stopped by the provider (bad key, no credits), progress kept; 4 budget reached; 5 --max-runtime
    reached; 6 halted by a full disk or an unwritable ledger, progress kept; 75 another run holds the
    ledger; 130/143 interrupted, progress kept.
    """
    from .. import log as logs

    flags = given(flags)
    logs.configure(flags.get("log_format") or "auto")
    is_job = target.suffix.lower() == ".toml"
    if flags["as_json"] and not flags["dry_run"]:
        raise click.UsageError("--json goes with --dry-run: a run reports as JSON lines with --log-format json")
    try:
        shard = sharding.detect(flags["shard"], flags["shards"])
        max_runtime = parse_duration(flags["max_runtime"]) if flags["max_runtime"] is not None else None
        max_wait = parse_duration(flags["max_wait"]) if flags["max_wait"] is not None else None
    except BatchTTSError as exc:
        fail(exc)
    overrides = {
        "manifest": None if is_job else target,
        "out": flags["out"],
        "ledger": flags["ledger"],
        "defaults.model": flags["model"],
        "defaults.voice": flags["voice"],
        "defaults.format": flags["fmt"],
        "defaults.speed": flags["speed"],
        "output.sample_rate": flags["sample_rate"],
        "output.channels": flags["channels"],
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
        "verify_files": flags["verify_files"],
        "redo_flagged": flags["redo_flagged"],
        "checks.verify": flags["verify"],
        "limit": flags["limit"],
        "chunk_chars": flags["chunk_chars"],
        "budget.max_cost": flags["max_cost"],
        "budget.max_chars": flags["max_chars"],
        "mastering.preset": flags["master"],
        "max_runtime": max_runtime,
        "retry.max_wait": max_wait,
        "shard": shard,
        "dry_run": flags["dry_run"],
        "grace_seconds": flags["grace_seconds"],
        "progress_interval": flags["progress_interval"],
        "log_format": flags["log_format"],
        "strict": flags["strict"],
        "lexicon": flags["lexicon"],
        "captions": flags["captions"],
    }
    try:
        job = load_job(target if is_job else None, **overrides)
        if job.log_format != (flags.get("log_format") or "auto"):
            logs.configure(job.log_format)
        from ..runner import run as run_job

        with _no_echoed_interrupt():
            result = run_job(job, signals=True)
    except BatchTTSError as exc:
        fail(exc)
    except KeyboardInterrupt:
        click.echo("batchtts: interrupted before any request was sent", err=True)
        sys.exit(EXIT_SIGINT)
    if job.dry_run and flags["as_json"]:
        click.echo(json.dumps({"manifest": str(job.manifest), "shard": None if job.shard is None else str(job.shard),
                               "limit": job.limit, **result.plan.as_dict(result.prices),
                               "stop_reason": result.stop_reason, "exit_code": result.exit_code}))
    elif job.dry_run:
        _print_plan(result, job)
    else:
        _print_summary(result, job)
    sys.exit(result.exit_code)


@contextlib.contextmanager
def _no_echoed_interrupt() -> Iterator[None]:
    """On a terminal, keep Ctrl-C from echoing `^C` into the progress bar's line while the run stops.
    Only a run in the terminal's foreground changes it: one started with `&` would be stopped
    (SIGTTOU) for trying; one sent to the background meanwhile puts it back without being stopped."""
    try:
        import termios

        fd = sys.stdin.fileno()
        before = termios.tcgetattr(fd) if os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp() else None
    except (ImportError, OSError, ValueError):
        before = None
    if before is None:
        yield
        return
    quiet = list(before)
    quiet[3] &= ~termios.ECHOCTL
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTTOU})
        try:
            termios.tcsetattr(fd, termios.TCSANOW, before)
        except termios.error:
            pass  # the terminal went away with the session: nothing to put back
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _print_plan(result: RunResult, job: Job) -> None:
    plan, total, prices = result.plan, result.plan.total, result.prices
    shard = f", shard {job.shard}" if job.shard is not None else ""
    limit = f"; 'to do' counts at most the --limit of {job.limit:,}" if job.limit is not None else ""
    click.echo(f"{job.manifest}{shard}: {count(total.rows, 'row')}, {total.characters:,} characters "
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
    if total.copies:
        click.echo(f"identical requests: {count(total.copies, 'row')} to do copy the file of a row with the same "
                   f"request ({count(total.requests_saved, 'request')} saved, not in 'requests')")
    if plan.pooled:
        mix = ", ".join(f"{voice} {n:,}" for voice, n in sorted(plan.speakers.items(), key=lambda vn: (-vn[1], vn[0])))
        click.echo(f"voice mix ({count(plan.pooled, 'row')} drawn from a list or pool): {mix}")
    budget, spending = job.budget, plan.budget
    if result.stop_reason:
        say_error(result.stop_reason, result.exit_code)
    elif spending is not None:
        caps = [usd(budget.max_cost) if budget.max_cost is not None else None,
                f"{budget.max_chars:,} characters" if budget.max_chars is not None else None]
        unpriced = (f" ({spending.unpriced_characters:,} of the characters to models without a known price)"
                    if spending.unpriced_characters else "")
        click.echo(f"budget per run: {' and '.join(c for c in caps if c)}\n"
                   f"  this run takes {spending.rows:,} of the {count(total.pending, 'row')} to do: "
                   f"{spending.characters:,} characters sent, {usd(spending.cost)}{unpriced}")
        for reason in (f"then {spending.refused}" if spending.refused else None, spending.passed_over):
            if reason:
                click.echo(f"  {reason}")


def _spent(result: RunResult) -> str:
    c, unpriced = result.counters, result.counters.unpriced_characters
    if unpriced and not c.cost_usd:
        return f"estimated cost unknown ({unpriced:,} characters to models without a known price)"
    return f"estimated cost {usd(c.cost_usd)} ({result.prices.source})" + (
        f", plus {unpriced:,} characters to models without a known price" if unpriced else "")


def _print_summary(result: RunResult, job: Job) -> None:
    c, total = result.counters, result.plan.total
    lines = [
        f"narrated {count(c.done, 'row')}, {c.failed} failed, {total.done} already done"
        + (f", {total.failed} failed earlier (rerun with --retry-failed)" if total.failed else ""),
        f"{size(c.bytes)}, {c.audio_s:.1f} s of audio, {count(c.requests, 'request')}, {count(c.retries, 'retry', 'retries')}, "
        f"{result.wall_s:.1f} s",
        f"{c.characters_sent:,} characters sent" + (f" (and {c.local_characters:,} narrated locally)"
                                                    if c.local_characters else "") + ", " + _spent(result),
        *([f"{count(c.requests_saved, 'request')} saved: {count(c.copied, 'row')} copied the file of an "
           "identical request"] if c.copied else []),
        f"files in {where(job.out)}, ledger at {job.ledger_path}"
        + (f" (shard {job.shard}, from {job.shard.source})" if job.shard is not None else ""),
    ]
    if c.checked:
        lines.append(_checked_line(c, job))
    if result.mastering is not None:
        lines += _mastered_lines(result.mastering, job)
    left = max(total.pending - c.done - c.failed - (c.redone - c.replaced), 0)
    if result.stop_reason:
        lines.insert(0, f"stopped: {result.stop_reason}" + (f"; {count(left, 'row')} left" if left else ""))
    if result.advice:
        lines.append(result.advice)
    elif result.exit_code == 1 and c.failed + total.failed:
        lines.append(f"see the failed rows with: batchtts status {job.ledger_path}")
    elif result.stop_reason:
        lines.append(f"to resume, run the same command again: {shlex.join(['batchtts', *sys.argv[1:]])}")
    click.echo("\n".join(lines))


def _checked_line(c: Counters, job: Job) -> str:
    """What the audio checks found of the files this run wrote, and of the flagged rows it redid."""
    line = f"checked {count(c.checked, 'file')}: {c.flagged:,} flagged"
    if c.redone:
        line += f"; narrated {count(c.redone, 'flagged row')} again, {c.replaced:,} replaced by a better take"
    if c.flagged:
        line += f" (see why with: batchtts status {job.ledger_path}"
        line += ")" if job.redo_flagged else "; narrate them again with --redo-flagged)"
    return line


def _mastered_lines(done: Pass, job: Job) -> list[str]:
    lines = [f"mastered {count(done.mastered, 'file')} to {done.preset} in {where(job.out)}/mastered"
             + (f" ({done.kept:,} mastered before)" if done.kept else "")]
    lines += [f"  could not master {failure}" for failure in done.failures[:20]]
    if len(done.failures) > 20:
        lines.append(f"  ... and {len(done.failures) - 20:,} more")
    if done.off_spec:
        lines.append(f"  {count(done.off_spec, 'file')} miss the {done.preset} spec: see why with "
                     f"batchtts qc {where(job.out)}")
    return lines

