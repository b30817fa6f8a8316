"""A pronunciation lexicon: words the voices say wrong, rewritten before a row is split and sent.

Entries come from a CSV or TSV file (`[lexicon] file`, `--lexicon FILE`), then from the job file's
inline `entries`, and are applied in that order, each to the text the earlier ones left. A literal
pattern matches a whole word, case-sensitively (so "US" is not "us"): neither a letter, a digit nor
an underscore may touch it on either side. A regex pattern (`regex` true) matches as Python's `re`
does, and its replacement may name groups (`\\1`, `\\g<name>`); a match of no characters replaces
nothing. An entry may be scoped to rows of one model (or model prefix ending in "/"), one voice, or
one language (`en` takes in `en-GB`); an empty scope is every row.

A lexicon that changes nothing in a row leaves that row exactly as it was, fingerprint and all: a
lexicon added to a finished job narrates again only the rows (and the chunks) whose words it changes.
"""

from __future__ import annotations

import bisect
import csv
import io
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UsageError
from .suggest import did_you_mean

COLUMNS = ("pattern", "replacement", "model", "voice", "language", "regex")
_TRUE = ("true", "yes", "1")
_FALSE = ("false", "no", "0", "")


@dataclass(frozen=True)
class Entry:
    """One rewrite. `where` names it in messages: the file and line, or the job file's entry."""

    pattern: str
    replacement: str
    model: str | None = None
    voice: str | None = None
    language: str | None = None
    regex: bool = False
    where: str = "lexicon entry"
    compiled: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("pattern", "replacement", "model", "voice", "language", "where"):
            value = getattr(self, name)
            if not (isinstance(value, str) or (value is None and name in ("model", "voice", "language"))):
                raise UsageError(f"{self.where}: {name} must be text, not {type(value).__name__}")
        if not isinstance(self.regex, bool):
            raise UsageError(f"{self.where}: regex must be true or false")
        if not self.pattern:
            raise UsageError(f"{self.where}: the pattern is empty")
        source = self.pattern if self.regex else rf"(?<!\w){re.escape(self.pattern)}(?!\w)"
        try:
            compiled = re.compile(source)
        except re.error as exc:
            raise UsageError(f"{self.where}: the pattern is not a valid regular expression: {exc}") from None
        except RecursionError:
            raise UsageError(f"{self.where}: the pattern is nested too deep") from None
        if self.regex:
            try:
                compiled.sub(self.replacement, "")  # a bad group reference or escape fails here, unmatched
            except re.error as exc:
                raise UsageError(f"{self.where}: the replacement does not fit the pattern: {exc}") from None
        object.__setattr__(self, "compiled", compiled)

    def applies(self, model: str, voice: str, language: str | None) -> bool:
        """Whether this entry's scope takes in a row (or a stretch of one) of this model, voice and language."""
        if self.model is not None and not (self.model == model or (self.model.endswith("/")
                                                                    and model.startswith(self.model))):
            return False
        if self.voice is not None and self.voice.casefold() != voice.casefold():
            return False
        if self.language is not None:
            wanted = _language(self.language)
            have = _language(language or "")
            return have == wanted or have.startswith(wanted + "-")
        return True


def _language(code: str) -> str:
    return code.strip().replace("_", "-").casefold()


@dataclass(frozen=True)
class Rewritten:
    """A text after the lexicon, and the way back from its offsets to the text it was made from."""

    text: str
    edits: tuple[tuple[tuple[int, int, int, int], ...], ...]  # per entry: (new start, new end, old start, old end)

    def origin(self, offset: int, end: bool = False) -> int:
        """Where `offset` of the rewritten text was in the original. Inside a replacement, its start
        (or, for the `end` of a span, its end): a span always takes in whole original words."""
        for edits in reversed(self.edits):
            index = bisect.bisect_right(edits, offset, key=lambda e: e[0]) - 1
            if index < 0:
                continue
            new_start, new_end, old_start, old_end = edits[index]
            if new_start < offset < new_end:
                offset = old_end if end else old_start
            elif offset == new_start and offset < new_end:
                offset = old_start
            else:
                offset = old_end + offset - new_end
        return offset


class Lexicon:
    """The entries, in the order they apply. Built from a file (`read`), from the job file's table
    (`from_setting`), or from Entry objects; an empty lexicon changes nothing."""

    def __init__(self, entries: Iterable[Entry] = ()) -> None:
        self.entries = tuple(entries)
        for entry in self.entries:
            if not isinstance(entry, Entry):
                raise UsageError(f"a lexicon holds Entry objects, not {type(entry).__name__}")
        self._scoped: dict[tuple[str, str, str | None], tuple[Entry, ...]] = {}

    def __bool__(self) -> bool:
        return bool(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Lexicon) and self.entries == other.entries

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Lexicon({len(self.entries)} entries)"

    def __deepcopy__(self, memo: dict[int, Any]) -> Lexicon:
        return self  # immutable: a Job's copy (dataclasses.asdict) shares it

    def _for(self, model: str, voice: str, language: str | None) -> tuple[Entry, ...]:
        """The entries whose scope takes in this model, voice and language (found once per combination)."""
        key = (model, voice, language)
        found = self._scoped.get(key)
        if found is None:
            found = self._scoped[key] = tuple(e for e in self.entries if e.applies(model, voice, language))
        return found

    def rewrite(self, text: str, model: str, voice: str, language: str | None = None) -> Rewritten | None:
        """The text as a voice of this model says it in this language, or None when no entry changes it."""
        edits: list[tuple[tuple[int, int, int, int], ...]] = []
        for entry in self._for(model, voice, language):
            if not entry.regex and entry.pattern not in text:
                continue  # the common case, without a regex search
            text, made = _apply(entry, text)
            if made:
                edits.append(made)
        return Rewritten(text, tuple(edits)) if edits else None

    @classmethod
    def read(cls, path: Path) -> Lexicon:
        """A CSV (or, named .tsv, tab-separated) file with a header: pattern, replacement, and
        optionally model, voice, language, regex. Blank lines are skipped."""
        return cls(_read_entries(path))

    @classmethod
    def from_setting(cls, value: Any, base: Path, where: str, file: Path | None = None) -> Lexicon:
        """The job file's `[lexicon]` table: `file` (relative to the job file; `file`, from --lexicon,
        takes its place) and inline `entries`, a list of tables with the file's columns as keys."""
        table: Mapping[str, Any] = {} if value is None else value
        if not isinstance(table, Mapping):
            raise UsageError(f"{where}[lexicon] must be a table (file = \"lexicon.csv\", entries = [...]), "
                             f"not {type(table).__name__}")
        unknown = sorted(set(table) - {"file", "entries"})
        if unknown:
            raise UsageError(f"{where}unknown key{'s' if len(unknown) > 1 else ''} in [lexicon]: "
                             f"{', '.join(unknown)}{did_you_mean(unknown[0], ('file', 'entries'))}; "
                             "[lexicon] takes file and entries")
        entries: list[Entry] = []
        if file is None and table.get("file") is not None:
            if not isinstance(table["file"], str):
                raise UsageError(f"{where}[lexicon] file must be a path (text)")
            file = Path(os.path.normpath(base / os.path.expanduser(table["file"])))
        if file is not None:
            entries.extend(_read_entries(file))
        inline = table.get("entries", [])
        if not isinstance(inline, list):
            raise UsageError(f"{where}[lexicon] entries must be a list of tables: "
                             'entries = [{ pattern = "Nguyen", replacement = "Win" }]')
        for number, item in enumerate(inline, 1):
            entries.append(_inline_entry(item, f"{where}[lexicon] entries[{number}]"))
        return cls(entries)


def _apply(entry: Entry, text: str) -> tuple[str, tuple[tuple[int, int, int, int], ...]]:
    """One entry over the text: the new text and where it changed (empty matches change nothing)."""
    pieces: list[str] = []
    made: list[tuple[int, int, int, int]] = []
    at = shift = 0
    for match in entry.compiled.finditer(text):
        start, end = match.span()
        if start == end:
            continue
        replacement = match.expand(entry.replacement) if entry.regex else entry.replacement
        if replacement == match.group():
            continue
        pieces.append(text[at:start])
        pieces.append(replacement)
        made.append((start + shift, start + shift + len(replacement), start, end))
        shift += len(replacement) - (end - start)
        at = end
    if not made:
        return text, ()
    pieces.append(text[at:])
    return "".join(pieces), tuple(made)


def _inline_entry(item: Any, where: str) -> Entry:
    if not isinstance(item, Mapping):
        raise UsageError(f"{where} must be a table such as {{ pattern = \"Nguyen\", replacement = \"Win\" }}")
    unknown = sorted(set(item) - set(COLUMNS))
    if unknown:
        raise UsageError(f"{where}: unknown key {unknown[0]!r}{did_you_mean(unknown[0], COLUMNS)}; "
                         f"an entry takes {', '.join(COLUMNS)}")
    for required in ("pattern", "replacement"):
        if required not in item:
            raise UsageError(f"{where}: no {required}")
    scope = {name: item.get(name) or None for name in ("model", "voice", "language")}
    return Entry(item["pattern"], item["replacement"], regex=item.get("regex", False), where=where, **scope)


def _read_entries(path: Path) -> list[Entry]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read lexicon {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UsageError(f"{path}, line {line}: not UTF-8 text (byte 0x{data[exc.start]:02X}): "
                         "save the lexicon as UTF-8") from None
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    entries: list[Entry] = []
    try:
        header = [name.strip().lower() for name in next(reader, [])]
        _check_header(path, header)
        line = reader.line_num
        for record in reader:
            first, line = line + 1, reader.line_num
            if not any(value.strip() for value in record):
                continue
            where = f"{path}, line {first}"
            if len(record) != len(header):
                raise UsageError(f"{where}: {len(record)} fields where the header has {len(header)}")
            values = dict(zip(header, record, strict=True))
            regex = values.get("regex", "").strip().lower()
            if regex not in _TRUE + _FALSE:
                raise UsageError(f"{where}: regex is {values['regex']!r}: give true or false (or leave it empty)")
            literal = regex not in _TRUE
            pattern, replacement = values["pattern"], values["replacement"]
            if literal:
                pattern, replacement = pattern.strip(), replacement.strip()
            scope = {name: values.get(name, "").strip() or None for name in ("model", "voice", "language")}
            entries.append(Entry(pattern, replacement, regex=not literal, where=where, **scope))
    except csv.Error as exc:
        raise UsageError(f"{path}, line {reader.line_num}: {exc}") from None
    return entries


def _check_header(path: Path, header: list[str]) -> None:
    where = f"{path}, line 1"
    if not header:
        raise UsageError(f"{path}: the lexicon is empty: it needs a header line such as pattern,replacement")
    for name in header:
        if name not in COLUMNS:
            raise UsageError(f"{where}: unknown column {name!r}{did_you_mean(name, COLUMNS)}; "
                             f"a lexicon has the columns {', '.join(COLUMNS)}")
        if header.count(name) > 1:
            raise UsageError(f"{where}: column {name!r} appears twice")
    for required in ("pattern", "replacement"):
        if required not in header:
            raise UsageError(f"{where}: no {required!r} column (the header is {', '.join(header)})")
