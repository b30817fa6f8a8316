"""Several voices in one row: two tags of SSML, and the job's cast of characters.

Two tags are markup, written exactly so (double or single quotes):

    <voice name="Alice">...</voice>    what is inside, in Alice's voice (voices nest)
    <break time="1.5s"/>               a pause: seconds ("1.5s") or milliseconds ("500ms"), at most 60 s

Anything else between < and > is text, read as written. A tag that starts as one of these two but is
not written as one (`<voice>`, `<break time="soon"/>`, a `<voice` never closed with `>`), a `</voice>`
with no voice open, or a voice never closed is a fault of the row: it fails, naming the line and
column, and the other rows go on.

A name is looked up in the job's `[voices]` table (`Alice = "nova"`, or a voice per model:
`Alice = { "openai/gpt-4o-mini-tts" = "nova", "local/espeak-ng" = "en-us+f3" }`); a name the table
does not hold is the voice itself. Outside any `<voice>`, the row's own voice speaks.

A name may hold a pool of voices (`crowd = ["alloy", "nova", "onyx"]`, by model too): each row takes
one of them, chosen from its key (`speakers.py`), for the name's words in its markup and, when the
row's own voice names the pool, for the whole row.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .chunking import trim
from .errors import UsageError
from .speakers import SEPARATOR, choose

MAX_BREAK = 60.0  # seconds, as the longest stitching gap
_CANDIDATE = re.compile(r"</?(?:voice|break)\b[^<>]*>?")
_OPEN = re.compile(r"""<voice\s+name\s*=\s*(?:"([^"<>]*)"|'([^'<>]*)')\s*>""")
_CLOSE = re.compile(r"</voice\s*>")
_BREAK = re.compile(r"""<break\s+time\s*=\s*(?:"([^"]*)"|'([^']*)')\s*/>""")
_TIME = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s)")
_PARAGRAPH = re.compile(r"\n[ \t]*\n")


class MarkupError(ValueError):
    """A row that cannot be narrated as written: markup that cannot be read (the message says where
    in the row), or no words left to say."""


@dataclass(frozen=True)
class Stretch:
    """Words of a row between two tags, as offsets into its text (without the whitespace around them)."""

    start: int
    end: int
    voice: str | None  # the name the markup gives; None: the row's own voice
    pause: float | None  # seconds of silence the markup asks for before these words
    paragraph_before: bool  # a paragraph ends between the words before and these


def has_markup(text: str) -> bool:
    """A quick look, before any parsing: most rows hold no tag at all."""
    return "<voice" in text or "<break" in text or "</voice" in text


def stretches(text: str) -> list[Stretch] | None:
    """The row's words in order, each with its voice and the pause before it; None when the text
    holds no markup. MarkupError names the first tag that cannot be read."""
    if not has_markup(text):
        return None
    tags = list(_CANDIDATE.finditer(text))
    if not tags:
        return None
    found: list[Stretch] = []
    open_voices: list[tuple[str, int]] = []
    pause: float | None = None
    at = 0
    for tag in [*tags, None]:
        start, end = trim(text, at, len(text) if tag is None else tag.start())
        if start < end:
            paragraph = bool(found) and _PARAGRAPH.search(_CANDIDATE.sub("", text[found[-1].end:start])) is not None
            found.append(Stretch(start, end, open_voices[-1][0] if open_voices else None, pause, paragraph))
            pause = None
        if tag is None:
            break
        at = tag.end()
        if (opened := _OPEN.fullmatch(tag.group())) is not None:
            name = (opened.group(1) if opened.group(1) is not None else opened.group(2)).strip()
            if not name:
                raise MarkupError(_at(text, tag.start(), "<voice> has an empty name"))
            open_voices.append((name, tag.start()))
        elif _CLOSE.fullmatch(tag.group()):
            if not open_voices:
                raise MarkupError(_at(text, tag.start(), "</voice> closes no <voice>"))
            open_voices.pop()
        elif (pause_tag := _BREAK.fullmatch(tag.group())) is not None:
            seconds = _seconds(pause_tag.group(1) if pause_tag.group(1) is not None else pause_tag.group(2))
            if seconds is None:
                raise MarkupError(_at(text, tag.start(), f"{tag.group()} is not a pause: write the time as "
                                                         f'"1.5s" or "500ms", at most {MAX_BREAK:g} s'))
            pause = (pause or 0.0) + seconds
        else:
            raise MarkupError(_at(text, tag.start(), f"{_shown(tag.group())} is not markup batchtts reads: write "
                                                     '<voice name="...">, </voice> or <break time="1.5s"/>'))
    if open_voices:
        name, where = open_voices[-1]
        raise MarkupError(_at(text, where, f'<voice name="{name}"> is never closed with </voice>'))
    return found


def _seconds(value: str) -> float | None:
    match = _TIME.fullmatch(value.strip())
    if match is None:
        return None
    seconds = float(match.group(1)) / (1000 if match.group(2) == "ms" else 1)
    return seconds if seconds <= MAX_BREAK else None


def _at(text: str, offset: int, problem: str) -> str:
    line = text.count("\n", 0, offset) + 1
    column = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return f"voice markup at line {line}, column {column} (character {offset + 1}): {problem}"


def _shown(tag: str) -> str:
    return tag if len(tag) <= 40 else tag[:37] + "..."


Voices = str | tuple[str, ...]  # one voice, or a pool


class Cast:
    """The job's `[voices]` table: names of characters to voices, one for every model or a table of
    voices by model name or prefix (the longest that fits wins); a voice may be a pool of voices.
    Names are matched ignoring case."""

    def __init__(self, voices: Mapping[str, Any] | None = None, where: str = "[voices]") -> None:
        self._voices: dict[str, Voices | dict[str, Voices]] = {}
        self._names: dict[str, str] = {}
        if voices is None:
            return
        if not isinstance(voices, Mapping):
            raise UsageError(f"{where} must be a table of names and voices, such as Alice = \"nova\"")
        for name, voice in voices.items():
            label = f"{where} {name}"
            if not isinstance(name, str) or not name.strip():
                raise UsageError(f"{where}: a name must be text, not {name!r}")
            if name.casefold() in self._names:
                raise UsageError(f"{label}: given twice (as {self._names[name.casefold()]!r} too; names ignore case)")
            self._names[name.casefold()] = name
            self._voices[name.casefold()] = _voice_setting(label, voice)

    def voice(self, name: str, model: str, key: str = "") -> str:
        """The voice that speaks `name` in a row of `model` keyed `key`: the table's (of a pool, the
        one the key chooses), else the name itself."""
        choice = self._for(name, model)
        if choice is None:
            return name
        return choice if isinstance(choice, str) else choose(key, choice)

    def pool(self, name: str, model: str) -> tuple[str, ...] | None:
        """The voices `name` gives rows of `model`, when it names a pool (for any model); else None."""
        setting = self._voices.get(name.casefold())
        pooled = isinstance(setting, tuple) or (isinstance(setting, dict)
                                                and any(isinstance(v, tuple) for v in setting.values()))
        choice = self._for(name, model) if pooled else None
        return None if choice is None else (choice,) if isinstance(choice, str) else choice

    def _for(self, name: str, model: str) -> Voices | None:
        setting = self._voices.get(name.casefold())
        if setting is None or not isinstance(setting, dict):
            return setting
        fits = [prefix for prefix in setting if model.startswith(prefix)]
        return setting[max(fits, key=len)] if fits else None

    def as_table(self) -> dict[str, Any]:
        """The table as the job file writes it (a pool as a list): JSON, for the ledger."""
        def written(voices: Voices) -> str | list[str]:
            return voices if isinstance(voices, str) else list(voices)

        return {self._names[key]: {model: written(v) for model, v in value.items()} if isinstance(value, dict)
                else written(value) for key, value in self._voices.items()}

    def __bool__(self) -> bool:
        return bool(self._voices)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Cast) and self.as_table() == other.as_table()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Cast({self.as_table()!r})"

    def __deepcopy__(self, memo: dict[int, Any]) -> Cast:
        return self  # immutable: a Job's copy (dataclasses.asdict) shares it


def _voice_setting(label: str, voice: Any) -> Voices | dict[str, Voices]:
    if isinstance(voice, (str, list)):
        return _voices(label, voice)
    if isinstance(voice, Mapping) and voice:
        return {str(model): _voices(f"{label} {model}", value) for model, value in voice.items()}
    raise UsageError(f'{label} must be a voice ("nova"), a pool of voices (["alloy", "nova"]) or a table of '
                     f"voices by model, not {voice!r}")


def _voices(label: str, voice: Any) -> Voices:
    if isinstance(voice, str):
        return _one_voice(label, voice)
    if not isinstance(voice, list):
        raise UsageError(f"{label}: a voice must be text or a list of voices, not {type(voice).__name__}")
    if not voice:
        raise UsageError(f'{label} is an empty pool: list its voices, such as ["alloy", "nova"]')
    pool: list[str] = []
    for value in voice:
        if not isinstance(value, str):
            raise UsageError(f"{label}: a voice must be text, not {type(value).__name__}")
        pool.append(_one_voice(label, value))
    if len(set(pool)) < len(pool):
        raise UsageError(f"{label} names a voice twice: a voice counts once in a pool")
    return tuple(pool)


def _one_voice(label: str, voice: str) -> str:
    if not voice.strip() or any(c in voice for c in f'<>"{SEPARATOR}'):
        raise UsageError(f"{label}: {voice!r} is not a voice name")
    return voice.strip()
