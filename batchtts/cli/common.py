"""Shared by the commands: how a fault ends a command, flags made from the job's settings, examples
in help, the .env file, and the words and numbers of reports."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from click.core import ParameterSource

from ..config import bounds_of
from ..errors import BatchTTSError, UsageError
from ..redact import redact_uri

_F = TypeVar("_F", bound=Callable[..., Any])


def fail(exc: BatchTTSError) -> NoReturn:
    say_error(str(exc), exc.exit_code)
    sys.exit(exc.exit_code)


def say_error(message: str, exit_code: int) -> None:
    """An expected fault: one line saying what to do, as a JSON event when the logs are JSON lines."""
    from .. import log as logs

    if logs.chosen() == "json":
        logs.log.error("error", exit_code=exit_code, message=message)
    else:
        click.echo(f"batchtts: {message}", err=True)


def ranged(settings: type, name: str) -> click.IntRange | click.FloatRange:
    """The range the setting takes, so a flag refuses what the job file would."""
    number, bounds = bounds_of(settings, name)
    if number is int:
        low, high = (None if b is None else int(b) for b in (bounds.low, bounds.high))
        return click.IntRange(low, high, min_open=bounds.above)
    return click.FloatRange(bounds.low, bounds.high, min_open=bounds.above)


def setting_flag(settings: type, name: str, *decls: str, **kwargs: Any) -> Callable[[_F], _F]:
    """A flag for a job setting: its range and its default come from the setting itself, so help
    shows what a run without the flag does. `given` drops it unless it was given: the job file's wins."""
    spec = next(f for f in dataclasses.fields(settings) if f.name == name)
    default = spec.default
    if "type" not in kwargs and spec.metadata.get("bounds") is not None:
        kwargs["type"] = ranged(settings, name)
    if default is not None and default is not False:
        kwargs.update(default=default, show_default=True)
    return click.option(*decls, **kwargs)


def given(flags: dict[str, Any]) -> dict[str, Any]:
    """The flags the user gave (on the line or through the environment); None for the rest."""
    ctx = click.get_current_context()
    return {name: None if ctx.get_parameter_source(name) is ParameterSource.DEFAULT else value
            for name, value in flags.items()}


def examples(*lines: str) -> str:
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
        fail(UsageError(f"--env-file {path}: no such file"))
    except (OSError, UnicodeDecodeError) as exc:
        fail(UsageError(f"{path}: cannot be read ({exc})"))
    for binding in bindings:
        if binding.error or (binding.key is not None and binding.value is None):
            # The line is not echoed: it may hold a key. A .env found in the folder may be another
            # tool's (docker compose takes a bare NAME): its other lines are still read.
            said = f"{path}, line {binding.original.line}: not KEY=VALUE (or a # comment)"
            if value is not None:
                fail(UsageError(said))
            click.echo(f"batchtts: {said}; line skipped", err=True)
    for binding in bindings:
        if binding.key is not None and binding.value is not None:
            os.environ.setdefault(binding.key, binding.value)
    return value


env_file_option = click.option(
    "--env-file", type=click.Path(path_type=Path, dir_okay=False), is_eager=True, expose_value=False,
    callback=_load_env_file, help="KEY=VALUE lines to read into the environment (default: ./.env if there is one); "
    "a variable already set is kept.")


def count(n: int, noun: str, plural: str | None = None) -> str:
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


def where(out: Path | str) -> str:
    return redact_uri(out) if isinstance(out, str) else str(out)


def size(n: float) -> str:
    units = ("bytes", "KB", "MB", "GB")
    step = 0
    while n >= 1000 and step < len(units) - 1:
        n /= 1000
        step += 1
    return f"{n:.0f} bytes" if step == 0 else f"{n:.1f} {units[step]}"


def reader_left() -> NoReturn:
    """The reader of standard output stopped early (`| head`): nothing to say; exit as a tool killed
    by SIGPIPE would, with nothing left to flush into the closed pipe."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(128 + signal.SIGPIPE)

