"""Log rendering: readable lines on a terminal, JSON lines for cron and log collectors."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog
from tqdm import tqdm


class _BarSafeStream:
    """Writes log lines above a live tqdm bar instead of through it."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        if text.strip():  # print() sends the newline as a write of its own
            tqdm.write(text.rstrip("\n"), file=self.stream)

    def flush(self) -> None:
        self.stream.flush()


def _for_people(hidden_events: frozenset[str]) -> structlog.types.Processor:
    """Console rendering leaves the full configuration to JSON logs, and on a terminal leaves
    retries to the progress bar and the summary to the CLI's closing lines."""

    def processor(logger: object, name: str, event: structlog.types.EventDict) -> structlog.types.EventDict:
        if event.get("event") in hidden_events:
            raise structlog.DropEvent
        event.pop("config", None)
        return event

    return processor


_chosen = "console"


def chosen() -> str:
    """The format `configure` chose last: "console" or "json"."""
    return _chosen


def configure(log_format: str = "auto", stream: TextIO | None = None) -> str:
    """Set up structlog; returns the format chosen ("console" or "json")."""
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
    else:
        hidden = frozenset({"retry", "summary"}) if stream.isatty() else frozenset()
        processors += [_for_people(hidden), structlog.dev.ConsoleRenderer(colors=stream.isatty())]
        out = _BarSafeStream(stream)  # type: ignore[assignment]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    return log_format
