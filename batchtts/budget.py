"""What a run costs: prices per model, the estimate, and the caps that stop a run before it overspends.

The estimate counts the characters each request sends (a long row's chunks, not its raw length),
times the model's price: the job file's `[prices]` table (USD per million characters) first, then
the provider's model list, and nothing for the embedded `local/*` engine. Caps are per run: a
capped nightly run spends at most its cap, and the next run carries on from the ledger. A row that
alone needs more than a cap fails by name (the next run tries it again), so it cannot stall every
later run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from enum import Enum
from typing import TYPE_CHECKING

from .config import Budget, Job
from .errors import UsageError
from .log import log
from .manifest import Row
from .money import usd
from .providers import is_local

if TYPE_CHECKING:
    from .models import ModelInfo, ModelList


class Prices:
    """USD per character by model: the job file's table first, then the provider's model list, asked
    at most once and only for a model the table does not price; a model in neither has no known price."""

    def __init__(self, table: dict[str, float] | None = None,
                 listing: Callable[[], ModelList] | None = None) -> None:
        self.table = dict(table or {})
        self._listing = listing
        self._list: ModelList | None = None
        self.list_error: str | None = None
        self._sources: set[str] = set()
        self._known: dict[str, tuple[float | None, str | None]] = {}
        self._asking = threading.Lock()

    def of(self, model: str) -> float | None:
        if model not in self._known:  # rows price their model one by one: look each model up once
            self._known[model] = self._look_up(model)
        price, source = self._known[model]
        if source:
            self._sources.add(source)
        return price

    def _look_up(self, model: str) -> tuple[float | None, str | None]:
        if is_local(model):
            return 0.0, "free local engine"
        if model in self.table:
            return self.table[model], "job file"
        info = self._listed(model)
        if info is None or info.usd_per_char is None:
            return None, None
        assert self._list is not None
        return info.usd_per_char, "cached model list" if self._list.from_cache else "model list"

    def _listed(self, model: str) -> ModelInfo | None:
        with self._asking:  # the feed's thread and the event loop both price rows
            if self._listing is not None:
                listing, self._listing = self._listing, None
                try:
                    self._list = listing()
                except UsageError as exc:
                    self.list_error = str(exc)
                    log.warning("prices_unknown", error=self.list_error,
                                message="no provider prices: add the models under [prices] in the job file")
        return self._list.get(model) if self._list is not None else None

    def cost(self, model: str, characters: int) -> float | None:
        if characters == 0:
            return 0.0
        price = self.of(model)
        return None if price is None else price * characters

    @property
    def source(self) -> str:
        """Where the prices used so far came from, for the preview and the summary."""
        return " and ".join(sorted(self._sources)) or "no prices used"


def prices_for(job: Job, listed: bool = True) -> Prices:
    """The job's prices; the provider's list (or its day-old cache) is asked only if a model needs it,
    and never for a provider the application plugged in (`listed=False`): the list is the HTTP
    provider's, not its."""
    from .models import speech_models  # the HTTP stack, loaded only by a run that may need prices

    return Prices({name: usd / 1_000_000 for name, usd in job.prices.items()},
                  (lambda: speech_models(job.provider, job.timeouts)) if listed else None)


class Verdict(Enum):
    TAKE = "take"
    OVER = "over"  # the row alone needs more than a cap allows: no run under this cap can take it
    STOP = "stop"  # the row would pass a cap: this run takes no more rows


class Spending:
    """Characters and cost the run has taken on, checked against the caps before each row. Rows for
    the embedded `local/*` engine are free and send nothing: no cap counts them."""

    def __init__(self, budget: Budget, prices: Prices) -> None:
        self.budget = budget
        self.prices = prices
        self.characters = 0
        self.cost = 0.0
        self.rows = 0  # rows taken on, local ones included
        self.sent_characters = 0  # what those rows send, local ones included
        self.refused: str | None = None
        self.over = 0  # rows passed over: each alone needs more than a cap
        self.over_rows: list[str] = []  # the first few of them, named
        self.last_over: str | None = None  # why the row just passed over was
        self.unpriced_characters = 0  # taken on for models without a known price: not in `cost`

    def check_prices(self, models: Iterable[str]) -> None:
        """--max-cost cannot guard a model whose price is unknown: refuse before anything is sent."""
        if self.budget.max_cost is None:
            return
        unknown = sorted(m for m in models if self.prices.of(m) is None)
        if unknown:
            why = (f"the provider's model list could not be had ({self.prices.list_error})"
                   if self.prices.list_error else "the provider's model list has none")
            raise UsageError(
                f"--max-cost needs a price for {', '.join(unknown)}: {why}; add it under [prices] in a "
                "job file (USD per million characters)"
            )

    def admit(self, row: Row, characters: int) -> Verdict:
        """Take on a row that sends `characters`, unless that would pass a cap. Once a row was
        refused, every later one is too: rows are taken in manifest order."""
        if self.refused is not None:
            return Verdict.STOP
        if not self.budget.capped:
            self.rows += 1
            self.sent_characters += characters
            return Verdict.TAKE
        priced = 0.0 if is_local(row.model) else self.prices.cost(row.model, characters)
        cost = priced or 0.0
        sent = 0 if is_local(row.model) else characters
        max_chars, max_cost = self.budget.max_chars, self.budget.max_cost
        self.last_over = None
        if max_cost is not None and priced is None:  # a model that appeared after the start's price check
            self.last_over = f"no known price for {row.model}, so --max-cost cannot guard it: add it under [prices]"
        elif max_chars is not None and sent > max_chars:
            self.last_over = (f"needs {sent:,} characters, more than the budget per run allows (--max-chars "
                              f"{max_chars:,}): raise it to narrate this row")
        elif max_cost is not None and cost > max_cost + _EPSILON:
            self.last_over = (f"costs {usd(cost, exact=True)}, more than the budget per run allows (--max-cost "
                              f"{usd(max_cost, exact=True)}): raise it to narrate this row")
        if self.last_over is not None:
            self.over += 1
            if len(self.over_rows) < 3:
                self.over_rows.append(f"row {row.number} ({row.id or row.key[:12]}): {self.last_over}")
            return Verdict.OVER
        if priced is None:
            self.unpriced_characters += sent
        if max_chars is not None and self.characters + sent > max_chars:
            self.refused = (f"the character budget ({max_chars:,}) is reached: {self.characters:,} characters "
                            f"taken on, the next row needs {sent:,}")
            return Verdict.STOP
        if max_cost is not None and self.cost + cost > max_cost + _EPSILON:
            self.refused = (f"the cost budget ({usd(max_cost, exact=True)}) is reached: "
                            f"{usd(self.cost, exact=True)} taken on, the next row needs {usd(cost, exact=True)}")
            return Verdict.STOP
        self.rows += 1
        self.sent_characters += characters
        self.characters += sent
        self.cost += cost
        return Verdict.TAKE

    @property
    def passed_over(self) -> str | None:
        """The rows no run under these caps can take, named, or None."""
        if not self.over:
            return None
        n, named = self.over, self.over_rows
        return (f"{n:,} row{'s' if n != 1 else ''} passed over, failing until the cap is raised: {'; '.join(named)}"
                + (f"; and {n - len(named):,} more" if n > len(named) else ""))


_EPSILON = 1e-12
