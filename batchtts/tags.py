"""Titles in the files themselves: ID3v2 for mp3 and Vorbis comments for FLAC (title, artist, album,
track, through mutagen), a LIST/INFO title for WAV, from the manifest's `title`, `artist`, `album`
and `track` columns."""

from __future__ import annotations

import os
import struct
from typing import BinaryIO

from mutagen.flac import FLAC
from mutagen.id3 import ID3, TALB, TIT2, TPE1, TRCK, TextFrame

_ID3_FRAMES: dict[str, type[TextFrame]] = {"title": TIT2, "artist": TPE1, "album": TALB, "track": TRCK}
_VORBIS_FIELDS = {"title": "TITLE", "artist": "ARTIST", "album": "ALBUM", "track": "TRACKNUMBER"}


def write_tags(f: BinaryIO, fmt: str, tags: dict[str, str]) -> None:
    """Tag the open file in place; pcm has nowhere to keep tags."""
    if not tags:
        return
    if fmt == "mp3":
        id3 = ID3()
        for name, value in tags.items():
            id3.add(_ID3_FRAMES[name](encoding=3, text=value))
        f.flush()
        f.seek(0)
        id3.save(f, v2_version=4)
        f.seek(0, os.SEEK_END)
    elif fmt == "flac":
        _vorbis_comments(f, tags)
    elif fmt == "wav" and "title" in tags:
        _riff_info_title(f, tags["title"])


def _vorbis_comments(f: BinaryIO, tags: dict[str, str]) -> None:
    f.flush()
    f.seek(0)
    flac = FLAC(f)
    if flac.tags is None:
        flac.add_tags()
    for name, value in tags.items():
        flac[_VORBIS_FIELDS[name]] = value
    f.seek(0)  # mutagen reads the header from where the file is
    flac.save(f)
    f.seek(0, os.SEEK_END)


def _riff_info_title(f: BinaryIO, title: str) -> None:
    value = title.encode("utf-8") + b"\0"
    info = b"INFO" + b"INAM" + struct.pack("<I", len(value)) + value + b"\0" * (len(value) % 2)
    f.seek(0, os.SEEK_END)
    f.write(b"LIST" + struct.pack("<I", len(info)) + info)
    size = f.tell()
    f.seek(4)
    f.write(struct.pack("<I", size - 8))
    f.seek(0, os.SEEK_END)
