"""An EPUB (2 or 3) read as a book of sections to narrate, with its title, authors and cover.

Chapters come from the table of contents (the EPUB 3 nav, or the EPUB 2 NCX), which may point into
the middle of a document when several chapters share one; a book without a usable one is read a
spine document a chapter. What a listener does not want read aloud is left out: markup, scripts,
footnote and endnote references and the notes themselves, page numbers, and whole pages such as the
cover, the table of contents and the copyright page.
"""

from __future__ import annotations

import mimetypes
import posixpath
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote

import ebooklib
import lxml.html  # type: ignore[import-untyped]  # lxml ships no types; ebooklib brings it
from ebooklib import epub
from lxml import etree

from .books import CHAPTER_TITLE, Book, Cover, Section, compile_pattern, spoken_heading
from .errors import UsageError

_EPUB_TYPE = "{http://www.idpf.org/2007/ops}type"
_DOCUMENT_TYPES = ("application/xhtml+xml", "text/html")
# Kinds of page (EPUB 3 landmarks and epub:type, EPUB 2 guide types) nobody wants read aloud.
_UNREAD_PAGES = frozenset({"cover", "toc", "landmarks", "page-list", "copyright-page", "index", "loi", "lot"})
_NOTES = frozenset({"footnote", "footnotes", "endnote", "endnotes", "rearnote", "rearnotes", "note"})
_SKIPPED_TYPES = _UNREAD_PAGES | _NOTES | {"noteref", "pagebreak"}
_SKIPPED_ROLES = frozenset({
    "doc-footnote", "doc-endnote", "doc-endnotes", "doc-noteref", "doc-backlink", "doc-pagebreak",
    "doc-toc", "doc-pagelist", "doc-index",
})
_SKIPPED_CLASSES = re.compile(r"^(page[-_]?(num|number|no)s?|noteref|footnote-ref|fnref)$", re.IGNORECASE)
_SKIPPED_TAGS = frozenset({
    "head", "script", "style", "template", "noscript", "nav", "aside", "svg", "math", "rt", "rp",
    "audio", "video", "iframe", "object", "button", "select", "textarea",
})
_HEADINGS = frozenset({"h1", "h2", "h3", "h4", "h5", "h6"})
_BLOCKS = _HEADINGS | {
    "address", "article", "blockquote", "body", "caption", "dd", "details", "dialog", "div", "dl", "dt",
    "fieldset", "figcaption", "figure", "footer", "form", "header", "hgroup", "hr", "li", "main", "ol", "p",
    "pre", "section", "summary", "table", "tbody", "td", "tfoot", "th", "thead", "tr", "ul",
}
# Titles of pages that are not read, for books that do not mark them otherwise.
_UNREAD_TITLE = re.compile(
    r"^\s*(cover|(table\s+of\s+)?contents|copyright(\s+page)?|(foot|end)?notes|index)\s*$", re.IGNORECASE
)


@dataclass(frozen=True)
class _Block:
    text: str
    heading: bool


@dataclass
class _Document:
    name: str
    title: str
    blocks: list[_Block]
    anchors: dict[str, int]  # element id -> index of the first block at or after it


@dataclass(frozen=True)
class _Cut:
    """Where a section starts: a document and a block in it. A cut without a title is named after
    its first heading; `entry` marks the cuts that are the book's own divisions (a TOC entry, a
    spine document, a heading found by --chapter-pattern)."""

    doc: int
    block: int
    title: str = ""
    entry: bool = True

    @property
    def at(self) -> tuple[int, int]:
        return self.doc, self.block


@dataclass
class _Marks:
    """What the landmarks and the guide say: the pages left unread, and where the body starts."""

    unread_docs: set[str] = field(default_factory=set)
    unread_ids: dict[str, set[str]] = field(default_factory=dict)
    bodymatter: str | None = None


def read_epub(path: Path, pattern: str | None = None) -> Book:
    """The book's sections in reading order, split at its table of contents (or at headings matching
    `pattern`), with where its body starts, its title (album), creators (artist) and cover."""
    chapter_heading = compile_pattern(pattern) if pattern is not None else None
    book = _open(path)
    nav = next((item for item in book.get_items() if isinstance(item, epub.EpubNav)), None)
    marks = _marks(book, nav)
    docs: list[_Document] = []
    positions: dict[str, int | None] = {}  # spine document -> index in docs; None: never read
    for idref, linear in book.spine:
        item = book.get_item_with_id(idref)
        if item is None or item.media_type not in _DOCUMENT_TYPES:
            continue
        name = posixpath.normpath(item.file_name)
        if linear == "no" or isinstance(item, epub.EpubNav | epub.EpubCoverHtml) or name in marks.unread_docs:
            positions.setdefault(name, None)
        elif name not in positions:
            # The bytes in the book: ebooklib's get_content() would rebuild the page as it writes one.
            positions[name] = len(docs)
            docs.append(_document(name, item.content or b"", marks.unread_ids.get(name, set())))

    bodymatter: tuple[int, int] | None = None
    if chapter_heading is not None:
        cuts = _pattern_cuts(docs, chapter_heading)
    else:
        bases = [posixpath.dirname(item.file_name) for item in book.get_items_of_type(ebooklib.ITEM_NAVIGATION)]
        toc = book.toc if isinstance(book.toc, list) else [book.toc]  # an NCX without entries reads as one Link
        cuts = [cut for href, title in _toc_entries(toc)
                if (cut := _cut(href, docs, positions, bases, " ".join(title.split()))) is not None]
        cuts = cuts or [_Cut(d, 0) for d in range(len(docs))]
        if marks.bodymatter is not None and (start := _cut(marks.bodymatter, docs, positions, [], "")):
            bodymatter = start.at
            cuts.append(_Cut(start.doc, start.block, entry=False))
    sections = _sections(docs, cuts)
    body = _body(sections, bodymatter, by_title=chapter_heading is None)
    album, artist = _metadata(book)
    return Book([section for _, section in sections], body, album=album, artist=artist, cover=_cover(book))


def _open(path: Path) -> Any:
    """The book as ebooklib reads it. Its table of contents comes from the nav document when there is
    one; a nav without a table of contents in it is passed over for the NCX."""
    failure: Exception | None = None
    for ignore_ncx in (True, False):
        try:
            return epub.read_epub(str(path), {"ignore_ncx": ignore_ncx})
        except Exception as exc:  # ebooklib raises what its parsers meet in a damaged book
            failure = failure or exc
    reason = failure.msg if isinstance(failure, epub.EpubException) else failure
    raise UsageError(f"cannot read {path} as an EPUB: {reason}")


def _toc_entries(toc: Iterable[Any]) -> Iterator[tuple[str, str]]:
    """(href, title) of every entry of the table of contents, depth first: reading order."""
    for node in toc:
        if isinstance(node, tuple | list) and len(node) == 2:
            yield from _toc_entries([node[0]])
            yield from _toc_entries(node[1])
        elif isinstance(node, epub.Link | epub.Section) and node.href:
            yield str(node.href), str(node.title or "")
        elif isinstance(node, epub.EpubHtml):
            yield str(node.file_name), str(node.title or "")


def _cut(href: str, docs: list[_Document], positions: dict[str, int | None], bases: Sequence[str],
         title: str) -> _Cut | None:
    """Where `href` points among the documents read; None for a document not read. The href is
    relative to the package; an NCX's are relative to the NCX, tried next."""
    path, _, fragment = href.partition("#")
    if not path:
        return None
    for base in ("", *bases):
        name = posixpath.normpath(posixpath.join(base, unquote(path)))
        if name in positions:
            doc = positions[name]
            if doc is None:
                return None
            return _Cut(doc, docs[doc].anchors.get(unquote(fragment), 0) if fragment else 0, title)
    return None


def _pattern_cuts(docs: list[_Document], pattern: re.Pattern[str]) -> list[_Cut]:
    return [_Cut(d, b, block.text) for d, doc in enumerate(docs) for b, block in enumerate(doc.blocks)
            if block.heading and pattern.search(block.text)]


def _sections(docs: list[_Document], cuts: list[_Cut]) -> list[tuple[_Cut, Section]]:
    """The text between one cut and the next, each with its cut. At one place the last cut with a
    title wins (the chapter, not the part it opens); sections with no text, or titled as a page not
    read ("Contents"), are left out."""
    chosen: dict[tuple[int, int], _Cut] = {}
    for cut in cuts:
        if cut.title or cut.at not in chosen:
            chosen[cut.at] = cut
    ordered = sorted(chosen.values(), key=lambda c: c.at)
    if not ordered or ordered[0].at != (0, 0):
        ordered.insert(0, _Cut(0, 0, entry=False))
    sections: list[tuple[_Cut, Section]] = []
    for cut, end in zip(ordered, [*(c.at for c in ordered[1:]), (len(docs), 0)], strict=True):
        blocks = _between(docs, cut.at, end)
        if not blocks:
            continue
        title = cut.title or next((b.text for b in blocks if b.heading), "") or docs[cut.doc].title
        if _UNREAD_TITLE.match(title):
            continue
        spoken = [spoken_heading(b.text) if b.heading else b.text for b in blocks]
        if not blocks[0].heading and _words(blocks[0].text) == _words(title):
            spoken[0] = spoken_heading(blocks[0].text)  # a title set as a paragraph, not as a heading
        elif cut.title and not blocks[0].heading:
            spoken.insert(0, spoken_heading(cut.title))
        sections.append((cut, Section(title, "\n\n".join(spoken))))
    return sections


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.casefold())


def _between(docs: list[_Document], start: tuple[int, int], end: tuple[int, int]) -> list[_Block]:
    (first, lo), (last, hi) = start, end
    blocks: list[_Block] = []
    for d in range(first, min(last + 1, len(docs))):
        blocks.extend(docs[d].blocks[lo if d == first else 0:hi if d == last else None])
    return blocks


def _body(sections: list[tuple[_Cut, Section]], bodymatter: tuple[int, int] | None, by_title: bool) -> int:
    """Where the first chapter is: at the bodymatter landmark, else at the first entry titled as a
    chapter ("Chapter 1", "Part One"), else at the first entry."""
    if bodymatter is not None:
        found = next((i for i, (cut, _) in enumerate(sections) if cut.at >= bodymatter), None)
        if found is not None:
            return found
    entries = [i for i, (cut, _) in enumerate(sections) if cut.entry]
    if by_title:
        found = next((i for i in entries if CHAPTER_TITLE.match(sections[i][1].title)), None)
        if found is not None:
            return found
    return entries[0] if entries else 0


def _document(name: str, content: bytes, unread_ids: set[str]) -> _Document:
    root = _tree(content)
    if root is None:
        return _Document(name, "", [], {})
    reader = _Reader(unread_ids)
    reader.walk(root)
    reader.flush()
    title = next((" ".join("".join(el.itertext()).split()) for el in root.iter() if _tag(el) == "title"), "")
    return _Document(name, title, reader.blocks, reader.anchors)


def _tree(content: bytes) -> Any:
    """XHTML as XML; a document that is not well-formed XML (HTML entities, stray ampersands) as HTML."""
    if not content.strip():
        return None
    try:
        return etree.fromstring(content, etree.XMLParser(resolve_entities="internal", no_network=True))
    except etree.XMLSyntaxError:
        pass
    try:
        return lxml.html.document_fromstring(content)
    except etree.ParserError:
        return None


def _tag(el: Any) -> str | None:
    """The element's name without namespace or prefix ("{...xhtml}p", "p", "epub:switch" as "switch");
    None for a comment or processing instruction."""
    return el.tag.rpartition("}")[2].rpartition(":")[2].lower() if isinstance(el.tag, str) else None


def _types(el: Any) -> set[str]:
    return set((el.get(_EPUB_TYPE) or el.get("epub:type") or "").split())


class _Reader:
    """Walks a document's tree into blocks of plain text, recording where each element id falls."""

    def __init__(self, unread_ids: set[str]) -> None:
        self.blocks: list[_Block] = []
        self.anchors: dict[str, int] = {}
        self.unread_ids = unread_ids
        self._parts: list[str | None] = []  # text, and None for a line break
        self._headings = 0

    def walk(self, el: Any) -> None:
        tag = _tag(el)
        if tag is not None:
            heading = tag in _HEADINGS or el.get("role") == "heading"
            if tag in _BLOCKS or heading:
                self.flush()
            if self._unread(el, tag):
                for inner in el.iter():
                    self._anchor(inner)
            elif tag == "br":
                self._anchor(el)
                self._parts.append(None)
            else:
                self._anchor(el)
                self._headings += heading
                if el.text:
                    self._parts.append(el.text)
                for child in el:
                    self.walk(child)
                if tag in _BLOCKS or heading:
                    self.flush()
                self._headings -= heading
        if el.tail:
            self._parts.append(el.tail)

    def flush(self) -> None:
        lines: list[str] = []
        line: list[str] = []
        for part in [*self._parts, None]:
            if part is None:
                lines.append(" ".join("".join(line).split()))
                line = []
            else:
                line.append(part)
        self._parts = []
        text = "\n".join(line for line in lines if line)
        if text:
            self.blocks.append(_Block(text, self._headings > 0))

    def _anchor(self, el: Any) -> None:
        for name in (el.get("id"), el.get("name") if _tag(el) == "a" else None):
            if name:
                self.anchors.setdefault(name, len(self.blocks))

    def _unread(self, el: Any, tag: str) -> bool:
        if tag in _SKIPPED_TAGS or el.get("hidden") is not None or el.get("id") in self.unread_ids:
            return True
        if _types(el) & _SKIPPED_TYPES or set((el.get("role") or "").split()) & _SKIPPED_ROLES:
            return True
        if any(_SKIPPED_CLASSES.match(name) for name in (el.get("class") or "").split()):
            return True
        if tag == "sup":  # a note's number, linked to the note
            return any(_tag(inner) == "a" and inner.get("href") for inner in el.iterdescendants())
        if tag == "a" and el.get("href") and len(el) and not (el.text or "").strip():
            return all(_tag(child) == "sup" and not (child.tail or "").strip() for child in el)
        return False


def _marks(book: Any, nav: Any) -> _Marks:
    """The EPUB 3 landmarks (in the nav document) and the EPUB 2 guide."""
    marks = _Marks()
    targets: list[tuple[str, set[str]]] = [(str(ref.get("href") or ""), {str(ref.get("type") or "")})
                                           for ref in book.guide]
    root = _tree(nav.content or b"") if nav is not None else None
    if root is not None:
        base = posixpath.dirname(nav.file_name)
        for landmarks in (el for el in root.iter() if _tag(el) == "nav" and "landmarks" in _types(el)):
            for link in (el for el in landmarks.iter() if _tag(el) == "a" and el.get("href")):
                targets.append((posixpath.join(base, str(link.get("href"))), _types(link)))
    for href, kinds in targets:
        path, _, fragment = href.partition("#")
        if not path:
            continue
        name = posixpath.normpath(unquote(path))
        if "bodymatter" in kinds and marks.bodymatter is None:
            marks.bodymatter = href
        if kinds & _UNREAD_PAGES:
            if fragment:
                marks.unread_ids.setdefault(name, set()).add(unquote(fragment))
            else:
                marks.unread_docs.add(name)
    return marks


def _metadata(book: Any) -> tuple[str | None, str | None]:
    """The book's title and its creators, as album and artist."""
    titles = [" ".join(str(value).split()) for value, _ in book.get_metadata("DC", "title") if value]
    creators = [" ".join(str(value).split()) for value, _ in book.get_metadata("DC", "creator") if value]
    creators = [name for name in dict.fromkeys(creators) if name]
    return next((t for t in titles if t), None), ", ".join(creators) or None


def _cover(book: Any) -> Cover | None:
    """The EPUB 3 cover-image, else the image an EPUB 2 <meta name="cover"> names."""
    candidates = list(book.get_items_of_type(ebooklib.ITEM_COVER))
    for _, attributes in [*book.get_metadata("OPF", "cover"), *book.get_metadata("OPF", "meta")]:
        if (attributes or {}).get("name") == "cover" and (ref := attributes.get("content")):
            candidates.append(book.get_item_with_id(ref) or book.get_item_with_href(ref))
    for item in candidates:
        if item is None or not str(item.media_type or "").startswith("image/"):
            continue
        data = item.get_content()
        if data:
            suffix = mimetypes.guess_extension(item.media_type) or PurePosixPath(item.file_name).suffix.lower()
            return Cover(bytes(data), suffix or ".img")
    return None
