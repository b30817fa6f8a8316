"""What a person watching the run sees: a tqdm bar on a terminal, a periodic log event otherwise."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import TYPE_CHECKING, NoReturn

from .log import log

if TYPE_CHECKING:
    from tqdm import tqdm

    from .throttle import Throttle


class Progress:
    """`total` rows and `characters` are this run's work, which the bar and its ETA follow; `job_rows`
    and `done_before` place them in the whole job, which the rows count shows. The throttle is read
    for the pace and concurrency it has set."""

    def __init__(self, total: int, characters: int, interactive: bool, interval: float, job_rows: int = 0,
                 done_before: int = 0, throttle: Throttle | None = None) -> None:
        self.total = total
        self.characters = characters
        self.job_rows = max(job_rows, total + done_before)
        self.done_before = done_before
        self.throttle = throttle
        self.interval = interval
        self.done = self.failed = self.retries = self.characters_done = 0
        self.cost_usd = 0.0
        self.started = time.monotonic()
        self.bar: tqdm[NoReturn] | None = None
        self._ticker: asyncio.Task[None] | None = None
        if interactive:
            from tqdm import tqdm  # the bar's, on a terminal only: a run off one (cron, a pipe) does without

            # A terminal that reports no size (a bare pseudo-terminal) would get no bar: take it as 100 by 24.
            try:
                sized = os.get_terminal_size(sys.stderr.fileno()).columns > 0
            except (OSError, ValueError):
                sized = False
            self.bar = tqdm(total=characters, unit="char", unit_scale=True, dynamic_ncols=sized,
                            ncols=None if sized else 100, nrows=None if sized else 24, file=sys.stderr, smoothing=0.1)
            self._postfix()

    def start(self) -> None:
        if self.bar is None and self.interval > 0:
            self._ticker = asyncio.create_task(self._tick())

    def advance(self, characters: int) -> None:
        """Characters narrated: the bar and the ETA follow them, so long rows count for their length."""
        self.characters_done += characters
        if self.bar is not None:
            self.bar.update(characters)

    def row_finished(self, ok: bool) -> None:
        if ok:
            self.done += 1
        else:
            self.failed += 1
        if self.bar is not None:
            self._postfix()

    def spent(self, cost: float) -> None:
        """The running cost estimate; shown beside the rows once there is something to show."""
        self.cost_usd += cost

    def retried(self) -> None:
        self.retries += 1
        if self.bar is not None:
            self._postfix()

    def _postfix(self) -> None:
        assert self.bar is not None
        before = f" ({self.done_before:,} before)" if self.done_before else ""
        parts = [f"rows {self.done_before + self.done:,}/{self.job_rows:,}{before}", f"failed {self.failed}",
                 f"retries {self.retries}"]
        if self.throttle is not None:
            pace = self.throttle.rate
            parts.append(f"≤{self.throttle.limit} at once" + (f", ≤{pace:.3g} req/s" if pace else ""))
        if self.cost_usd:
            parts.append(f"~${self.cost_usd:.4f}")
        self.bar.set_postfix_str(", ".join(parts), refresh=False)

    def event(self) -> None:
        elapsed = time.monotonic() - self.started
        rate = self.characters_done / elapsed if elapsed > 0 else 0.0
        eta = (self.characters - self.characters_done) / rate if rate > 0 else None
        log.info(
            "progress", done=self.done, failed=self.failed, total=self.total, retries=self.retries,
            characters=self.characters_done, total_characters=self.characters, chars_per_s=round(rate, 1),
            eta_s=None if eta is None else round(max(eta, 0.0), 1), cost_usd=round(self.cost_usd, 6),
        )

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.event()

    def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        if self.bar is not None:
            self.bar.close()
