"""Speaker mixing: a row whose voice is a list of voices, or names a pool of the job's `[voices]`
table, is narrated by one of them, chosen from its key.

    voice column      alloy|nova|onyx             (CSV, TSV; a JSON list ["alloy", "nova"] in JSON Lines and Parquet)
    job file          [voices]
                      narrators = ["alloy", "nova", "onyx"]
    voice column      narrators                   (or --voice narrators for rows without one)

The choice is rendezvous hashing: each voice scores blake2b(key, voice) and the highest wins. It
depends on the row's key and the voices alone, so reruns, shards, status and export agree on every
row, and the order the voices are listed in does not matter. Adding a voice to a pool moves to it
only the rows it wins (about one in n + 1); removing one moves only the rows it had. The other rows
keep their voice, so their audio stays done.

The voice chosen is the row's voice from then on: its fingerprint, its request and its ledger
`speaker`; the voice as written stays the row's `pool`, the ledger's `voice`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .manifest import Row
    from .markup import Cast

SEPARATOR = "|"  # no voice name holds one: OpenAI's, eSpeak NG's (en-us+f3) and providers' ids do not


def split(voice: str) -> tuple[str, ...]:
    """The voices of a list written as text: `alloy|nova` is ("alloy", "nova")."""
    return tuple(part.strip() for part in voice.split(SEPARATOR))


def list_problem(voices: Sequence[object]) -> str | None:
    """What keeps a list of voices from being one, as a manifest gives it; None when it is one."""
    if not voices:
        return "is an empty list of voices"
    seen: set[str] = set()
    for voice in voices:
        if not isinstance(voice, str) or not voice.strip():
            return f"holds {voice!r}, not a voice name: a list of voices holds names such as alloy|nova"
        if SEPARATOR in voice:
            return f"holds {voice!r}: a voice in a list cannot hold {SEPARATOR!r}"
        if voice.strip() in seen:
            return f"names {voice.strip()!r} twice: a voice counts once in a list"
        seen.add(voice.strip())
    return None


def _score(key: str, voice: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}\0{voice}".encode(), digest_size=8).digest(), "big")


def choose(key: str, voices: Sequence[str]) -> str:
    """The voice of `voices` the row keyed `key` takes (rendezvous hashing: see the module)."""
    if len(voices) == 1:
        return voices[0]
    return max(voices, key=lambda voice: (_score(key, voice), voice))


def voices_for(voice: str, model: str, cast: Cast) -> tuple[str, ...]:
    """Every voice a row of `model` whose voice is written `voice` may take: the list's, the pool's
    for that model, or the voice itself."""
    if SEPARATOR in voice:
        return split(voice)
    pool = cast.pool(voice, model) if cast else None
    return pool if pool is not None else (voice,)


def assign(row: Row, cast: Cast) -> Row:
    """The row with the voice it takes, its list or pool kept as `pool`; the row itself when its
    voice is one voice."""
    voices = voices_for(row.voice, row.model, cast)
    if voices == (row.voice,):
        return row
    return dataclasses.replace(row, voice=choose(row.key, voices), pool=row.voice)
