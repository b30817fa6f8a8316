"""What a person watching the run sees: a tqdm bar on a terminal, a periodic log event otherwise."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import NoReturn

from tqdm import tqdm

from .log import log


class Progress:
    def __init__(self, total: int, characters: int, interactive: bool, interval: float) -> None:
        self.total = total
        self.characters = characters
        self.interval = interval
        self.done = self.failed = self.retries = self.characters_done = 0
        self.cost_usd = 0.0
        self.started = time.monotonic()
        self.bar: tqdm[NoReturn] | None = None
        self._ticker: asyncio.Task[None] | None = None
        if interactive:
            self.bar = tqdm(total=characters, unit="char", unit_scale=True, dynamic_ncols=True, file=sys.stderr,
                            smoothing=0.1)

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
        cost = f", ~${self.cost_usd:.4f}" if self.cost_usd else ""
        self.bar.set_postfix_str(f"rows {self.done}/{self.total}, failed {self.failed}, retries {self.retries}{cost}",
                                 refresh=False)

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
