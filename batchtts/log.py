"""The package's log: readable lines on a terminal, JSON lines for cron and log collectors.

The library logs through `log`. The CLI configures structlog (`configure`); an application that
configured structlog itself gets the events its way; one that did not gets them through the
standard library's "batchtts" logger, which shows nothing until the application's logging does.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    import structlog


class _BarSafeStream:
    """Writes log lines above a live tqdm bar instead of through it."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        from tqdm import tqdm  # loaded with the bar it writes above

        if text.strip():  # print() sends the newline as a write of its own
            tqdm.write(text.rstrip("\n"), file=self.stream)

    def flush(self) -> None:
        self.stream.flush()


def _for_people(hidden_events: frozenset[str]) -> structlog.types.Processor:
    """Console rendering leaves the full configuration to JSON logs, and on a terminal leaves
    retries to the progress bar and the summary to the CLI's closing lines."""
    import structlog

    def processor(logger: object, name: str, event: structlog.types.EventDict) -> structlog.types.EventDict:
        if event.get("event") in hidden_events:
            raise structlog.DropEvent
        event.pop("config", None)
        return event

    return processor


# On a terminal: retries, throttle changes and progress are in the bar, the summary in the CLI's
# closing lines; a model list that could not be had is said where it matters (prices, --strict).
_SHOWN_ELSEWHERE = frozenset({"retry", "summary", "throttle", "progress", "models_unchecked"})


def _line_for_people(logger: object, name: str, event: MutableMapping[str, Any]) -> str:
    """One plain line an event: the start as what the run is about to do; anything else as its level
    (warnings and errors alone: a person acts on them), its message and the facts it carries."""
    kind = event.pop("event", "")
    level = event.pop("level", "info")
    event.pop("timestamp", None)
    if kind == "start":
        return _start_line(event)
    if kind == "row_failed":
        return _failed_row_line(event)
    prefix = "" if level == "info" else f"{level}: "
    if event.get("message"):  # written for people already
        return f"{prefix}{event['message']}"
    said = event.pop("reason", None) or event.pop("error", None)
    facts = ", ".join(f"{k} {v}" for k, v in event.items() if v is not None)
    return f"{prefix}{kind.replace('_', ' ')}: " + "; ".join(str(p) for p in (said, facts) if p)


def _failed_row_line(event: MutableMapping[str, Any]) -> str:
    """row 4 (r4) failed: HTTP 400: the provider's words [after 6 attempts; retried by the next run]"""
    name = f"row {event.get('row')}" + (f" ({event['id']})" if event.get("id") is not None else "")
    http = f"HTTP {event['status']}: " if event.get("status") is not None else ""
    attempts = event.get("attempts") or 0
    facts = [f"after {attempts} attempts"] if attempts > 1 else []
    facts.append("retried by the next run" if event.get("will_retry_on_rerun") else "rerun with --retry-failed to retry")
    return f"{name} failed: {http}{event.get('error')} [{'; '.join(facts)}]"


def _start_line(event: MutableMapping[str, Any]) -> str:
    from .money import usd

    cost = event.get("estimated_cost_usd")
    facts = [f"{event.get('rows', 0):,} rows", f"{event.get('already_done', 0):,} done before",
             f"{event.get('pending', 0):,} to do"]
    if event.get("skipped_failed"):
        facts.append(f"{event['skipped_failed']:,} failed before (--retry-failed retries them)")
    if event.get("budget_rows") is not None:
        facts.append(f"{event['budget_rows']:,} under the budget")
    facts.append(f"estimate {usd(cost)}" if cost is not None else "estimate unknown (no price)")
    shard = f" (shard {event['shard']})" if event.get("shard") else ""
    return f"{event.get('manifest')}{shard} → {event.get('out')}: {', '.join(facts)}"


logging.getLogger("batchtts").addHandler(logging.NullHandler())


@functools.cache
def _unconfigured() -> Any:
    import structlog

    return structlog.wrap_logger(
        logging.getLogger("batchtts"),
        processors=[structlog.stdlib.filter_by_level, structlog.processors.KeyValueRenderer(key_order=["event"])],
        wrapper_class=structlog.stdlib.BoundLogger,
    )


class _Log:
    """Decides at each event, so configuring structlog after import still takes effect. structlog
    is loaded with the first event: commands that log nothing (status, --version) never load it."""

    def __getattr__(self, name: str) -> Any:
        import structlog

        if structlog.is_configured():
            return getattr(structlog.get_logger("batchtts"), name)
        return getattr(_unconfigured(), name)


log = _Log()
_chosen = "console"


def chosen() -> str:
    """The format `configure` chose last: "console" or "json"."""
    return _chosen


def configure(log_format: str = "auto", stream: TextIO | None = None) -> str:
    """Set up structlog; returns the format chosen ("console" or "json")."""
    import structlog

    global _chosen
    stream = stream or sys.stderr
    if log_format == "auto":
        log_format = "console" if stream.isatty() else "json"
    _chosen = log_format
    processors: list[structlog.types.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if log_format == "json":
        processors.append(structlog.processors.JSONRenderer())
        out: TextIO = stream
    elif stream.isatty():
        processors += [_for_people(_SHOWN_ELSEWHERE), _line_for_people]
        out = _BarSafeStream(stream)  # type: ignore[assignment]
    else:
        processors += [_for_people(frozenset()), structlog.dev.ConsoleRenderer(colors=False)]
        out = stream
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    return log_format
