"""What a row says, as narrated: its words with the lexicon applied and its voice markup read.

A row neither changes is left exactly as it is (its fingerprint, its key, its chunks): a lexicon or
a cast added to a finished job narrates again only what they change. A row they do change carries
its script (`Row.script`), which its fingerprint hashes instead of the text: the lexicon's words,
and with markup, each voice as the cast resolves it, so editing an entry or recasting a character
narrates that row again, and of it only the chunks whose words or voice changed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .chunking import Chunk, split_text
from .lexicon import Lexicon, Rewritten
from .manifest import Row
from .markup import Cast, MarkupError, stretches


@dataclass(frozen=True)
class Piece:
    """Words of a row in one voice, between two tags (or the whole row), as they are narrated."""

    spoken: str  # what is sent: the lexicon applied
    written: str  # the same words as the manifest writes them, without markup: what captions show
    rewritten: Rewritten | None  # the lexicon's changes, to find the written words of a spoken stretch
    start: int  # where the written words start in the row's text
    voice: str | None  # the voice that speaks them; None: the row's own
    pause: float | None  # seconds of silence the markup asks for before them
    paragraph_before: bool


@dataclass(frozen=True)
class Script:
    row: Row  # the row, with its script when the lexicon or the markup changes what is said
    pieces: tuple[Piece, ...] | None  # None: the row's text is said as written
    marked: bool  # voice markup: narrated in chunks, however short, so each carries its voice


def prepare(row: Row, lexicon: Lexicon, cast: Cast) -> Script:
    """The row as it will be narrated. MarkupError for markup that cannot be read, or a row the
    lexicon leaves with nothing to say."""
    found = stretches(row.text)
    if found is None:
        rewritten = lexicon.rewrite(row.text, row.model, row.voice, row.language) if lexicon else None
        if rewritten is None:
            return Script(row, None, False)
        if not rewritten.text.strip():
            raise MarkupError("the lexicon leaves nothing to narrate")
        piece = Piece(rewritten.text, row.text, rewritten, 0, None, None, False)
        return Script(dataclasses.replace(row, script=rewritten.text), (piece,), False)
    pieces: list[Piece] = []
    for stretch in found:
        voice = cast.voice(stretch.voice, row.model, row.key) if stretch.voice is not None else None
        written = row.text[stretch.start:stretch.end]
        rewritten = lexicon.rewrite(written, row.model, voice or row.voice, row.language) if lexicon else None
        spoken = written if rewritten is None else rewritten.text
        if spoken.strip():
            pieces.append(Piece(spoken, written, rewritten, stretch.start, voice, stretch.pause,
                                stretch.paragraph_before))
    if not pieces:
        raise MarkupError("no words to narrate outside the markup")
    return Script(dataclasses.replace(row, script=_script(pieces)), tuple(pieces), True)


def _script(pieces: list[Piece]) -> str:
    """The marked-up text as it is narrated, voices resolved: what the row's fingerprint hashes."""
    said: list[str] = []
    for i, piece in enumerate(pieces):
        if i:
            said.append("\n\n" if piece.paragraph_before else " ")
        if piece.pause is not None:
            said.append(f'<break time="{piece.pause:g}s"/>')
        said.append(piece.spoken if piece.voice is None else f'<voice name="{piece.voice}">{piece.spoken}</voice>')
    return "".join(said)


def split_script(script: Script, limit: int) -> list[Chunk]:
    """The chunks of a row: the text split as `split_text` does, and, with markup, at every change of
    voice and every pause too. Each chunk carries its voice, the pause before it, and (when the
    lexicon changed its words) the words as written, for captions."""
    if script.pieces is None:
        return split_text(script.row.text, limit)
    chunks: list[Chunk] = []
    for piece in script.pieces:
        for i, chunk in enumerate(split_text(piece.spoken, limit)):
            if not chunk.text:
                continue
            start, caption = chunk.start, None
            if piece.rewritten is not None:
                start = piece.rewritten.origin(chunk.start)
                caption = piece.written[start:piece.rewritten.origin(chunk.start + len(chunk.text), end=True)].strip()
            chunks.append(Chunk(chunk.text, piece.start + start,
                                piece.paragraph_before if i == 0 else chunk.paragraph_before,
                                piece.voice, piece.pause if i == 0 else None, caption))
    return chunks
