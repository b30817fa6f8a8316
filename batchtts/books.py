"""A plain-text or Markdown book turned into a chapter manifest, so an audiobook is two commands:

    batchtts manifest from-text BOOK.md --out chapters.csv
    batchtts run chapters.csv --out audiobook --model openai/gpt-4o-mini-tts --voice fable
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv

from .errors import UsageError

_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_TEXT_CHAPTER = re.compile(r"^\s*(chapter|part|book|prologue|epilogue)\b.*$", re.IGNORECASE)
_MARKUP = [
    (re.compile(r"!\[[^\]]*\]\([^)]*\)"), ""),          # images
    (re.compile(r"\[([^\]]+)\]\([^)]*\)"), r"\1"),      # links keep their text
    (re.compile(r"`{3}.*?`{3}", re.DOTALL), ""),        # code blocks are not read aloud
    (re.compile(r"(\*\*|__|\*|_|`)(?=\S)(.+?)(?<=\S)\1"), r"\2"),  # emphasis and inline code
    (re.compile(r"^\s{0,3}>\s?", re.MULTILINE), ""),     # block quotes
    (re.compile(r"^\s*[-*+]\s+", re.MULTILINE), ""),     # list bullets
    (re.compile(r"^\s*([-*_]\s*){3,}$", re.MULTILINE), ""),  # horizontal rules
]


@dataclass(frozen=True)
class Chapter:
    title: str
    text: str


def _plain(markdown: str) -> str:
    for pattern, replacement in _MARKUP:
        markdown = pattern.sub(replacement, markdown)
    return re.sub(r"\n{3,}", "\n\n", markdown).strip()


def split_chapters(source: str, markdown: bool, pattern: str | None = None) -> list[Chapter]:
    """Chapters start at lines matching `pattern`; by default at Markdown headings of the level that
    divides the book (the highest level used more than once), or at "Chapter ..." lines in plain text."""
    lines = source.splitlines()
    if pattern is not None:
        try:
            starts = re.compile(pattern)
        except re.error as exc:
            raise UsageError(f"bad --chapter-pattern: {exc}") from exc
        is_start = [bool(starts.search(line)) for line in lines]
    elif markdown:
        levels = [len(m.group(1)) for line in lines if (m := _HEADING.match(line))]
        counts = Counter(levels)
        repeated = sorted(level for level, n in counts.items() if n > 1)
        level = repeated[0] if repeated else min(levels, default=1)
        is_start = [bool((m := _HEADING.match(line)) and len(m.group(1)) == level) for line in lines]
    else:
        is_start = [bool(_TEXT_CHAPTER.match(line)) for line in lines]

    chapters: list[Chapter] = []
    title = ""
    body: list[str] = []
    for line, starts_chapter in zip(lines, is_start, strict=True):
        if starts_chapter:
            _close(chapters, title, body, markdown)
            heading = _HEADING.match(line)
            title, body = (heading.group(2) if heading else line).strip(), []
        else:
            body.append(line)
    _close(chapters, title, body, markdown)
    return chapters


def _close(chapters: list[Chapter], title: str, body: list[str], markdown: bool) -> None:
    text = "\n".join(body)
    text = _plain(text) if markdown else text.strip()
    if markdown:
        # Headings below the chapter level become spoken lines of their own.
        text = re.sub(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", r"\1.", text, flags=re.MULTILINE)
    if not text and not title:
        return
    spoken_title = title or "Front matter"
    heading = f"{spoken_title.rstrip('.!?:;')}."
    chapters.append(Chapter(spoken_title, f"{heading}\n\n{text}".strip() if title else text))


def write_manifest(chapters: list[Chapter], out: Path, prefix: str = "chapter") -> None:
    width = max(2, len(str(len(chapters))))
    table = pa.table({
        "id": [f"{prefix}-{i:0{width}d}" for i in range(1, len(chapters) + 1)],
        "title": [c.title for c in chapters],
        "track": [str(i) for i in range(1, len(chapters) + 1)],
        "text": [c.text for c in chapters],
    })
    out.parent.mkdir(parents=True, exist_ok=True)
    pacsv.write_csv(table, out)


def book_to_manifest(book: Path, out: Path, pattern: str | None = None) -> list[Chapter]:
    try:
        source = book.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {book}: {exc}") from exc
    chapters = split_chapters(source, markdown=book.suffix.lower() in (".md", ".markdown"), pattern=pattern)
    if not chapters:
        raise UsageError(f"{book}: no text found")
    try:
        write_manifest(chapters, out)
    except OSError as exc:
        raise UsageError(f"cannot write {out}: {exc.strerror or exc}") from exc
    return chapters
