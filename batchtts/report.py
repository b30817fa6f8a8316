"""`batchtts report`: how a run went, as one HTML page drawn from its ledger.

The page is self-contained (the plots are SVG written into it; no script, no stylesheet, no font or
address to fetch), so a nightly job can leave it beside its log and it opens anywhere, offline,
years later. The figures come from the `attempts` table (one row per request, schema 4); a ledger
of runs before it gets what its `rows` table knows, with a note saying what is missing.

matplotlib is an optional extra, imported here only and only when a report is drawn. Figures are
made with its object API, not pyplot: no backend is chosen for the process, no GUI can open, and a
caller's own matplotlib settings are left alone.
"""

from __future__ import annotations

import contextlib
import html
import io
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import LedgerError, UsageError
from .ledger import Ledger, describe, usage
from .money import usd

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    from matplotlib.axes import Axes

    Floats = npt.NDArray[np.float64]

INSTALL = "pip install 'batchtts[report]'"

# Every figure of the page: its id (the <svg> and its section carry it) and its title.
FIGURES = {
    "throughput": "Requests and successes per second",
    "latency": "Latency percentiles",
    "errors": "429s and 5xx per second",
    "controller": "Concurrency and pace, as the throttle set them",
    "spend": "Characters and cost, accumulated",
    "failures": "Failed rows by reason",
}
_MOST_BINS = 400  # points per line: a night of millions of requests still draws a light page
_BIN_WIDTHS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 86400)
_EPOCH = "((julianday({}) - 2440587.5) * 86400.0)"  # an ISO time stamp of the ledger as epoch seconds


@dataclass
class _Source:
    """One ledger and the runs the report is of."""

    ledger: Ledger
    runs: list[dict[str, Any]]

    @property
    def run_ids(self) -> str:
        return ", ".join(str(int(r["id"])) for r in self.runs) or "NULL"

    def window(self) -> str:
        """The SQL condition for rows the runs recorded (by when they were last written)."""
        def quoted(stamp: str) -> str:
            return "'" + stamp.replace("'", "''") + "'"

        spans = [f"(updated_at >= {quoted(r['started_at'])}" + (f" AND updated_at <= {quoted(r['finished_at'])})"
                                                               if r["finished_at"] else ")") for r in self.runs]
        return " OR ".join(spans) or "0"

    def attempts(self) -> int:
        if self.ledger.version < 4:
            return 0
        return int(self.ledger.db.execute(f"SELECT COUNT(*) FROM attempts WHERE run_id IN ({self.run_ids})")
                   .fetchone()[0])


@dataclass
class _Data:
    """What the figures draw, over all the ledgers: per time bin, from `start` every `width` seconds."""

    start: float
    width: float
    by_attempts: bool
    sums: dict[str, Floats] = field(default_factory=dict)
    latency: dict[str, Floats] = field(default_factory=dict)
    failures: Counter[str] = field(default_factory=Counter)


def write_report(target: Path, to: Path | None = None, run: str = "last") -> Path:
    """Draw the report of the ledger (or output folder) `target` into `to` (default: report.html
    beside the ledger); `run` is a run id, "last" (each ledger's newest run) or "all"."""
    try:
        import matplotlib  # noqa: F401  (only whether it is there)
        import numpy  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"batchtts report draws with matplotlib, which is not installed: {INSTALL} ({exc})") from None
    try:
        sources = _open(target, run)
        try:
            data = _gather(sources)
        finally:
            for source in sources:
                source.ledger.close()
    except sqlite3.Error as exc:  # the report reads the ledger's tables itself, unguarded by Ledger's methods
        raise LedgerError(describe(target, exc)) from exc
    page = _page(sources, data)
    destination = to if to is not None else sources[0].ledger.path.parent / "report.html"
    partial = destination.with_name(f".{destination.name}.partial")
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(page, encoding="utf-8")
        partial.replace(destination)  # a page is never seen half written, by a browser or a mail job
    except OSError as exc:
        with contextlib.suppress(OSError):  # what is said is why the page could not be written
            partial.unlink()
        raise UsageError(f"cannot write the report to {destination}: {exc.strerror or exc}") from exc
    return destination


def _open(target: Path, run: str) -> list[_Source]:
    from .results import ledger_files

    if not target.exists():
        raise UsageError(f"{target}: no such ledger file or folder")
    if target.is_file() and usage(target) is None:
        raise UsageError(f"{target}: not a batchtts ledger")
    if run not in ("last", "all") and not run.isdigit():
        raise UsageError(f"--run {run}: name a run by its number, or say last or all")
    sources: list[_Source] = []
    try:
        for path in ledger_files(target) if target.is_dir() else [target]:
            ledger = Ledger.open_existing(path)
            sources.append(_Source(ledger, []))
            ledger.db.row_factory = sqlite3.Row
            runs = [dict(r) for r in ledger.db.execute("SELECT id, started_at, finished_at, exit_code FROM runs "
                                                       "ORDER BY id")]
            sources[-1].runs = runs[-1:] if run == "last" else runs if run == "all" else [
                r for r in runs if r["id"] == int(run)]
        if not any(s.runs for s in sources):
            raise UsageError(f"{target}: no run {run} in the ledger" if run.isdigit() else f"{target}: no run yet")
    except BaseException:
        for source in sources:
            source.ledger.close()
        raise
    return sources


def _gather(sources: list[_Source]) -> _Data:
    """Sum the ledgers bin by bin: from the attempts when every ledger kept them, else from the rows."""
    import numpy as np

    by_attempts = all(s.attempts() for s in sources if s.runs)
    spans = [_span(s, by_attempts) for s in sources if s.runs]
    start = min((a for a, _ in spans if a is not None), default=time.time())
    end = max((b for _, b in spans if b is not None), default=start)
    width = float(next((w for w in _BIN_WIDTHS if (end - start) / w <= _MOST_BINS), _BIN_WIDTHS[-1]))
    bins = int((end - start) // width) + 1
    data = _Data(start, width, by_attempts)
    sums: dict[str, Floats] = {}
    latencies: list[tuple[Floats, Floats]] = []
    for source in sources:
        if not source.runs:
            continue
        query, names, lat_query = _queries(source, by_attempts)
        params = {"start": start, "width": width}
        for found in source.ledger.db.execute(query, params):
            b = min(int(found["b"]), bins - 1)
            for name in names:  # of shards' ledgers, the sums add up, and so do their throttles' limits
                column = sums.setdefault(name, np.full(bins, np.nan))
                value = found[name]
                if value is not None:
                    column[b] = value if np.isnan(column[b]) else column[b] + value
        pairs = np.array(source.ledger.db.execute(lat_query, params).fetchall(), dtype=float).reshape(-1, 2)
        latencies.append((pairs[:, 0], pairs[:, 1]))
        data.failures.update(_failures(source))
    data.sums = sums
    data.latency = _percentiles(latencies, bins)
    return data


def _span(source: _Source, by_attempts: bool) -> tuple[float | None, float | None]:
    query = (f"SELECT MIN(started), MAX(started + COALESCE(latency_s, 0)) FROM attempts WHERE run_id IN ({source.run_ids})"
             if by_attempts else
             f"SELECT MIN({_EPOCH.format('updated_at')}), MAX({_EPOCH.format('updated_at')}) FROM rows "
             f"WHERE {source.window()}")
    first, last = source.ledger.db.execute(query).fetchone()
    return first, last


def _queries(source: _Source, by_attempts: bool) -> tuple[str, tuple[str, ...], str]:
    """Per-bin sums, the names of their columns, and the (bin, latency) pairs of the successes."""
    if by_attempts:
        where = f"run_id IN ({source.run_ids})"
        b = "CAST((started - :start) / :width AS INTEGER)"
        names = ("requests", "successes", "rate_limited", "server_errors", "characters", "cost", "concurrency",
                 "pace")
        return (f"SELECT {b} AS b, COUNT(*) AS requests, SUM(status = 200) AS successes, "
                "SUM(status = 429) AS rate_limited, SUM(status BETWEEN 500 AND 599) AS server_errors, "
                "SUM(CASE WHEN status = 200 THEN characters END) AS characters, SUM(cost) AS cost, "
                f"AVG(concurrency) AS concurrency, AVG(pace) AS pace FROM attempts WHERE {where} GROUP BY b",
                names, f"SELECT {b}, latency_s FROM attempts WHERE {where} AND status = 200")
    b = f"CAST(({_EPOCH.format('updated_at')} - :start) / :width AS INTEGER)"
    where = f"({source.window()})"
    return (f"SELECT {b} AS b, COUNT(*) AS requests, SUM(status = 'done') AS successes, "
            f"SUM(CASE WHEN status = 'done' THEN characters END) AS characters FROM rows WHERE {where} GROUP BY b",
            ("requests", "successes", "characters"),
            f"SELECT {b}, latency_s FROM rows WHERE {where} AND status = 'done' AND latency_s IS NOT NULL")


def _percentiles(latencies: list[tuple[Floats, Floats]], bins: int) -> dict[str, Floats]:
    import numpy as np

    b = np.concatenate([np.asarray(b_, dtype=np.int64) for b_, _ in latencies]) if latencies else np.zeros(0, np.int64)
    lat = np.concatenate([lat for _, lat in latencies]) if latencies else np.zeros(0)
    b = np.minimum(b, bins - 1)
    order = np.lexsort((lat, b))
    b, lat = b[order], lat[order]
    bounds = np.searchsorted(b, np.arange(bins + 1))
    found: dict[str, Floats] = {p: np.full(bins, np.nan) for p in ("p50", "p90", "p99")}
    for i in range(bins):
        chunk = lat[bounds[i]:bounds[i + 1]]
        if chunk.size:
            for name, q in zip(found, np.percentile(chunk, (50, 90, 99)), strict=True):
                found[name][i] = q
    return found


def _failures(source: _Source) -> Counter[str]:
    """Rows the runs left failed, by what went wrong (their errors, less what differs row to row)."""
    counts: Counter[str] = Counter()
    for status, error, n in source.ledger.db.execute(
            f"SELECT http_status, error, COUNT(*) FROM rows WHERE status = 'failed' AND ({source.window()}) "
            "GROUP BY http_status, error"):
        counts[reason(status, error)] += n
    return counts


def reason(status: int | None, error: str | None) -> str:
    """What a failure was, in few enough words to group rows by: the status, or the first clause of
    the message with its numbers taken out."""
    text = re.sub(r"^chunk \d+ of \d+: ", "", error or "unknown")
    head = re.sub(r"\d+", "N", text.split(":", 1)[0]).strip()
    return f"HTTP {status}" if status else head[:60]



# --- drawing --------------------------------------------------------------------------------------

def _page(sources: list[_Source], data: _Data) -> str:
    from matplotlib.figure import Figure

    times = _times(data)
    draw: dict[str, Callable[[Axes], str | None]] = {
        "throughput": lambda ax: _throughput(ax, times, data),
        "latency": lambda ax: _latency(ax, times, data),
        "errors": lambda ax: _errors(ax, times, data),
        "controller": lambda ax: _controller(ax, times, data),
        "spend": lambda ax: _spend(ax, times, data),
        "failures": lambda ax: _failure_bars(ax, data),
    }
    sections = []
    for name, title in FIGURES.items():
        figure = Figure(figsize=(9, 3.2), layout="constrained")
        ax = figure.subplots()
        note = draw[name](ax)
        sections.append(f'<section id="{name}">\n<h2>{html.escape(title)}</h2>\n'
                        + (f'<p class="note">{html.escape(note)}</p>\n' if note else "")
                        + _svg(figure, name, title) + "\n</section>")
    return _HTML.format(title=html.escape(f"batchtts report: {sources[0].ledger.path.parent.name}"),
                        summary=_summary(sources, data), sections="\n".join(sections))


def _times(data: _Data) -> Any:
    """The bins' edges, as local wall-clock times."""
    import numpy as np

    bins = len(next(iter(data.sums.values()))) if data.sums else 1
    offset = datetime.fromtimestamp(data.start).astimezone().utcoffset()
    local = data.start + (offset.total_seconds() if offset is not None else 0.0)
    return np.datetime64(int(local * 1000), "ms") + (np.arange(bins + 1) * data.width * 1000).astype("timedelta64[ms]")


def _column(data: _Data, name: str, fill: float = 0.0) -> Floats:
    import numpy as np

    values = data.sums.get(name)
    if values is None:
        return np.zeros(0)
    return np.where(np.isnan(values), fill, values)


def _axes(ax: Axes, ylabel: str) -> None:
    """A figure over time: labelled, gridded, and its clock times said as briefly as the span allows."""
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter

    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    locator = AutoDateLocator()  # type: ignore[no-untyped-call]  # matplotlib's stubs leave it untyped
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]


def _per_second(data: _Data) -> str:
    return f"per second (bins of {data.width:g} s)"


def _throughput(ax: Axes, times: Any, data: _Data) -> str | None:
    what = ("requests", "successes (200)") if data.by_attempts else ("rows finished", "rows done")
    ax.stairs(_column(data, "requests") / data.width, times, label=what[0])
    ax.stairs(_column(data, "successes") / data.width, times, label=what[1])
    _axes(ax, _per_second(data))
    ax.legend(loc="upper right")
    return None if data.by_attempts else "From the rows table: rows as they were last recorded, not requests."


def _latency(ax: Axes, times: Any, data: _Data) -> str | None:
    for name, values in data.latency.items():
        ax.plot(times[:-1] + (times[1:] - times[:-1]) / 2, values, label=name, marker=".", markersize=3)
    _axes(ax, "seconds")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper right")
    return (None if data.by_attempts else
            "From the rows table: each row's time from its first attempt to its file, retries included.")


def _errors(ax: Axes, times: Any, data: _Data) -> str | None:
    if not data.by_attempts:
        return _not_kept(ax)
    ax.stairs(_column(data, "rate_limited") / data.width, times, label="429", color="tab:orange")
    ax.stairs(_column(data, "server_errors") / data.width, times, label="5xx", color="tab:red")
    _axes(ax, _per_second(data))
    ax.legend(loc="upper right")
    return None


def _controller(ax: Axes, times: Any, data: _Data) -> str | None:
    import numpy as np

    if not data.by_attempts:
        return _not_kept(ax)
    ax.stairs(_column(data, "concurrency", float("nan")), times, baseline=None, color="tab:blue", label="concurrency")
    _axes(ax, "concurrency allowed (mean)")
    pace = ax.twinx()
    pace.stairs(_column(data, "pace", float("nan")), times, baseline=None, color="tab:green", label="pace")
    pace.set_ylabel("requests per second")
    ax.figure.legend(loc="outside right upper")
    if np.isnan(_column(data, "pace", float("nan"))).all():
        return "No pace was set: no 429 taught the throttle a rate, and no --rpm capped it."
    return None


def _spend(ax: Axes, times: Any, data: _Data) -> str | None:
    import numpy as np

    ax.plot(times, np.cumsum([0, *_column(data, "characters")]), color="tab:blue", label="characters")
    _axes(ax, "characters")
    if not data.by_attempts:
        return "From the rows table: characters of the rows done; the cost of each request was not kept."
    cost = ax.twinx()
    cost.plot(times, np.cumsum([0, *_column(data, "cost")]), color="tab:purple", label="cost")
    cost.set_ylabel("USD (estimated)")
    ax.figure.legend(loc="outside right upper")
    return None


def _failure_bars(ax: Axes, data: _Data) -> str | None:
    if not data.failures:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no row failed", ha="center", va="center", transform=ax.transAxes)
        return None
    shown = data.failures.most_common(12)
    ax.barh([r for r, _ in reversed(shown)], [n for _, n in reversed(shown)], color="tab:red")
    ax.set_xlabel("rows")
    more = len(data.failures) - len(shown)
    return f"{more} rarer reasons are not shown." if more > 0 else None


def _not_kept(ax: Axes) -> str:
    ax.set_axis_off()
    ax.text(0.5, 0.5, "not recorded by this ledger", ha="center", va="center", transform=ax.transAxes)
    return "The runs reported on predate the attempts table (ledger schema 4): requests were not kept one by one."


def _svg(figure: Any, name: str, title: str) -> str:
    """The figure as SVG to write into the page: no XML prolog, no namespace or metadata address,
    and ids made unique to the figure (six SVGs share the page's id space)."""
    import matplotlib

    out = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text as text: light, and searchable
        figure.savefig(out, format="svg", metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    svg = out.getvalue()
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r'\s+xmlns(:xlink)?="[^"]*"', "", svg)  # HTML gives inline SVG its namespaces
    svg = re.sub(r'\bid="([^"]+)"', rf'id="{name}-\1"', svg)
    svg = re.sub(r'(href="#|url\(#)', rf"\1{name}-", svg)
    return svg.replace("<svg ", f'<svg id="plot-{name}" role="img" aria-label="{html.escape(title)}" ', 1)


def _summary(sources: list[_Source], data: _Data) -> str:
    import numpy as np

    lines = []
    for source in sources:
        for run in source.runs:
            ended = f"ended {run['finished_at']}, exit code {run['exit_code']}" if run["finished_at"] else "not ended"
            lines.append(f"{source.ledger.path}: run {run['id']}, started {run['started_at']}, {ended}")
    requests, successes = (int(np.nansum(data.sums.get(n, np.zeros(0)))) for n in ("requests", "successes"))
    if data.by_attempts:
        cost = float(np.nansum(data.sums.get("cost", np.zeros(0))))
        lines.append(f"{requests:,} requests, {successes:,} answered with audio, "
                     f"{int(np.nansum(data.sums['characters'])):,} characters, {usd(cost)} estimated")
    else:
        lines.append(f"{requests:,} rows recorded, {successes:,} done. Note: this ledger's runs kept no attempts "
                     "table (a ledger of schema 3 or older, read as it is; a run with this batchtts upgrades it): "
                     "these figures are what its rows table knows.")
    lines.append(f"{sum(data.failures.values()):,} rows failed. Written {datetime.now().astimezone():%Y-%m-%d %H:%M %Z}.")
    return "\n".join(f"<li>{html.escape(line)}</li>" for line in lines)


_HTML = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }}
section {{ margin: 2em 0; }}
h2 {{ font-size: 1.1em; margin-bottom: 0.3em; }}
.note {{ color: #666; font-size: 0.9em; margin: 0.2em 0; }}
svg {{ max-width: 100%; height: auto; }}
</style>
</head>
<body>
<h1>{title}</h1>
<ul>
{summary}
</ul>
{sections}
</body>
</html>
"""
