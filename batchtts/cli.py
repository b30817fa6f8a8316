"""The command line: parse, call the library, report. No work happens here."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click
from click.core import ParameterSource

from . import __version__, sharding
from .config import (
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
    bounds_of,
    load_job,
    parse_duration,
)
from .errors import EXIT_INTERNAL, EXIT_SIGINT, EXIT_USAGE, BatchTTSError, UsageError
from .money import usd
from .redact import redact_uri

if TYPE_CHECKING:
    from .mastering import Pass
    from .narrator import Counters
    from .qc import FileCheck
    from .runner import RunResult

_F = TypeVar("_F", bound=Callable[..., Any])


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


def _setting_flag(settings: type, name: str, *decls: str, **kwargs: Any) -> Callable[[_F], _F]:
    """A flag for a job setting: its range and its default come from the setting itself, so help
    shows what a run without the flag does. `_given` drops it unless it was given: the job file's wins."""
    spec = next(f for f in dataclasses.fields(settings) if f.name == name)
    default = spec.default
    if "type" not in kwargs and spec.metadata.get("bounds") is not None:
        kwargs["type"] = _ranged(settings, name)
    if default is not None and default is not False:
        kwargs.update(default=default, show_default=True)
    return click.option(*decls, **kwargs)


def _given(flags: dict[str, Any]) -> dict[str, Any]:
    """The flags the user gave (on the line or through the environment); None for the rest."""
    ctx = click.get_current_context()
    return {name: None if ctx.get_parameter_source(name) is ParameterSource.DEFAULT else value
            for name, value in flags.items()}


def _examples(*lines: str) -> str:
    """An epilog of examples, kept as written (click rewraps other paragraphs)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


def _load_env_file(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """Read KEY=VALUE lines into the environment before anything reads them. A variable already set
    wins, as with the systemd recipe's EnvironmentFile; nothing is expanded, as there."""
    path = value if value is not None else Path(".env")
    try:
        with path.open(encoding="utf-8-sig") as f:
            from dotenv.parser import parse_stream  # loaded when there is a file: most commands have none

            bindings = list(parse_stream(f))
    except FileNotFoundError:
        if value is None:
            return None
        _fail(UsageError(f"--env-file {path}: no such file"))
    except (OSError, UnicodeDecodeError) as exc:
        _fail(UsageError(f"{path}: cannot be read ({exc})"))
    for binding in bindings:
        if binding.error or (binding.key is not None and binding.value is None):
            # The line is not echoed: it may hold a key. A .env found in the folder may be another
            # tool's (docker compose takes a bare NAME): its other lines are still read.
            said = f"{path}, line {binding.original.line}: not KEY=VALUE (or a # comment)"
            if value is not None:
                _fail(UsageError(said))
            click.echo(f"batchtts: {said}; line skipped", err=True)
    for binding in bindings:
        if binding.key is not None and binding.value is not None:
            os.environ.setdefault(binding.key, binding.value)
    return value


_env_file_option = click.option(
    "--env-file", type=click.Path(path_type=Path, dir_okay=False), is_eager=True, expose_value=False,
    callback=_load_env_file, help="KEY=VALUE lines to read into the environment (default: ./.env if there is one); "
    "a variable already set is kept.")


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


@click.group(cls=_Commands, context_settings={"max_content_width": 100, "help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="batchtts")
def main() -> None:
    """Narrate a manifest of texts into one audio file per row, resumably."""


@main.command(epilog=_examples(
    "batchtts run jobs/demo.toml",
    "batchtts run sample_manifests/lines.csv -o out/lines -m openai/gpt-4o-mini-tts -v alloy",
    "batchtts run big.parquet -o out/big -c 64 --max-cost 20 --dry-run",
    "BATCHTTS_BASE_URL=http://127.0.0.1:8787/api/v1 batchtts run lines.csv -o out/rehearsal",
))
@click.argument("target", type=click.Path(path_type=Path, dir_okay=False))
@click.option("-o", "--out", help="Output folder for audio and the ledger, or s3://bucket/prefix (also gs://, hdfs://). "
              "Required unless the job file names it.")
@_setting_flag(Defaults, "model", "-m", "--model", help="Default model for rows without a model column.")
@_setting_flag(Defaults, "voice", "-v", "--voice", help="Default voice for rows without a voice column.")
@_setting_flag(Defaults, "format", "-f", "--format", "fmt", type=click.Choice(FORMATS),
               help="Default output format (flac: asked for as pcm, encoded as it lands).")
@_setting_flag(Defaults, "speed", "--speed", help="Default speed multiplier.")
@_setting_flag(Output, "sample_rate", "--sample-rate", help="Make every file this sample rate, in Hz, as it lands "
               "(default: the provider's); part of each row's fingerprint, so a change narrates again.")
@_setting_flag(Output, "channels", "--channels", help="Make every file mono (1) or stereo (2) as it lands (default: the "
               "provider's); part of each row's fingerprint, so a change narrates again.")
@_setting_flag(Job, "concurrency", "-c", "--concurrency", help="Most requests in flight at once (lowered for a while after 429s).")
@_setting_flag(Job, "requests_per_minute", "--rpm", help="Cap on requests per minute, for accounts whose limit is known.")
@_setting_flag(RetryPolicy, "max_attempts", "--max-attempts", help="Attempts per row before it is recorded as failed.")
@_setting_flag(Timeouts, "read", "--timeout", help="Read timeout in seconds (the wait for each chunk of a body).")
@_setting_flag(Timeouts, "connect", "--connect-timeout", help="Connect timeout in seconds.")
@_setting_flag(RetryPolicy, "backoff_initial", "--backoff-initial", help="First retry waits up to this many seconds (doubling after).")
@_setting_flag(RetryPolicy, "backoff_max", "--backoff-max", help="Longest wait between two attempts, in seconds.")
@_setting_flag(RetryPolicy, "max_row_seconds", "--max-row-seconds", help="Give up on a row after this many seconds of retrying.")
@_setting_flag(Provider, "base_url", "--base-url", envvar="BATCHTTS_BASE_URL", show_envvar=True, help="Speech API base URL.")
@_setting_flag(Provider, "api_key_env", "--api-key-env", help="Environment variable that holds the API key.")
@click.option("--ledger", type=click.Path(path_type=Path, dir_okay=False),
              help="Ledger file (default OUT/ledger.sqlite; needed with object-store output).")
@click.option("--retry-failed", is_flag=True, default=None, help="Also retry rows that failed permanently before.")
@click.option("--verify-files", is_flag=True, default=None,
              help="On a rerun, look at the size of every file done, not one in 64 (files are found by listing "
              "their folders).")
@click.option("--redo-flagged", is_flag=True, default=None,
              help="Narrate again the rows the audio checks flagged (at most [checks] max_redo times each), "
              "keeping a row's file until a better take lands.")
@_setting_flag(Checks, "verify", "--verify", type=click.Choice(VERIFICATIONS),
               help="asr: also hear each English row with an offline recogniser for a word error rate, "
               "flagged over [checks] max_wer (needs the asr extra: pip install 'batchtts[asr]').")
@_setting_flag(Job, "limit", "--limit", help="Narrate at most N of the rows left to do.")
@_setting_flag(Job, "chunk_chars", "--chunk-chars",
               help="Split rows longer than this into chunks (default: the model's input limit, 4096 if unknown).")
@_setting_flag(Budget, "max_cost", "--max-cost", help="Budget in USD for this run: stop taking rows before passing it.")
@_setting_flag(Budget, "max_chars", "--max-chars", help="Budget in characters sent for this run.")
@_setting_flag(Mastering, "preset", "--master", "master", type=click.Choice(MASTERING_PRESETS),
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
@_setting_flag(Job, "grace_seconds", "--grace", "grace_seconds", help="Seconds in-flight requests get to finish after Ctrl-C.")
@_setting_flag(Job, "progress_interval", "--progress-interval", help="Seconds between progress events when not on a terminal.")
@_setting_flag(Job, "log_format", "--log-format", type=click.Choice(["auto", "console", "json"]),
               help="Log rendering: a console for people on a terminal, JSON lines otherwise (auto).")
@click.option("--strict", is_flag=True, default=None,
              help="Refuse to start when a model is not in the provider's model list (default: warn).")
@click.option("--lexicon", type=click.Path(path_type=Path, dir_okay=False),
              help="Pronunciation lexicon, CSV or TSV (pattern, replacement[, model, voice, language, regex]): "
              "words rewritten before they are sent; in place of the job file's [lexicon] file.")
@_setting_flag(Job, "captions", "--captions", type=click.Choice(["srt", "vtt"]),
               help="Write captions beside each audio file (ch01.srt next to ch01.mp3), timed from the audio.")
@_env_file_option
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
    from . import log as logs

    flags = _given(flags)
    logs.configure(flags.get("log_format") or "auto")
    is_job = target.suffix.lower() == ".toml"
    if flags["as_json"] and not flags["dry_run"]:
        raise click.UsageError("--json goes with --dry-run: a run reports as JSON lines with --log-format json")
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
        from .runner import run as run_job

        with _no_echoed_interrupt():
            result = run_job(job, signals=True)
    except BatchTTSError as exc:
        _fail(exc)
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
    if total.copies:
        click.echo(f"identical requests: {_count(total.copies, 'row')} to do copy the file of a row with the same "
                   f"request ({_count(total.requests_saved, 'request')} saved, not in 'requests')")
    if plan.pooled:
        mix = ", ".join(f"{voice} {n:,}" for voice, n in sorted(plan.speakers.items(), key=lambda vn: (-vn[1], vn[0])))
        click.echo(f"voice mix ({_count(plan.pooled, 'row')} drawn from a list or pool): {mix}")
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
        *([f"{_count(c.requests_saved, 'request')} saved: {_count(c.copied, 'row')} copied the file of an "
           "identical request"] if c.copied else []),
        f"files in {_where(job.out)}, ledger at {job.ledger_path}"
        + (f" (shard {job.shard}, from {job.shard.source})" if job.shard is not None else ""),
    ]
    if c.checked:
        lines.append(_checked_line(c, job))
    if result.mastering is not None:
        lines += _mastered_lines(result.mastering, job)
    left = max(total.pending - c.done - c.failed - (c.redone - c.replaced), 0)
    if result.stop_reason:
        lines.insert(0, f"stopped: {result.stop_reason}" + (f"; {_count(left, 'row')} left" if left else ""))
    if result.advice:
        lines.append(result.advice)
    elif result.exit_code == 1 and c.failed + total.failed:
        lines.append(f"see the failed rows with: batchtts status {job.ledger_path}")
    elif result.stop_reason:
        lines.append(f"to resume, run the same command again: {shlex.join(['batchtts', *sys.argv[1:]])}")
    click.echo("\n".join(lines))


def _checked_line(c: Counters, job: Job) -> str:
    """What the audio checks found of the files this run wrote, and of the flagged rows it redid."""
    line = f"checked {_count(c.checked, 'file')}: {c.flagged:,} flagged"
    if c.redone:
        line += f"; narrated {_count(c.redone, 'flagged row')} again, {c.replaced:,} replaced by a better take"
    if c.flagged:
        line += f" (see why with: batchtts status {job.ledger_path}"
        line += ")" if job.redo_flagged else "; narrate them again with --redo-flagged)"
    return line


def _mastered_lines(done: Pass, job: Job) -> list[str]:
    lines = [f"mastered {_count(done.mastered, 'file')} to {done.preset} in {_where(job.out)}/mastered"
             + (f" ({done.kept:,} mastered before)" if done.kept else "")]
    lines += [f"  could not master {failure}" for failure in done.failures[:20]]
    if len(done.failures) > 20:
        lines.append(f"  ... and {len(done.failures) - 20:,} more")
    if done.off_spec:
        lines.append(f"  {_count(done.off_spec, 'file')} miss the {done.preset} spec: see why with "
                     f"batchtts qc {_where(job.out)}")
    return lines


@main.command(epilog=_examples(
    "batchtts status out/lines",
    "batchtts status out/lines --json | jq .pending",
    "batchtts status out/big --watch",
    "batchtts status out/nightly --check || mail -s 'narration failures' me@example.com",
))
@click.argument("targets", nargs=-1)
@click.option("--manifest", type=click.Path(path_type=Path, dir_okay=False),
              help="Manifest to count pending rows against (default: the last run's).")
@click.option("--job", "job_file", type=click.Path(path_type=Path, dir_okay=False), help="Job file naming the manifest.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (one line per job).")
@click.option("--check", is_flag=True, help="Exit 1 when rows failed, 2 on an error: for cron alerts.")
@click.option("-w", "--watch", is_flag=True, help="Follow a running job: report again every --interval seconds "
              "until its run ends.")
@click.option("--interval", default=2.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds between two reports with --watch.")
def status(targets: tuple[str, ...], manifest: Path | None, job_file: Path | None, as_json: bool, check: bool,
           watch: bool, interval: float) -> None:
    """Show what output folders or ledger files hold: rows done, failed and pending, counted as the
    next run would count them. The shards of a job (or a folder of them) are read as one job;
    different jobs are reported one by one."""
    from .results import by_job
    from .results import status as status_report

    try:
        job = load_job(job_file) if job_file else None
        groups = by_job(targets) if targets else [[]]
        while True:
            reports = [status_report(group, manifest, job) for group in groups]
            for report in reports:
                click.echo(json.dumps(report) if as_json else _status_text(report))
            if not watch or all(r["running"] is None for r in reports):
                break
            time.sleep(interval)
            if not as_json:
                click.echo()
    except BatchTTSError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        sys.exit(0)  # the end of --watch
    if check and any(r["failed"] for r in reports):
        sys.exit(1)


def _status_text(report: dict[str, Any]) -> str:
    total = "?" if report["total"] is None else f"{report['total']:,}"
    pending = "? (pass --manifest)" if report["pending"] is None else f"{report['pending']:,}"
    failed = f"{report['failed']:,}"
    retried = report.get("retried_next_run")
    if report["failed"] and retried is not None:
        later = report["failed"] - retried
        failed += (" (the next run retries them)" if not later else
                   " (rerun with --retry-failed to retry them)" if not retried else
                   f" ({retried:,} retried by the next run, {later:,} with --retry-failed)")
    ledgers = report["ledgers"]
    title = ledgers[0] if len(ledgers) == 1 else f"{os.path.commonpath(ledgers)}/: {len(ledgers)} ledgers of one job"
    if report["running"] is not None:
        title += f" (a run is going: pid {report['running'] or '?'})"
    if report["missing_shards"]:
        title += (f"\n  no ledger yet for shard{'s' if len(report['missing_shards']) > 1 else ''} "
                  f"{', '.join(map(str, report['missing_shards']))}: their rows count as pending")
    lines = [title, f"  total {total}, done {report['done']:,}, failed {failed}, pending {pending}",
             f"  {_size(report['bytes'])}, {report['audio_s']:.1f} s of audio"
             + (f"; {report['requests_saved']:,} requests saved by {_count(report['copied'], 'row')} copying "
                "an identical request's file" if report.get("copied") else "")]
    for f in report["failures"]:
        again = "retried on next run" if f["retryable"] else "rerun with --retry-failed"
        where, _, error = f["error"].partition(": ") if f["error"].startswith("chunk ") else ("", "", f["error"])
        http = f"HTTP {f['http_status']}: " if f["http_status"] is not None else ""
        lines.append(f"  row {f['row_number']} ({f['key']}): {where + ': ' if where else ''}{http}{error} [{again}]")
    if report.get("checked"):
        copies = " (a copy's by the file it copies)" if report.get("copied") else ""
        lines.append(f"  audio checks: {report['checked']:,} rows checked{copies}, {report['flagged']:,} flagged"
                     + (" (narrate them again with run --redo-flagged)" if report["flagged"] else ""))
    for f in report.get("flags", ()):
        again = f" [narrated again {_count(f['redos'], 'time')}]" if f["redos"] else ""
        lines.append(f"  row {f['row_number']} ({f['key']}): flagged: {f['flag_reasons']}{again}")
    return "\n".join(lines)


@main.command(epilog=_examples(
    "batchtts export out/lines",
    "batchtts export out/lines --to results.csv",
    "batchtts export out/lines --to - --format jsonl | jq -c 'select(.status == \"failed\")'",
    "batchtts export out/big --to s3://bucket/big/results.parquet",
    "batchtts export out/big --format nemo --to datasets/big --split train=0.98,validation=0.01,test=0.01",
    "batchtts export out/big --format ljspeech --to datasets/ljspeech",
    "batchtts export out/big --format hf --to s3://bucket/datasets/big --sample-rate 16000",
    "batchtts export out/big --format webdataset --to datasets/wds --shard-size 1GB",
))
@click.argument("targets", nargs=-1)
@click.option("--to", "to", help="results.parquet, .csv or .jsonl, a path or s3://…, or - for stdout "
              "(default: OUT/results.parquet); for a dataset, a new folder or s3://… prefix.")
@click.option("--format", "fmt", type=click.Choice(["parquet", "csv", "jsonl", "nemo", "ljspeech", "hf", "webdataset"]),
              help="Format, when --to's name does not say it (with --to -: csv); or a dataset's layout: NeMo "
              "manifests, LJSpeech, Hugging Face Parquet shards, WebDataset tars.")
@click.option("--manifest", type=click.Path(path_type=Path, dir_okay=False), help="Manifest (default: the last run's).")
@click.option("--job", "job_file", type=click.Path(path_type=Path, dir_okay=False), help="Job file naming the manifest.")
@click.option("--split", help="A dataset's splits by key, as train=0.98,validation=0.01,test=0.01 (default: the "
              "manifest's split column, else all train).")
@click.option("--shard-size", help="Rows (1000) or bytes (500MB, 1GB) a shard of a dataset: NeMo's tars (none "
              "unless given), Hugging Face's Parquet files (500MB), WebDataset's tars (1GB).")
@click.option("--sample-rate", type=click.IntRange(min=1000), help="A dataset's sample rate, in Hz (default: the "
              "files' own; LJSpeech: 22050).")
@click.option("--channels", type=click.IntRange(1, 2), help="A dataset's channels (default: the files' own; LJSpeech: 1).")
@click.option("--audio-format", type=click.Choice(["flac", "wav", "mp3"]), help="A dataset's audio (default: wav "
              "for NeMo and LJSpeech, flac for Hugging Face and WebDataset). A file already so is copied as it is.")
@click.option("--include-flagged", is_flag=True, help="Keep in a dataset the rows the audio checks flagged (left out "
              "by default).")
def export(targets: tuple[str, ...], to: str | None, fmt: str | None, manifest: Path | None, job_file: Path | None,
           split: str | None, shard_size: str | None, sample_rate: int | None, channels: int | None,
           audio_format: str | None, include_flagged: bool) -> None:
    """Write one row per manifest row with its audio file, status and carried columns; or, with a
    dataset --format, the narrated rows as a speech dataset that trainers read, the audio in the
    shape asked for. The shards of a job (or a folder of them) are read as one job."""
    shaping = {"--split": split, "--shard-size": shard_size, "--sample-rate": sample_rate, "--channels": channels,
               "--audio-format": audio_format, "--include-flagged": include_flagged or None}
    if fmt in ("nemo", "ljspeech", "hf", "webdataset"):
        from .datasets import export_dataset

        try:
            if to is None or to == "-":
                raise UsageError(f"a {fmt} dataset is a folder of files: give --to a new folder (or s3://… prefix)")
            result = export_dataset(targets, to, fmt, manifest=manifest, job=load_job(job_file) if job_file else None,
                                    split=split, shard_size=shard_size, sample_rate=sample_rate, channels=channels,
                                    audio_format=audio_format, include_flagged=include_flagged)
        except BatchTTSError as exc:
            _fail(exc)
        click.echo("\n".join(result.lines()))
        return
    if given := [name for name, value in shaping.items() if value is not None]:
        _fail(UsageError(f"{', '.join(given)}: only for a dataset (--format nemo, ljspeech, hf or webdataset)"))
    from .results import export as export_results

    stream = sys.stdout.buffer if to == "-" else None
    try:
        destination, rows = export_results(targets, stream or to, manifest, load_job(job_file) if job_file else None,
                                           format=fmt)
    except BatchTTSError as exc:
        _fail(exc)
    except BrokenPipeError:
        _reader_left()
    except OSError as exc:
        if stream is None:
            raise
        _fail(UsageError(f"cannot write the export to standard output: {exc.strerror or exc}"))
    if stream is None:
        assert isinstance(destination, str | Path)
        click.echo(f"wrote {rows} rows to {_where(destination)}")


def _reader_left() -> NoReturn:
    """The reader of standard output stopped early (`| head`): nothing to say; exit as a tool killed
    by SIGPIPE would, with nothing left to flush into the closed pipe."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(128 + signal.SIGPIPE)


@main.command(epilog=_examples(
    "batchtts audiobook out/book --to Book.m4b",
    "batchtts audiobook out/book --to Book.m4b --split-hours 10",
    "batchtts audiobook out/book --to Book.mp3 --allow-missing",
))
@click.argument("targets", nargs=-1)
@click.option("--to", "to", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="The book to write: .m4b (AAC with chapter marks), .m4a, or .mp3 (ID3 chapters).")
@click.option("--split-hours", type=click.FloatRange(min=0, min_open=True),
              help="Write parts 'BOOK - Part N' of at most this many hours each, split between chapters.")
@click.option("--allow-missing", is_flag=True, help="Leave out chapters not narrated (or failed) instead of refusing.")
@click.option("--bitrate", "bitrate_kbps", default=64, show_default=True, type=click.IntRange(16, 320),
              help="Audio bitrate in kbit/s.")
@click.option("--manifest", type=click.Path(path_type=Path, dir_okay=False), help="Manifest (default: the last run's).")
@click.option("--job", "job_file", type=click.Path(path_type=Path, dir_okay=False), help="Job file naming the manifest.")
def audiobook(targets: tuple[str, ...], to: Path, split_hours: float | None, allow_missing: bool, bitrate_kbps: int,
              manifest: Path | None, job_file: Path | None) -> None:
    """Make a finished run of a chapters manifest into one audiobook file: the chapters in the order
    of the manifest's track column, a chapter mark each named by its title, the book tagged from its
    album, artist and cover columns (cover: a JPEG or PNG, relative to the manifest's folder)."""
    from .audiobook import make_audiobook

    try:
        result = make_audiobook(targets, to, manifest=manifest, job=load_job(job_file) if job_file else None,
                                split_hours=split_hours, allow_missing=allow_missing, bitrate_kbps=bitrate_kbps)
    except BatchTTSError as exc:
        _fail(exc)
    if result.left_out:
        shown = "; ".join(map(str, result.left_out[:5])) + ("; ..." if len(result.left_out) > 5 else "")
        click.echo(f"left out {_count(len(result.left_out), 'chapter')} with no audio: {shown}")
    for f in result.files:
        minutes, seconds = divmod(round(f.duration_s), 60)
        click.echo(f"wrote {f.path}: {_count(f.chapters, 'chapter')}, {minutes // 60}:{minutes % 60:02d}:{seconds:02d}, "
                   f"{_size(f.bytes)}")


@main.command(epilog=_examples(
    "batchtts report out/nightly",
    "batchtts report out/nightly --to logs/nightly-$(date +%F).html",
    "batchtts report out/big/ledger-shard-3-of-8.sqlite --run all",
))
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--to", "to", type=click.Path(path_type=Path, dir_okay=False),
              help="HTML file to write.  [default: report.html beside the ledger]")
@click.option("--run", "run", default="last", show_default=True,
              help="Which run: its number, last (each ledger's newest) or all.")
def report(target: Path, to: Path | None, run: str) -> None:
    """Draw how a run went into one HTML page that opens offline: requests and successes per second,
    latency percentiles, 429s and 5xx, the throttle's concurrency and pace, characters and cost,
    failed rows by reason. TARGET is an output folder or a ledger file. Needs the report extra:
    pip install 'batchtts[report]'."""
    from .report import write_report

    try:
        destination = write_report(target, to, run)
    except BatchTTSError as exc:
        _fail(exc)
    click.echo(f"wrote the report to {destination}")


@main.command(epilog=_examples(
    "batchtts qc out/book",
    "batchtts qc out/book --preset acx",
    "batchtts qc out/book --json | jq -c 'select(.passed | not) | {row, problems}'",
))
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--preset", "preset_name", type=click.Choice([p for p in MASTERING_PRESETS if p != "none"]),
              help="The spec to hold the files to (default: the preset each file was mastered to).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object a line, a file each.")
def qc(target: Path, preset_name: str | None, as_json: bool) -> None:
    """Measure each file of a job and hold it to a store's spec: integrated loudness, RMS, peak, true
    peak, noise floor, head and tail silence, length. TARGET is an output folder or a ledger file. A
    job run with --master is checked by its mastered files; one without, by its narrated files
    against --preset.

    \b
    Exit codes: 0 every file passes; 1 some file fails; 2 usage error."""
    from .qc import check_files

    failed = checked = 0
    try:
        for f in check_files(target, preset_name):
            if not as_json and not checked:
                click.echo(f"{'row':>5} {'id':<20} {'LUFS':>6} {'RMS':>6} {'peak':>6} {'TP':>6} {'floor':>6} "
                           f"{'head':>5} {'tail':>5} {'length':>8}  result")
            checked += 1
            failed += not f.passed
            click.echo(json.dumps(f.as_dict()) if as_json else _qc_text(f))
    except BatchTTSError as exc:
        _fail(exc)
    except BrokenPipeError:
        _reader_left()
    if not as_json:
        click.echo(f"{_count(checked, 'file')}: {checked - failed:,} pass, {failed:,} fail")
    sys.exit(1 if failed else 0)


def _qc_text(f: FileCheck) -> str:
    """One file of `qc` as a table row, its problems on the lines below."""
    m = f.measurement

    def level(value: float | None) -> str:
        return "-inf" if value is None else f"{value:.1f}"

    ident = f.id if len(f.id) <= 20 else f.id[:19] + "…"
    if m is None:
        cells = f"{'':>6} {'':>6} {'':>6} {'':>6} {'':>6} {'':>5} {'':>5} {'':>8}"
    else:
        loudness = "-" if m.loudness_lufs is None else f"{m.loudness_lufs:.1f}"
        minutes, seconds = divmod(m.length_s, 60)
        cells = (f"{loudness:>6} {level(m.rms_db):>6} {level(m.peak_db):>6} {level(m.true_peak_db):>6} "
                 f"{level(m.noise_floor_db):>6} {m.head_s:>5.2f} {m.tail_s:>5.2f} {int(minutes):>4}:{seconds:04.1f}")
    lines = [f"{f.row if f.row is not None else '?':>5} {ident:<20} {cells}  {'pass' if f.passed else 'FAIL'} {f.preset}"]
    lines += [f"{'':>6}{problem}" for problem in f.problems]
    return "\n".join(lines)


@main.group()
def manifest() -> None:
    """Make manifests."""


@manifest.command("from-text", epilog=_examples(
    "batchtts manifest from-text sample_manifests/book.epub -o chapters.csv",
    "batchtts manifest from-text sample_manifests/book.md -o chapters.csv --no-front-matter --force",
    "batchtts manifest from-text novel.txt -o chapters.csv --chapter-pattern '^CHAPTER [IVXLC]+'",
))
@click.argument("book", type=click.Path(path_type=Path, dir_okay=False))
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path, dir_okay=False), help="chapters.csv to write.")
@click.option("--chapter-pattern", help="Regular expression for the lines (in an EPUB, the headings) that start a chapter.")
@click.option("--no-front-matter", "front_matter", is_flag=True, flag_value=False, default=True,
              help="Leave out what comes before the first chapter (title page, dedication, preface), otherwise track 0.")
@click.option("--force", is_flag=True, help="Overwrite --out (and the cover beside it) if it exists.")
def from_text(book: Path, out: Path, chapter_pattern: str | None, front_matter: bool, force: bool) -> None:
    """Turn an EPUB, Markdown or plain-text BOOK into a manifest with one row per chapter (id, title,
    track, text; from an EPUB also album, artist and cover, its image written beside the manifest).
    "Chapter 1" is track 1; what comes before it is one row, track 0."""
    from .books import book_to_manifest

    try:
        written = book_to_manifest(book, out, chapter_pattern, front_matter=front_matter, force=force)
    except BatchTTSError as exc:
        _fail(exc)
    characters = sum(len(c.text) for c in written.chapters)
    click.echo(f"wrote {len(written.chapters)} chapters ({characters} characters) to {out}")
    if written.cover is not None:
        click.echo(f"wrote the cover to {written.cover}")
    for c in written.chapters[:50]:
        click.echo(f"  {c.track:>3}  {len(c.text):>8} chars  {c.title}")


@main.command(epilog=_examples(
    "batchtts models",
    "batchtts models --refresh --json | jq '.models[].id'",
    "BATCHTTS_BASE_URL=http://127.0.0.1:8787/api/v1 batchtts models",
))
@click.option("--base-url", envvar="BATCHTTS_BASE_URL", show_envvar=True, default=Provider.base_url, show_default=True,
              help="Speech API base URL.")
@click.option("--job", "job_file", type=click.Path(path_type=Path, dir_okay=False), help="Use the job file's provider.")
@click.option("--refresh", is_flag=True, help="Ask the provider now instead of using the day-old cache.")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@_env_file_option
def models(base_url: str | None, job_file: Path | None, refresh: bool, as_json: bool) -> None:
    """List the provider's speech models with their price and input limit (cached for a day).
    Reads the key from OPENROUTER_API_KEY (or the job file's api_key_env) where the provider wants one."""
    from . import log as logs
    from .models import speech_models

    logs.configure("auto")  # a stale cache or one that cannot be written is said on stderr

    try:
        job = load_job(job_file) if job_file else None
        provider = job.provider if job is not None else Provider()
        if base_url is not None and _given({"base_url": base_url})["base_url"] is not None:  # or BATCHTTS_BASE_URL
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


@main.command(epilog=_examples("batchtts voices", "batchtts voices | grep -i scot", "batchtts voices -m openai/gpt-4o-mini-tts"))
@click.option("-m", "--model", default="local/espeak-ng", show_default=True, help="Model whose voices to list.")
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


@main.command(context_settings={"show_default": True}, epilog=_examples(
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
