"""`batchtts manifest from-text BOOK.epub`: EPUB 2 and 3 books, built here with ebooklib, read back
through the CLI into a chapter manifest, which is read with the csv module; covers with PyAV.

`sample_manifests/book.epub` is made by `write_sample_book` from `sample_manifests/book.md`:

    python -c "import sys; sys.path.insert(0, 'tests'); import test_epub as t; t.write_sample_book(t.SAMPLE_EPUB)"
"""

from __future__ import annotations

import csv
import datetime
import posixpath
import re
import tempfile
import zipfile
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

import av
import numpy as np
from conftest import SAMPLES, cli
from ebooklib import epub
from hypothesis import given
from hypothesis import strategies as st

SAMPLE_EPUB = SAMPLES / "book.epub"
XHTML = """<?xml version="1.0" encoding="utf-8"?>
<!DOCTYPE html>
<html xmlns="http://www.w3.org/1999/xhtml" xmlns:epub="http://www.idpf.org/2007/ops" lang="en" xml:lang="en">
<head><title>{title}</title><style>p {{ text-indent: 1em; }}</style></head>
<body{body_type}>
{body}
</body>
</html>
"""


def png(width: int = 48, height: int = 64) -> bytes:
    """A cover: a night sky over a sea, with a lighthouse and its beam, as a PNG encoded by PyAV."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[..., 2] = 90 + (y * 120 // height)
    rgb[..., 1] = 20 + (y * 40 // height)
    sea = y > height * 3 // 4
    rgb[sea] = (10, 40, 80)
    tower = (abs(x - width // 3) < max(2, width // 16)) & (y > height // 3) & ~sea
    rgb[tower] = (235, 235, 225)
    beam = (x > width // 3) & (abs(y - height // 3 - (x - width // 3) // 4) < 2 + (x - width // 3) // 8)
    rgb[beam] = (250, 230, 140)
    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = width, height, "rgb24"
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
    return b"".join(bytes(packet) for packet in [*codec.encode(frame), *codec.encode(None)])


@dataclass
class Page:
    name: str  # inside the package folder, e.g. "text/ch1.xhtml"
    body: str
    title: str = ""
    body_type: str = ""  # epub:type of <body>
    linear: bool = True


@dataclass
class Spec:
    pages: list[Page]
    toc: list[tuple[str, str]]  # (href, title)
    title: str = "The Keeper of Gull Point"
    authors: tuple[str, ...] = ("Ada Quill",)
    cover: bytes | None = None
    nav: bool = True  # an EPUB 3 nav document (in the spine, as many books have it)
    epub2: bool = False  # version 2.0, NCX only, the cover named by <meta name="cover">
    guide: list[dict[str, str]] = field(default_factory=list)  # EPUB 2 guide, written as EPUB 3 landmarks too
    ncx: str = "toc.ncx"  # where the NCX is, in the package folder: its links are relative to it


def write_epub(path: Path, spec: Spec) -> Path:
    book = epub.EpubBook()
    book.set_identifier("urn:uuid:7d0a1b5e-batchtts-test")
    book.set_title(spec.title)
    book.set_language("en")
    for i, author in enumerate(spec.authors):
        book.add_author(author, uid=f"creator{i}")
    items = {}
    for n, page in enumerate(spec.pages):
        body_type = f' epub:type="{page.body_type}"' if page.body_type else ""
        content = XHTML.format(title=escape(page.title), body_type=body_type, body=page.body)
        item = epub.EpubItem(uid=f"page{n}", file_name=page.name, media_type="application/xhtml+xml",
                             content=content.encode())
        book.add_item(item)
        items[page.name] = item
    if spec.cover is not None:
        if spec.epub2:
            book.add_item(epub.EpubImage(uid="cover-png", file_name="images/cover.png", media_type="image/png",
                                         content=spec.cover))
            book.add_metadata(None, "meta", "", {"name": "cover", "content": "cover-png"})
        else:
            book.set_cover("images/cover.png", spec.cover, create_page=False)
    ncx_folder = posixpath.dirname(spec.ncx)
    if spec.epub2:  # ebooklib writes the NCX's links as given
        book.toc = [epub.Link(posixpath.relpath(href, ncx_folder or "."), title, f"toc{i}")
                    for i, (href, title) in enumerate(spec.toc)]
    else:
        book.toc = [epub.Link(href, title, f"toc{i}") for i, (href, title) in enumerate(spec.toc)]
    book.add_item(epub.EpubNcx(file_name=spec.ncx))
    spine: list = []
    if spec.nav and not spec.epub2:
        nav = epub.EpubNav()
        book.add_item(nav)
        spine.append(nav)
    spine += [items[p.name] if p.linear else (items[p.name], "no") for p in spec.pages]
    book.spine = spine
    book.guide = spec.guide
    epub.write_epub(str(path), book, {"mtime": datetime.datetime(2024, 1, 1), "raise_exceptions": True})
    if spec.epub2:
        _rewrite(path, "EPUB/content.opf", lambda opf: opf.replace(b'version="3.0"', b'version="2.0"', 1))
    return path


def _rewrite(path: Path, name: str, change) -> None:
    with zipfile.ZipFile(path) as old:
        entries = [(info, old.read(info)) for info in old.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as new:
        for info, data in entries:
            new.writestr(info, change(data) if info.filename == name else data)


def rows_of(manifest: Path) -> list[dict[str, str]]:
    with open(manifest, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def words(text: str) -> str:
    return " ".join(text.split())


def front_and_three_chapters(cover: bytes | None = None, **changes) -> Spec:
    """A cover page, the nav, a title page, a dedication, a table of contents page, a copyright page,
    three chapters (a footnote, an endnote, page numbers, a script; the second with an HTML entity,
    which XML does not know; the third titled by a paragraph, not a heading) and the endnotes: EPUB 3
    with an NCX too."""
    pages = [
        Page("text/cover.xhtml", '<img src="../images/cover.png" alt="Cover"/>', "Cover", body_type="cover"),
        Page("text/title.xhtml", '<section epub:type="titlepage"><h1>The Keeper of Gull Point</h1>'
             "<p>A short story in three chapters.</p></section>", "Title Page"),
        Page("text/dedication.xhtml", '<section epub:type="dedication"><p>For everyone who keeps a light.</p>'
             "</section>", "Dedication"),
        Page("text/contents.xhtml", "<h2>Contents</h2><ul><li>Chapter 1: The Lamp</li><li>Chapter 2: The Fog</li>"
             "</ul>", "Contents"),
        Page("text/legal.xhtml", "<p>Copyright 2024 Ada Quill. All rights reserved.</p>", "Legal",
             body_type="copyright-page"),
        Page("text/ch1.xhtml", '<section epub:type="chapter"><h2>Chapter 1: The Lamp</h2>'
             "<p>The lighthouse at Gull Point had been lit every night for a hundred years, before the"
             '<span epub:type="pagebreak" id="page7" title="7">7</span> storm came.</p>'
             '<p>She climbed the steps at dusk.<span class="pagenum" id="p8">[p. 8]</span> The lens'
             '<span role="doc-pagebreak" id="page9">9</span> shone.</p>'
             "<aside><p>Lamp oil cost a shilling a gallon.</p></aside>"
             "<script>document.write('never read');</script></section>", "Chapter 1"),
        Page("text/map.xhtml", "<p>A map of the point, shown beside the text.</p>", "Map", linear=False),
        Page("text/ch2.xhtml", "<h2>Chapter 2: The Fog</h2>"
             '<p>The fog came in thick as&nbsp;wool<a epub:type="noteref" href="#fn1" id="r1">1</a>.</p>'
             '<p>The horn stopped<sup><a href="notes.xhtml#en1" id="r2">2</a></sup> at half past eight.</p>'
             '<p>Mara heard the silence<a role="doc-noteref" href="#fn3" id="r3">3</a>.</p>'
             '<aside epub:type="footnote" id="fn1"><p>Wool from the sheep of the point.</p></aside>'
             '<div role="doc-footnote" id="fn3"><p>A silence louder than the horn.</p></div>', "Chapter 2"),
        Page("text/ch3.xhtml", '<p class="chapter-title">Chapter 3: <i>The Ledger</i></p><p>Years later a woman '
             "knocked on her door.<br/>She had a parcel.</p><p>Then Mara put the kettle on.</p>",
             "Chapter 3: The Ledger"),
        Page("text/notes.xhtml", '<section epub:type="endnotes" role="doc-endnotes"><h2>Notes</h2><ol>'
             '<li id="en1" epub:type="endnote"><p>A belt had snapped in the engine room.</p></li></ol></section>',
             "Notes"),
    ]
    toc = [("text/title.xhtml", "Title Page"), ("text/dedication.xhtml", "Dedication"),
           ("text/contents.xhtml", "Contents"), ("text/legal.xhtml", "Legal notice"),
           ("text/ch1.xhtml", "Chapter 1: The Lamp"),
           ("text/ch2.xhtml", "Chapter 2: The Fog"), ("text/ch3.xhtml", "Chapter 3: The Ledger"),
           ("text/notes.xhtml", "Notes")]
    spec = Spec(pages, toc, cover=cover)
    for name, value in changes.items():
        setattr(spec, name, value)
    return spec


def test_an_epub3_book_is_one_row_a_chapter_with_front_matter_as_track_0(tmp_path):
    cover = png()
    book = write_epub(tmp_path / "book.epub", front_and_three_chapters(cover, authors=("Ada Quill", "Tom Quill")))
    result = cli("manifest", "from-text", book, "--out", tmp_path / "out" / "chapters.csv", key=None)
    assert result.returncode == 0, result.stderr
    rows = rows_of(tmp_path / "out" / "chapters.csv")
    assert [r["id"] for r in rows] == ["chapter-00", "chapter-01", "chapter-02", "chapter-03"]
    assert [r["track"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["title"] for r in rows] == ["Front matter", "Chapter 1: The Lamp", "Chapter 2: The Fog",
                                          "Chapter 3: The Ledger"]
    assert {r["album"] for r in rows} == {"The Keeper of Gull Point"}
    assert {r["artist"] for r in rows} == {"Ada Quill, Tom Quill"}

    front, lamp, fog, ledger = (r["text"] for r in rows)
    assert front == ("The Keeper of Gull Point.\n\nA short story in three chapters.\n\n"
                     "Dedication.\n\nFor everyone who keeps a light.")
    assert lamp == ("Chapter 1: The Lamp.\n\nThe lighthouse at Gull Point had been lit every night for a hundred "
                    "years, before the storm came.\n\nShe climbed the steps at dusk. The lens shone.")
    assert fog == ("Chapter 2: The Fog.\n\nThe fog came in thick as wool.\n\nThe horn stopped at half past eight."
                   "\n\nMara heard the silence.")
    assert ledger == "Chapter 3: The Ledger.\n\nYears later a woman knocked on her door.\nShe had a parcel.\n\n" \
                     "Then Mara put the kettle on."
    everything = "\n".join(r["text"] for r in rows)
    for unread in ("Cover", "Copyright", "Contents", "never read", "Wool from", "louder", "belt had snapped", "Notes",
                   "shilling", "map", "7", "8", "9"):
        assert unread not in everything

    # The cover, beside the manifest and named in every row relative to it: the book's own bytes.
    assert {r["cover"] for r in rows} == {"chapters-cover.png"}
    written = tmp_path / "out" / "chapters-cover.png"
    assert written.read_bytes() == cover
    with av.open(str(written)) as image:
        frame = next(image.decode(video=0))
    assert (frame.width, frame.height) == (48, 64)
    assert "wrote the cover to" in result.stdout and "  0  " in result.stdout


def test_no_front_matter_leaves_it_out_and_keeps_the_chapter_numbers(tmp_path):
    book = write_epub(tmp_path / "book.epub", front_and_three_chapters())
    result = cli("manifest", "from-text", book, "-o", tmp_path / "c.csv", "--no-front-matter", key=None)
    assert result.returncode == 0, result.stderr
    rows = rows_of(tmp_path / "c.csv")
    assert [(r["id"], r["track"]) for r in rows] == [("chapter-01", "1"), ("chapter-02", "2"), ("chapter-03", "3")]
    assert "cover" not in rows[0] and not list(tmp_path.glob("*cover*"))


def test_the_bodymatter_landmark_says_where_the_body_starts(tmp_path):
    spec = front_and_three_chapters()
    spec.pages.insert(4, Page("text/intro.xhtml", "<h2>Introduction</h2><p>How the light was kept.</p>"))
    spec.toc.insert(3, ("text/intro.xhtml", "Introduction"))
    without = write_epub(tmp_path / "plain.epub", spec)
    spec.guide = [{"type": "text", "href": "text/intro.xhtml", "title": "Begin"},
                  {"type": "copyright-page", "href": "text/dedication.xhtml", "title": "Not read either"}]
    marked = write_epub(tmp_path / "marked.epub", spec)
    assert "bodymatter" in zipfile.ZipFile(marked).read("EPUB/nav.xhtml").decode()

    assert cli("manifest", "from-text", without, "-o", tmp_path / "a.csv", key=None).returncode == 0
    assert cli("manifest", "from-text", marked, "-o", tmp_path / "b.csv", key=None).returncode == 0
    plain, landmarked = rows_of(tmp_path / "a.csv"), rows_of(tmp_path / "b.csv")
    # Without landmarks the body starts at the first TOC entry titled as a chapter.
    assert [(r["track"], r["title"]) for r in plain] == [
        ("0", "Front matter"), ("1", "Chapter 1: The Lamp"), ("2", "Chapter 2: The Fog"), ("3", "Chapter 3: The Ledger")]
    assert plain[0]["text"].endswith("Introduction.\n\nHow the light was kept.")
    assert [(r["track"], r["title"]) for r in landmarked] == [
        ("0", "Title Page"), ("1", "Introduction"), ("2", "Chapter 1: The Lamp"),
        ("3", "Chapter 2: The Fog"), ("4", "Chapter 3: The Ledger")]
    assert "For everyone" not in "".join(r["text"] for r in landmarked)


def test_an_epub2_book_with_only_an_ncx_and_a_meta_cover(tmp_path):
    cover = png(30, 40)
    spec = front_and_three_chapters(cover, epub2=True, authors=("Ada Quill",), ncx="nav/toc.ncx")
    book = write_epub(tmp_path / "two.epub", spec)
    assert '<content src="../text/ch1.xhtml"/>' in zipfile.ZipFile(book).read("EPUB/nav/toc.ncx").decode()
    opf = zipfile.ZipFile(book).read("EPUB/content.opf").decode()
    assert 'version="2.0"' in opf and "nav.xhtml" not in opf and "cover-image" not in opf
    assert cli("manifest", "from-text", book, "-o", tmp_path / "book.csv", key=None).returncode == 0
    rows = rows_of(tmp_path / "book.csv")
    assert [(r["track"], r["title"]) for r in rows] == [
        ("0", "Front matter"), ("1", "Chapter 1: The Lamp"), ("2", "Chapter 2: The Fog"), ("3", "Chapter 3: The Ledger")]
    assert rows[0]["text"] == ("The Keeper of Gull Point.\n\nA short story in three chapters.\n\n"
                               "Dedication.\n\nFor everyone who keeps a light.")  # the NCX's title for the dedication
    assert rows[2]["text"].startswith("Chapter 2: The Fog.\n\nThe fog came in thick as wool.\n\nThe horn stopped at")
    assert {r["artist"] for r in rows} == {"Ada Quill"} and {r["cover"] for r in rows} == {"book-cover.png"}
    assert (tmp_path / "book-cover.png").read_bytes() == cover


def test_without_a_usable_toc_each_spine_document_is_a_chapter_titled_by_its_heading(tmp_path):
    spec = front_and_three_chapters(toc=[], nav=False)
    book = write_epub(tmp_path / "spine.epub", spec)
    assert cli("manifest", "from-text", book, "-o", tmp_path / "c.csv", key=None).returncode == 0
    rows = rows_of(tmp_path / "c.csv")
    assert [(r["track"], r["title"]) for r in rows] == [
        ("0", "Front matter"), ("1", "Chapter 1: The Lamp"), ("2", "Chapter 2: The Fog"), ("3", "Chapter 3: The Ledger")]
    # No TOC title to add: the document's own heading is spoken, once.
    assert rows[1]["text"].startswith("Chapter 1: The Lamp.\n\nThe lighthouse")
    assert rows[1]["text"].count("The Lamp") == 1
    assert rows[0]["text"] == "The Keeper of Gull Point.\n\nA short story in three chapters.\n\nFor everyone who keeps a light."


def test_chapters_that_share_a_document_are_split_at_the_toc_fragments(tmp_path):
    body = ('<h1 id="part1">Part One: The Point</h1><p>The point is a spit of rock.</p>'
            '<section id="c1"><h2>The Lamp</h2><p>Lit every night.</p></section>'
            '<section><h2 id="c2">The Fog</h2><p>Thick as wool.</p><p>The horn stopped.</p></section>'
            '<p><a id="c3"/>Not a heading, but the third chapter starts here.</p><p>The end.</p>')
    spec = Spec([Page("text/all.xhtml", body, "All"), Page("text/after.xhtml", "<p>Still chapter three.</p>")],
                [("text/all.xhtml", "The Point"), ("text/all.xhtml#part1", "Part One"), ("text/all.xhtml#c1", "Chapter 1"),
                 ("text/all.xhtml#c2", "Chapter 2"), ("text/all.xhtml#c3", "Chapter 3: Endings")])
    book = write_epub(tmp_path / "shared.epub", spec)
    assert cli("manifest", "from-text", book, "-o", tmp_path / "c.csv", key=None).returncode == 0
    rows = rows_of(tmp_path / "c.csv")
    # "Part One" names a part, so the body starts there; each TOC entry is a row, and of two entries at
    # one place the later (deeper) one.
    assert [(r["track"], r["title"]) for r in rows] == [
        ("1", "Part One"), ("2", "Chapter 1"), ("3", "Chapter 2"), ("4", "Chapter 3: Endings")]
    assert [r["text"] for r in rows] == [
        "Part One: The Point.\n\nThe point is a spit of rock.",
        "The Lamp.\n\nLit every night.",
        "The Fog.\n\nThick as wool.\n\nThe horn stopped.",
        # A chapter whose text does not open with a heading is introduced by its TOC title.
        "Chapter 3: Endings.\n\nNot a heading, but the third chapter starts here.\n\nThe end.\n\nStill chapter three.",
    ]


def test_chapter_pattern_splits_an_epub_at_matching_headings_spoken_without_markup(tmp_path):
    body = ("<h1>A Book</h1><p>By nobody.</p>"
            "<h2>CHAPTER <em>I</em></h2><p>One.</p><h3>A scene</h3><p>More of one.</p>"
            '<h2><span class="num">CHAPTER</span> <b>II</b>.</h2><p>Two.</p>')
    spec = Spec([Page("text/one.xhtml", body), Page("text/two.xhtml", "<h2>CHAPTER III</h2><p>Three.</p>")],
                [("text/one.xhtml", "The whole book")])
    book = write_epub(tmp_path / "p.epub", spec)
    args = ("manifest", "from-text", book, "-o", tmp_path / "c.csv", "--chapter-pattern", r"^CHAPTER [IVX]+\b")
    assert cli(*args, key=None).returncode == 0
    rows = rows_of(tmp_path / "c.csv")
    assert [(r["track"], r["title"]) for r in rows] == [
        ("0", "A Book"), ("1", "CHAPTER I"), ("2", "CHAPTER II."), ("3", "CHAPTER III")]
    assert [r["text"] for r in rows] == [
        "A Book.\n\nBy nobody.", "CHAPTER I.\n\nOne.\n\nA scene.\n\nMore of one.", "CHAPTER II.\n\nTwo.",
        "CHAPTER III.\n\nThree."]
    bad = cli("manifest", "from-text", book, "-o", tmp_path / "d.csv", "--chapter-pattern", "(", key=None)
    assert bad.returncode == 2 and "bad --chapter-pattern" in bad.stderr and not (tmp_path / "d.csv").exists()


def test_an_existing_manifest_or_cover_is_kept_without_force(tmp_path):
    book = write_epub(tmp_path / "book.epub", front_and_three_chapters(png()))
    markdown = tmp_path / "book.md"
    markdown.write_text("## Chapter 1\n\nOne.\n")
    for source in (book, markdown):
        out = tmp_path / f"{source.suffix[1:]}.csv"
        out.write_text("kept\n")
        refused = cli("manifest", "from-text", source, "-o", out, key=None)
        assert refused.returncode == 2, refused.stderr
        assert f"{out} exists: pass --force to overwrite it" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr
        assert out.read_text() == "kept\n"
        assert cli("manifest", "from-text", source, "-o", out, "--force", key=None).returncode == 0
        assert rows_of(out)[0]["id"] == {".epub": "chapter-00", ".md": "chapter-01"}[source.suffix]
    # The cover beside the manifest is kept too: the manifest is written only with --force.
    (tmp_path / "epub.csv").unlink()
    refused = cli("manifest", "from-text", book, "-o", tmp_path / "epub.csv", key=None)
    assert refused.returncode == 2 and "epub-cover.png exists" in refused.stderr
    assert not (tmp_path / "epub.csv").exists()


def test_a_damaged_epub_is_a_one_line_error(tmp_path):
    book = tmp_path / "broken.epub"
    book.write_bytes(b"PK\x03\x04 not really a zip")
    result = cli("manifest", "from-text", book, "-o", tmp_path / "c.csv", key=None)
    assert result.returncode == 2 and "cannot read" in result.stderr and "as an EPUB" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "c.csv").exists()


def test_markdown_and_text_books_number_front_matter_as_epubs_do(tmp_path):
    book = tmp_path / "book.md"
    book.write_text("# The Book\n\nBy someone.\n\n## Preface\n\nWhy.\n\n## Chapter 1\n\nOne.\n\n## Chapter 2\n\nTwo.\n")
    assert cli("manifest", "from-text", book, "-o", tmp_path / "m.csv", key=None).returncode == 0
    rows = rows_of(tmp_path / "m.csv")
    assert [(r["id"], r["track"], r["title"]) for r in rows] == [
        ("chapter-00", "0", "Front matter"), ("chapter-01", "1", "Chapter 1"), ("chapter-02", "2", "Chapter 2")]
    assert rows[0]["text"] == "The Book.\n\nBy someone.\n\nPreface.\n\nWhy."
    assert cli("manifest", "from-text", book, "-o", tmp_path / "n.csv", "--no-front-matter", key=None).returncode == 0
    assert [r["track"] for r in rows_of(tmp_path / "n.csv")] == ["1", "2"]

    plain = tmp_path / "novel.txt"
    plain.write_text("It was a dark night.\n")
    assert cli("manifest", "from-text", plain, "-o", tmp_path / "t.csv", key=None).returncode == 0
    assert [(r["track"], r["title"]) for r in rows_of(tmp_path / "t.csv")] == [("1", "novel")]


def test_the_sample_epub_reads_as_the_sample_markdown_book(tmp_path):
    assert SAMPLE_EPUB.stat().st_size < 60_000
    with zipfile.ZipFile(SAMPLE_EPUB) as z:
        names = z.namelist()
        assert names[0] == "mimetype" and "EPUB/nav.xhtml" in names and "EPUB/toc.ncx" in names
        assert 'epub:type="noteref"' in z.read("EPUB/text/chapter2.xhtml").decode()
    assert cli("manifest", "from-text", SAMPLE_EPUB, "-o", tmp_path / "e.csv", key=None).returncode == 0
    assert cli("manifest", "from-text", SAMPLES / "book.md", "-o", tmp_path / "m.csv", key=None).returncode == 0
    from_epub, from_markdown = rows_of(tmp_path / "e.csv"), rows_of(tmp_path / "m.csv")
    assert [(r["id"], r["track"], r["title"]) for r in from_epub] == [
        (r["id"], r["track"], r["title"] if r["track"] != "0" else "Title Page") for r in from_markdown]
    assert [r["text"] for r in from_epub] == [r["text"] for r in from_markdown]
    assert {(r["album"], r["artist"], r["cover"]) for r in from_epub} == {("The Keeper of Gull Point", "batchtts", "e-cover.png")}
    with av.open(str(tmp_path / "e-cover.png")) as image:
        assert next(image.decode(video=0)).width > 0


def write_sample_book(path: Path) -> Path:
    """sample_manifests/book.epub: book.md's chapters, a title page, a cover, a nav, an NCX and one
    footnote (in chapter 2, not read aloud)."""
    source = (SAMPLES / "book.md").read_text(encoding="utf-8")
    parts = re.split(r"^## (.+)$", source, flags=re.MULTILINE)
    head, chapters = parts[0], list(zip(parts[1::2], parts[2::2], strict=True))
    title = re.search(r"^# (.+)$", head, re.MULTILINE).group(1)
    blurb = head.split("\n", 1)[1].strip()

    def paragraphs(text: str) -> str:
        return "".join(f"<p>{escape(p.strip())}</p>\n" for p in text.split("\n\n") if p.strip())

    pages = [Page("text/title.xhtml", f'<section epub:type="titlepage"><h1>{escape(title)}</h1>\n{paragraphs(blurb)}'
                  "</section>", "Title Page")]
    for n, (heading, text) in enumerate(chapters, start=1):
        body = f'<section epub:type="chapter" role="doc-chapter"><h2>{escape(heading)}</h2>\n{paragraphs(text)}</section>'
        if n == 2:
            body = body.replace("the compressor lived.", 'the compressor lived.<a epub:type="noteref" '
                                'role="doc-noteref" href="#fn1" id="ref1">1</a>', 1)
            body += ('\n<aside epub:type="footnote" role="doc-footnote" id="fn1"><p>The compressor filled the '
                     "horn's air tanks; the Board replaced it with an electric one in 1962.</p></aside>")
        pages.append(Page(f"text/chapter{n}.xhtml", body, heading))
    toc = [(p.name, p.title) for p in pages]
    spec = Spec(pages, toc, title=title, authors=("batchtts",), cover=png(200, 300),
                guide=[{"type": "text", "href": "text/chapter1.xhtml", "title": "Start"}])
    return write_epub(path, spec)


ALL_XML_TEXT = st.characters(codec="utf-8").filter(
    lambda c: c in "\t\n\r" or " " <= c <= "\ud7ff" or "\ue000" <= c <= "\ufffd" or c >= "\U00010000")


@given(st.text(ALL_XML_TEXT, min_size=1).filter(lambda t: t.strip()))
def test_any_paragraph_text_comes_back_in_its_chapter(text):
    with tempfile.TemporaryDirectory() as folder:
        spec = Spec([Page("text/ch.xhtml", f"<h2>Chapter 1</h2><p>{escape(text, quote=False)}</p>")],
                    [("text/ch.xhtml", "Chapter 1")])
        book = write_epub(Path(folder) / "b.epub", spec)
        result = cli("manifest", "from-text", book, "-o", Path(folder) / "c.csv", key=None)
        assert result.returncode == 0, result.stderr
        rows = rows_of(Path(folder) / "c.csv")
    assert [r["title"] for r in rows] == ["Chapter 1"]
    assert words(rows[0]["text"]) == words(f"Chapter 1. {text}")

