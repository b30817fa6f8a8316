"""Splitting a long text stays linear in its length when there is no blank line to split it at first."""

from __future__ import annotations

import re
import time

from batchtts.chunking import Chunk, split_text

LIMIT = 4096


SENTENCES = (
    'Mr. Smith said "wait", and at 3.14 p.m. they waited, as the U.S. rules ask.',
    "This is a sentence, with commas, in a long chapter.",
    "Then they left!",
)


def sentences(size: int, separator: str) -> str:
    """Whole sentences that come back again and again, as short lines do in a chapter (pysbd looks
    each repeat up past every earlier one), with abbreviations and numbers whose periods end none."""
    count = size // (sum(len(s) + 1 for s in SENTENCES) // len(SENTENCES))
    return separator.join(SENTENCES[i % len(SENTENCES)] for i in range(count))


def assert_split_at_sentence_ends(text: str, chunks: list[Chunk]) -> None:
    assert all(0 < len(c.text) <= LIMIT for c in chunks)
    assert all(text[c.start:c.start + len(c.text)] == c.text for c in chunks)
    assert re.sub(r"\s+", "", "".join(c.text for c in chunks)) == re.sub(r"\s+", "", text)
    assert [c.text[-30:] for c in chunks if not c.text.endswith(SENTENCES)] == []


def timed_split(text: str) -> tuple[float, list[Chunk]]:
    """The split and the CPU time it took: this process's alone, whatever else the machine runs (the
    other test workers)."""
    started = time.process_time()
    chunks = split_text(text, LIMIT)
    return time.process_time() - started, chunks


def test_a_chapter_of_single_lines_splits_in_time_linear_in_its_length():
    timed_split(sentences(5_000, "\n"))  # pysbd's first call builds its rules
    short = min(timed_split(sentences(25_000, "\n"))[0] for _ in range(3))
    text = sentences(400_000, "\n")
    long, chunks = timed_split(text)
    # Sixteen times the text: about sixteen times the time when linear; pysbd given whole
    # paragraphs took 43 to 56 times as long here, and more the longer the text.
    assert long < 32 * short, (short, long)
    assert_split_at_sentence_ends(text, chunks)


def test_a_chapter_on_one_line_is_split_at_sentence_ends():
    text = sentences(40_000, " ")
    assert_split_at_sentence_ends(text, split_text(text, LIMIT))
    overlong = " word" * 3_000  # no sentence end for 15,000 characters: cut between words
    chunks = split_text(text + overlong + " " + text, LIMIT)
    assert all(len(c.text) <= LIMIT and c.text.endswith((*SENTENCES, "word")) for c in chunks)
