"""What a run costs: prices per model, the estimate, and the caps that stop a run before it overspends.

The estimate counts the characters each request sends (a long row's chunks, not its raw length),
times the model's price: the job file's `[prices]` table (USD per million characters) first, then
the provider's model list, and nothing for the embedded `local/*` engine. Caps are per run: a
capped nightly run spends at most its cap, and the next run carries on from the ledger.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import structlog

from .config import Budget, Job
from .errors import UsageError
from .models import ModelList, speech_models
from .providers import is_local

log = structlog.get_logger("batchtts")


@dataclass(frozen=True)
class Prices:
    """USD per character by model; a model missing from the table has no known price."""

    per_char: dict[str, float] = field(default_factory=dict)
    source: str = "none"

    def of(self, model: str) -> float | None:
        return 0.0 if is_local(model) else self.per_char.get(model)

    def cost(self, model: str, characters: int) -> float | None:
        price = self.of(model)
        return None if price is None else price * characters


def prices_for(job: Job, models: Iterable[str]) -> Prices:
    """Prices for the models a run uses; asks the provider (or its cached list) only for models the
    job file does not price and that are not local."""
    table = {name: usd / 1_000_000 for name, usd in job.prices.items()}
    missing = {m for m in models if not is_local(m) and m not in table}
    if not missing:
        return Prices(table, "job file" if table else "none")
    try:
        listing: ModelList = speech_models(job.provider, job.timeouts)
    except UsageError as exc:
        log.warning("prices_unknown", models=sorted(missing), error=str(exc),
                    message="no estimate for these models: add them under [prices] in the job file")
        return Prices(table, "job file" if table else "none")
    for name in missing:
        info = listing.get(name)
        if info is not None and info.usd_per_char is not None:
            table[name] = info.usd_per_char
    return Prices(table, "cached model list" if listing.from_cache else "model list")


class Spending:
    """Characters and cost the run has taken on, checked against the caps before each row."""

    def __init__(self, budget: Budget, prices: Prices) -> None:
        self.budget = budget
        self.prices = prices
        self.characters = 0
        self.cost = 0.0
        self.refused: str | None = None

    def check_prices(self, models: Iterable[str]) -> None:
        """--max-cost cannot guard a model whose price is unknown: refuse before anything is sent."""
        if self.budget.max_cost is None:
            return
        unknown = sorted(m for m in models if self.prices.of(m) is None)
        if unknown:
            raise UsageError(
                f"--max-cost needs a price for {', '.join(unknown)}: none came from the provider's model "
                "list; add it under [prices] in the job file (USD per million characters)"
            )

    def admit(self, model: str, characters: int) -> bool:
        """Take on a row of `characters` to send, unless that would pass a cap."""
        cost = self.prices.cost(model, characters) or 0.0
        max_chars, max_cost = self.budget.max_chars, self.budget.max_cost
        if max_chars is not None and self.characters + characters > max_chars:
            self.refused = f"the character budget ({max_chars:,}) is reached: {self.characters:,} characters taken on"
            return False
        if max_cost is not None and self.cost + cost > max_cost + 1e-12:
            self.refused = f"the cost budget (${max_cost:.4f}) is reached: ${self.cost:.4f} taken on"
            return False
        self.characters += characters
        self.cost += cost
        return True
