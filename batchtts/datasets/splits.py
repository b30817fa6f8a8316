"""Which split a row goes to: decided by its key alone, so a row stays in its split across reruns,
machines, shards and exports of more rows (a test row never leaks into training as the set grows).

The key is hashed with a tag of its own: the hashes that pick a row's shard or its voice from a pool
are of the same key, and a split drawn from the same hash would put one shard, or one voice, in one
split.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

from ..errors import UsageError

_TAG = b"batchtts split\x00"
_NAME = re.compile(r"[A-Za-z0-9_]+")  # a split names files (`train-00000-of-00004.parquet`): no '-' or '.'
_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Splits:
    """Named fractions that add up to 1, in the order given: a row's hash, a number in [0, 1), falls
    in one of them."""

    names: tuple[str, ...]
    bounds: tuple[float, ...]  # the cumulative fractions: the upper end of each split

    @classmethod
    def parse(cls, text: str | None) -> Splits:
        """`train=0.98,validation=0.01,test=0.01`; None is one split, train."""
        if text is None:
            return cls(("train",), (1.0,))
        names: list[str] = []
        fractions: list[float] = []
        for part in text.split(","):
            name, equals, value = (p.strip() for p in part.partition("="))
            if not equals or not name:
                raise UsageError(f"--split takes name=fraction pairs, as train=0.98,validation=0.01,test=0.01; "
                                 f"not {part.strip()!r}")
            if not cls.is_name(name):
                raise UsageError(f"split name {name!r}: letters, digits and '_' only (it names files)")
            if name in names:
                raise UsageError(f"split {name!r} is named twice")
            try:
                fraction = float(value)
            except ValueError:
                raise UsageError(f"split {name}: {value!r} is not a number") from None
            if not math.isfinite(fraction) or not 0 < fraction <= 1:
                raise UsageError(f"split {name}: the fraction is above 0 and at most 1, not {value}")
            names.append(name)
            fractions.append(fraction)
        total = math.fsum(fractions)
        if abs(total - 1) > _TOLERANCE:
            raise UsageError(f"the split fractions add up to {total:g}, not 1")
        bounds = [math.fsum(fractions[: i + 1]) for i in range(len(fractions))]
        bounds[-1] = 1.0
        return cls(tuple(names), tuple(bounds))

    @staticmethod
    def is_name(name: str) -> bool:
        return _NAME.fullmatch(name) is not None

    def of(self, key: str) -> str:
        """The split of the row with this ledger key."""
        digest = hashlib.sha256(_TAG + key.encode("utf-8", "surrogatepass")).digest()
        point = int.from_bytes(digest[:8], "big") / 2**64
        for name, bound in zip(self.names, self.bounds, strict=True):
            if point < bound:
                return name
        return self.names[-1]
