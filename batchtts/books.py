"""A book (Markdown, plain text or EPUB) turned into a chapter manifest, so an audiobook is two commands:

    batchtts manifest from-text BOOK.epub --out chapters.csv
    batchtts run chapters.csv --out audiobook --model openai/gpt-4o-mini-tts --voice fable

Every kind of book is numbered the same way: what comes before the book's first chapter (title page,
dedication, a preface) is one row, track 0, so "Chapter 1" is track 1 whatever precedes it.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_TEXT_CHAPTER = re.compile(r"^\s*(chapter|part|book|prologue|epilogue)\b.*$", re.IGNORECASE)
# A title that starts the body of a book, rather than its front matter ("Preface", "Title Page").
CHAPTER_TITLE = re.compile(
    r"^\s*((chapter|part|book|prologue|epilogue)\b|(\d+|[ivxlcdm]+)\s*([.:)\-\u2013\u2014]|$))", re.IGNORECASE
)
FRONT_MATTER = "Front matter"
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
class Section:
    """A stretch of the book in reading order; an untitled one (title "") has no heading of its own."""

    title: str
    text: str


@dataclass(frozen=True)
class Chapter:
    """One manifest row; track 0 is the front matter."""

    title: str
    text: str
    track: int


@dataclass(frozen=True)
class Cover:
    data: bytes
    suffix: str  # ".jpg", ".png": the file written beside the manifest ends so


@dataclass(frozen=True)
class Book:
    """A book read but not yet numbered: `body` is the index of the section the first chapter starts."""

    sections: list[Section]
    body: int
    album: str | None = None
    artist: str | None = None
    cover: Cover | None = None


@dataclass(frozen=True)
class Written:
    chapters: list[Chapter]
    cover: Path | None


def spoken_heading(title: str) -> str:
    """A heading read as a sentence of its own: a pause after it, its question or exclamation kept."""
    title = title.strip().rstrip(".:;,").rstrip()
    return title if title.endswith(("!", "?", "\u2026")) else f"{title}."


def compile_pattern(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"bad --chapter-pattern: {exc}") from exc


def _plain(markdown: str) -> str:
    for pattern, replacement in _MARKUP:
        markdown = pattern.sub(replacement, markdown)
    return re.sub(r"\n{3,}", "\n\n", markdown).strip()


def split_chapters(source: str, markdown: bool, pattern: str | None = None) -> list[Section]:
    """Chapters start at lines matching `pattern`; by default at Markdown headings of the level that
    divides the book (the highest level used more than once), or at "Chapter ..." lines in plain text."""
    lines = source.splitlines()
    if pattern is not None:
        starts = compile_pattern(pattern)
        is_start = [bool(starts.search(line)) for line in lines]
    elif markdown:
        levels = [len(m.group(1)) for line in lines if (m := _HEADING.match(line))]
        counts = Counter(levels)
        repeated = sorted(level for level, n in counts.items() if n > 1)
        level = repeated[0] if repeated else min(levels, default=1)
        is_start = [bool((m := _HEADING.match(line)) and len(m.group(1)) == level) for line in lines]
    else:
        is_start = [bool(_TEXT_CHAPTER.match(line)) for line in lines]

    sections: list[Section] = []
    title = ""
    body: list[str] = []
    for line, starts_chapter in zip(lines, is_start, strict=True):
        if starts_chapter:
            _close(sections, title, body, markdown)
            heading = _HEADING.match(line)
            title, body = (heading.group(2) if heading else line).strip(), []
            if markdown:
                title = _plain(title)
        else:
            body.append(line)
    _close(sections, title, body, markdown)
    return sections


def _close(sections: list[Section], title: str, body: list[str], markdown: bool) -> None:
    text = "\n".join(body)
    text = _plain(text) if markdown else text.strip()
    if markdown:
        # Headings below the chapter level become spoken lines of their own.
        text = re.sub(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", lambda m: spoken_heading(m.group(1)), text,
                      flags=re.MULTILINE)
    if not text and not title:
        return
    sections.append(Section(title, f"{spoken_heading(title)}\n\n{text}".strip() if title else text))


def first_chapter(titles: Sequence[str]) -> int:
    """Where the body starts among sections so titled: the first that names a chapter ("Chapter 1",
    "Part One", "Prologue", "IV."), else the first titled one. An untitled book is all body."""
    titled = [i for i, title in enumerate(titles) if title]
    return next((i for i in titled if CHAPTER_TITLE.match(titles[i])), titled[0] if titled else 0)


def numbered(book: Book, front_matter: bool = True, untitled: str = FRONT_MATTER) -> list[Chapter]:
    """The rows: the sections before the body as one, track 0 (left out without `front_matter`), then
    one a section from track 1. An untitled section of the body is called `untitled`."""
    front, body = book.sections[:book.body], book.sections[book.body:]
    chapters = [Chapter(s.title or untitled, s.text, track) for track, s in enumerate(body, start=1)]
    if front and front_matter:
        title = (front[0].title or FRONT_MATTER) if len(front) == 1 else FRONT_MATTER
        chapters.insert(0, Chapter(title, "\n\n".join(s.text for s in front), 0))
    return chapters


def write_manifest(chapters: list[Chapter], out: Path, prefix: str = "chapter", **extra: str | None) -> None:
    """id, title, track and text, then a column for each of `extra` that has a value (album, artist,
    cover), the same in every row. Every field quoted, as Arrow's CSV writer quotes text: written
    with the standard library, so that making a manifest loads neither Arrow nor numpy."""
    width = max(2, len(str(max((c.track for c in chapters), default=0))))
    columns: dict[str, list[str]] = {
        "id": [f"{prefix}-{c.track:0{width}d}" for c in chapters],
        "title": [c.title for c in chapters],
        "track": [str(c.track) for c in chapters],
        "text": [c.text for c in chapters],
    }
    columns.update({name: [value] * len(chapters) for name, value in extra.items() if value})
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, quoting=csv.QUOTE_ALL, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(zip(*columns.values(), strict=True))


def read_text_book(book: Path, pattern: str | None = None) -> Book:
    try:
        source = book.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {book}: {exc}") from exc
    sections = split_chapters(source, markdown=book.suffix.lower() in (".md", ".markdown"), pattern=pattern)
    titles = [s.title for s in sections]
    if pattern is not None:
        # Every titled section was found by the pattern: the first of them is the first chapter.
        return Book(sections, next((i for i, title in enumerate(titles) if title), 0))
    return Book(sections, first_chapter(titles))


def cover_path(out: Path, cover: Cover) -> Path:
    """Beside the manifest and named after it, so two manifests in one folder keep their own covers."""
    return out.with_name(f"{out.stem}-cover{cover.suffix}")


def book_to_manifest(book: Path, out: Path, pattern: str | None = None, front_matter: bool = True,
                     force: bool = False) -> Written:
    """Read BOOK (.epub, .md/.markdown, or plain text) and write its chapter manifest to `out`, and
    its cover beside it; files already there are kept unless `force`."""
    if out.exists() and not force:
        raise UsageError(f"{out} exists: pass --force to overwrite it")
    if book.suffix.lower() == ".epub":
        from .epub import read_epub

        read = read_epub(book, pattern)
    else:
        read = read_text_book(book, pattern)
    chapters = numbered(read, front_matter, untitled=book.stem)
    if not chapters:
        raise UsageError(f"{book}: no text found")
    cover = cover_path(out, read.cover) if read.cover is not None else None
    if cover is not None and cover.exists() and not force:
        raise UsageError(f"{cover} exists: pass --force to overwrite it")
    try:
        if read.cover is not None and cover is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            cover.write_bytes(read.cover.data)
        write_manifest(chapters, out, album=read.album, artist=read.artist,
                       cover=cover.name if cover is not None else None)
    except OSError as exc:
        raise UsageError(f"cannot write {out}: {exc.strerror or exc}") from exc
    return Written(chapters, cover)
