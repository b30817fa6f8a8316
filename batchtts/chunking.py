"""Splitting long texts into requests a speech endpoint accepts, at the most natural breaks.

A row over its model's input limit is cut at paragraph breaks first, then sentence ends (pysbd, which
knows "Mr.", "U.S." and "3.14" are not sentence ends), then clause punctuation, then whitespace;
never inside a word. Each level is used only where the one above leaves a piece too long, and
pieces are packed greedily up to the limit. Every chunk is a slice of the original text, so the
chunks joined back give the text again, but for whitespace at the seams.

pysbd's time grows with the square of what it is given (it looks each sentence up from the start
of its text), so a paragraph is given to it a window of two limits at a time: splitting is linear
in the text's length even for a chapter with no blank line.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pysbd


DEFAULT_LIMIT = 4096
# Input limits per model family, by name prefix; the longest matching prefix wins.
KNOWN_LIMITS = {
    "openai/": 4096,
    "elevenlabs/": 5000,
    "local/": 4096,
}

_PARAGRAPH = re.compile(r"\n[ \t]*\n\s*")
_CLAUSE = re.compile(r"(?<=[,;:\u2014\u2013)\]])\s+|\s+(?=[(\[\u2014\u2013])")
_SPACE = re.compile(r"\s+")
# pysbd is given two limits of text at a time, and at least _MIN_WINDOW characters: a sentence that
# runs past half a window is then longer than a request. pysbd's time per character grows with the
# window, so it is kept that small.
_WINDOW_LIMITS = 2
_MIN_WINDOW = 4096


def limit_for(model: str, overrides: dict[str, int] | None = None, chunk_chars: int | None = None) -> int:
    """The input limit for `model`: --chunk-chars, then the job's [limits], then the built-in table."""
    if chunk_chars is not None:
        return chunk_chars
    table = {**KNOWN_LIMITS, **(overrides or {})}
    matches = [prefix for prefix in table if model.startswith(prefix)]
    return table[max(matches, key=len)] if matches else DEFAULT_LIMIT


@dataclass(frozen=True)
class Chunk:
    """A piece of a row requested on its own; `start` is where its words begin in the row's text."""

    text: str
    start: int
    paragraph_before: bool  # the seam before this chunk is a paragraph break (a longer pause)
    voice: str | None = None  # the voice voice markup gives it; None: the row's own
    pause: float | None = None  # seconds of silence markup asks for before it, in place of the seam's gap
    caption: str | None = None  # its words as the manifest writes them, when the lexicon changed them


_local = threading.local()


def _segmenter() -> pysbd.Segmenter:
    """This thread's segmenter: pysbd keeps the text it segments on the segmenter, so one shared by
    threads finds one thread's sentences in another's text (and drops them, unfound)."""
    try:
        return _local.segmenter
    except AttributeError:
        import pysbd  # loaded by the first long row, not by every command

        _local.segmenter = pysbd.Segmenter(language="en", clean=False, char_span=True)
        return _local.segmenter


def _spans(text: str, start: int, end: int, pattern: re.Pattern[str]) -> Iterator[tuple[int, int]]:
    """The pieces of text[start:end] between matches of a separator pattern."""
    at = start
    for match in pattern.finditer(text, start, end):
        if match.start() > at:
            yield at, match.start()
        at = match.end()
    if at < end:
        yield at, end


def _sentences(text: str, start: int, end: int, limit: int) -> Iterator[tuple[int, int]]:
    """Sentences of text[start:end], found a window at a time. A window ends at a line break (pysbd
    ends a sentence at each), else at a space; its last sentence, which the window may have cut
    short, is found again at the start of the next one, unless it starts in the window's first half:
    then it is whole (ended by a line break), or it runs past half a window, is longer than a
    request and is cut at clauses anyway."""
    window = max(_WINDOW_LIMITS * limit, _MIN_WINDOW)
    while end - start > window:
        cut = _window_end(text, start + window // 2, start + window)
        found = list(_segment(text, start, cut))
        if found and found[-1][0] - start >= window // 2:
            yield from found[:-1]
            start = found[-1][0]
        else:
            yield from found
            start = cut
    yield from _segment(text, start, end)


def _window_end(text: str, low: int, high: int) -> int:
    """Just after the last line break in text[low:high], else the last space, else `high`."""
    for separator in ("\n", " "):
        at = text.rfind(separator, low, high)
        if at >= 0:
            return at + 1
    return high


def _segment(text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    for span in _segmenter().segment(text[start:end]):
        yield start + span.start, start + span.end


def sentences(text: str) -> list[str]:
    """The sentences of a text, as the chunker finds them, without the whitespace around them."""
    return [sentence for a, b in _sentences(text, 0, len(text), DEFAULT_LIMIT) if (sentence := text[a:b].strip())]


def _words_and_parts(text: str, start: int, end: int, limit: int) -> Iterator[tuple[int, int]]:
    for a, b in _spans(text, start, end, _SPACE):
        while b - a > limit:  # one "word" longer than a request: nothing better than a hard cut
            yield a, a + limit
            a += limit
        yield a, b


def split_text(text: str, limit: int) -> list[Chunk]:
    """Chunks of at most `limit` characters; one chunk when the text fits."""
    if limit < 1:
        raise ValueError("limit must be positive")
    stripped = text.strip()
    if len(stripped) <= limit:
        offset = text.index(stripped) if stripped else 0
        return [Chunk(stripped, offset, False)]
    levels: list[Callable[[str, int, int], Iterator[tuple[int, int]]]] = [
        lambda t, a, b: _spans(t, a, b, _PARAGRAPH),
        lambda t, a, b: _sentences(t, a, b, limit),
        lambda t, a, b: _spans(t, a, b, _CLAUSE),
        lambda t, a, b: _words_and_parts(t, a, b, limit),
    ]
    pieces: list[tuple[int, int, bool]] = []  # (start, end, starts a paragraph)

    def descend(start: int, end: int, level: int, new_paragraph: bool) -> None:
        for i, (a, b) in enumerate(levels[level](text, start, end)):
            a, b = trim(text, a, b)
            if a >= b:
                continue
            first = new_paragraph if i == 0 else level == 0
            if b - a <= limit or level == len(levels) - 1:
                pieces.append((a, b, first))
            else:
                descend(a, b, level + 1, first)

    descend(0, len(text), 0, False)
    return _pack(text, pieces, limit)


def trim(text: str, a: int, b: int) -> tuple[int, int]:
    """The span text[a:b] without the whitespace at its ends."""
    while a < b and text[a].isspace():
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    return a, b


def _pack(text: str, pieces: list[tuple[int, int, bool]], limit: int) -> list[Chunk]:
    """Greedy packing; a chunk prefers to end where a paragraph does once it is half full."""
    chunks: list[Chunk] = []
    start: int | None = None
    end = 0
    paragraph_before = False
    for a, b, new_paragraph in pieces:
        if start is not None and (b - start > limit or (new_paragraph and end - start >= limit // 2)):
            chunks.append(Chunk(text[start:end], start, paragraph_before))
            start = None
        if start is None:
            start, paragraph_before = a, new_paragraph and bool(chunks)
        end = b
    if start is not None:
        chunks.append(Chunk(text[start:end], start, paragraph_before))
    return chunks
