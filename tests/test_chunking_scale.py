"""Splitting a long text stays linear in its length when there is no blank line to split it at first."""

from __future__ import annotations

import re
import time

from batchtts.chunking import Chunk, split_text

LIMIT = 4096


def sentences(size: int, separator: str) -> str:
    """Whole sentences, each different, with the abbreviations and numbers sentence splitting must know."""
    parts: list[str] = []
    length = i = 0
    while length < size:
        parts.append(f'Line {i}: Mr. Smith said "wait", and at 3.14 p.m. they waited, as the U.S. rules ask.')
        length += len(parts[-1]) + 1
        i += 1
    return separator.join(parts)


def assert_split_at_sentence_ends(text: str, chunks: list[Chunk]) -> None:
    assert all(0 < len(c.text) <= LIMIT for c in chunks)
    assert all(text[c.start:c.start + len(c.text)] == c.text for c in chunks)
    assert re.sub(r"\s+", "", "".join(c.text for c in chunks)) == re.sub(r"\s+", "", text)
    assert all(c.text.endswith("ask.") for c in chunks), [c.text[-30:] for c in chunks if not c.text.endswith("ask.")]


def timed_split(text: str) -> tuple[float, list[Chunk]]:
    started = time.perf_counter()
    chunks = split_text(text, LIMIT)
    return time.perf_counter() - started, chunks


def test_a_chapter_of_single_lines_splits_in_time_linear_in_its_length():
    short, _ = timed_split(sentences(250_000, "\n"))
    text = sentences(2_000_000, "\n")
    long, chunks = timed_split(text)
    # Eight times the text: about eight times the time when linear, sixty-four when quadratic.
    assert long < 20 * short, (short, long)
    assert_split_at_sentence_ends(text, chunks)


def test_a_chapter_on_one_line_is_split_at_sentence_ends():
    text = sentences(100_000, " ")
    assert_split_at_sentence_ends(text, split_text(text, LIMIT))
    overlong = " word" * 3_000  # no sentence end for 15,000 characters: cut between words
    chunks = split_text(text + overlong + " " + text, LIMIT)
    assert all(len(c.text) <= LIMIT and re.search(r"(ask\.|word)$", c.text) for c in chunks)
