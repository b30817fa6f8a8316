"""The command line: parse, call the library, report. No work happens here. One module a family of
commands: `narrate` (run), `results` (status, export, report), `books` (manifest from-text,
audiobook, qc) and `provider` (models, voices, serve); `common` what they share."""

from __future__ import annotations

import sys
from typing import Any

import click

from .. import __version__
from ..errors import EXIT_INTERNAL, BatchTTSError
from .books import audiobook, manifest, qc
from .common import fail, say_error
from .narrate import run
from .provider import models, serve, voices
from .results import export, report, status


class _Commands(click.Group):
    """Every command ends in a message and an exit code. A fault that no code path expected is said in
    one line, as a bug to report, not as a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort, KeyboardInterrupt):
            raise
        except BatchTTSError as exc:
            fail(exc)
        except Exception as exc:
            say_error(f"unexpected {type(exc).__name__}: {exc} (a fault in batchtts itself: please report it with "
                      "the command that led to it)", EXIT_INTERNAL)
            sys.exit(EXIT_INTERNAL)


@click.group(cls=_Commands, context_settings={"max_content_width": 100, "help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="batchtts")
def main() -> None:
    """Narrate a manifest of texts into one audio file per row, resumably."""


for _command in (run, status, export, report, audiobook, qc, manifest, models, voices, serve):
    main.add_command(_command)
