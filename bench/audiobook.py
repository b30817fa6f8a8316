"""A whole book, EPUB to mastered M4B, offline: what an audiobook maker waits for, step by step.

    python bench/audiobook.py                    # 100,000 words in 20 chapters, ACX mastering
    python bench/audiobook.py --words 20000 --master podcast

Builds an EPUB 3 with ebooklib (a title page, a cover, `--chapters` chapters of prose), then times
the commands a user runs, each in a process of its own:

    batchtts manifest from-text book.epub -o chapters.csv
    batchtts run chapters.csv --out out --model local/espeak-ng --voice fable --master acx
    batchtts audiobook out --to book.m4b
    batchtts qc out

Prints two tables: each step's wall time, CPU time (the step's process and its children), and speed
as a multiple of real time (hours of audio made or handled per hour of wall time, so the figure
reads the same on a faster or slower machine); then the QC table `batchtts qc` printed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
from ebooklib import epub

WORDS = (
    "the keeper lamp harbour ship night morning fog salt tide rope stair window light wind voice bay "
    "stone door table letter road town river field bell clock winter summer rain shadow hill garden "
    "quietly slowly again always never once under over across beside behind toward"
).split()
NAMES = ["Hale", "Mara", "Jonas", "Elsie", "the captain", "the doctor"]


def prose(words: int, seed: int) -> list[str]:
    """Paragraphs of plain sentences, some dialogue and numbers, about `words` words in all."""
    rng = random.Random(seed)
    paragraphs, count = [], 0
    while count < words:
        sentences = []
        for _ in range(rng.randint(3, 7)):
            body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16)))
            if rng.random() < 0.2:
                sentences.append(f'"{body.capitalize()}?" asked {rng.choice(NAMES)}.')
            elif rng.random() < 0.1:
                sentences.append(f"At {rng.randint(1, 12)}:{rng.randint(10, 59)} p.m. {body}.")
            else:
                sentences.append(body.capitalize() + ".")
            count += len(sentences[-1].split())
        paragraphs.append(" ".join(sentences))
    return paragraphs


def cover_png() -> bytes:
    """A 600 x 900 cover, encoded by PyAV."""
    import numpy as np

    image = np.zeros((900, 600, 3), dtype=np.uint8)
    image[:, :, 0] = np.linspace(30, 200, 900, dtype=np.uint8)[:, None]
    image[:, :, 2] = 90
    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = 600, 900, "rgb24"
    frame = av.VideoFrame.from_ndarray(image, format="rgb24")
    return b"".join(bytes(p) for p in codec.encode(frame))


def build_epub(path: Path, words: int, chapters: int) -> None:
    book = epub.EpubBook()
    book.set_identifier("batchtts-bench-book")
    book.set_title("The Lighthouse Ledger")
    book.set_language("en")
    book.add_author("A. Bench Writer")
    book.set_cover("cover.png", cover_png())
    title_page = epub.EpubHtml(title="Title Page", file_name="title.xhtml", lang="en")
    title_page.content = "<html><body><h1>The Lighthouse Ledger</h1><p>A. Bench Writer</p></body></html>"
    book.add_item(title_page)
    documents = [title_page]
    for n in range(1, chapters + 1):
        chapter = epub.EpubHtml(title=f"Chapter {n}", file_name=f"chapter-{n:02d}.xhtml", lang="en")
        body = "".join(f"<p>{p}</p>" for p in prose(words // chapters, seed=n))
        chapter.content = f"<html><body><h1>Chapter {n}</h1>{body}</body></html>"
        book.add_item(chapter)
        documents.append(chapter)
    book.toc = documents
    book.add_item(epub.EpubNcx())
    book.add_item(epub.EpubNav())
    book.spine = ["nav", *documents]
    epub.write_epub(str(path), book)


def timed(argv: list[str], cwd: Path) -> tuple[float, float, str]:
    """Wall and CPU seconds of one command (its children included), and what it printed."""
    before = os.times()
    started = time.perf_counter()
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    if result.returncode not in (0, 1) or (result.returncode == 1 and argv[2] != "qc"):
        sys.exit(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return wall, cpu, result.stdout


def seconds_of(path: Path) -> float:
    with av.open(str(path)) as container:
        return float(container.duration or 0) / av.time_base


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--words", type=int, default=100_000)
    parser.add_argument("--chapters", type=int, default=20)
    parser.add_argument("--voice", default="fable")
    parser.add_argument("--master", default="acx", choices=["acx", "podcast", "none"])
    parser.add_argument("--keep", type=Path, help="Keep the book, the audio and the M4B in this folder.")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="batchtts-book-"))
    cli = [sys.executable, "-m", "batchtts"]
    try:
        build_epub(tmp / "book.epub", args.words, args.chapters)
        steps = [
            ("EPUB -> manifest", [*cli, "manifest", "from-text", "book.epub", "-o", "chapters.csv"]),
            (f"narrate (local/espeak-ng), master {args.master}",
             [*cli, "run", "chapters.csv", "--out", "out", "--model", "local/espeak-ng", "--voice", args.voice,
              "--master", args.master]),
            ("M4B with chapters and cover", [*cli, "audiobook", "out", "--to", "book.m4b"]),
            ("QC of every file", [*cli, "qc", "out", "--json"]),
        ]
        measured = [(name, *timed(argv, tmp)) for name, argv in steps]
        hours = seconds_of(tmp / "book.m4b") / 3600
        total_wall = sum(m[1] for m in measured)
        print(f"{args.words:,} words, {args.chapters} chapters: {hours:.2f} hours of audio\n")
        print("| step | wall s | CPU s | x real time |\n| --- | ---: | ---: | ---: |")
        for name, wall, cpu, _ in measured:
            print(f"| {name} | {wall:.1f} | {cpu:.1f} | {hours * 3600 / wall:.0f} |")
        print(f"| **EPUB -> M4B** | **{total_wall:.1f}** | {sum(m[2] for m in measured):.1f} | "
              f"{hours * 3600 / total_wall:.0f} |\n")
        qc = [json.loads(line) for line in measured[-1][3].splitlines() if line.strip()]
        print_qc(qc)
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            for name in ("book.epub", "chapters.csv", "book.m4b"):
                shutil.copy2(tmp / name, args.keep / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


QC_COLUMNS = ("id", "loudness_lufs", "rms_db", "peak_db", "true_peak_db", "noise_floor_db", "head_s", "tail_s",
              "length_s", "passed", "problems")


def print_qc(records: list[dict[str, object]]) -> None:
    if not records:
        print("(qc printed nothing)")
        return
    print("| " + " | ".join(QC_COLUMNS) + " |\n|" + " --- |" * len(QC_COLUMNS))
    for record in records:
        print("| " + " | ".join(_cell(record.get(c)) for c in QC_COLUMNS) + " |")


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, list):
        return "; ".join(map(str, value))
    return "" if value is None else str(value)


if __name__ == "__main__":
    main()
