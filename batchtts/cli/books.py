"""Audiobooks: `manifest from-text` (a book into chapter rows), `audiobook` (an M4B or MP3 with
chapters) and `qc` (mastered files against a store's spec)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..config import MASTERING_PRESETS, load_job
from ..errors import BatchTTSError
from .common import count, examples, fail, reader_left, size

if TYPE_CHECKING:
    from ..qc import FileCheck


@click.group()
def manifest() -> None:
    """Make manifests."""


@manifest.command("from-text", epilog=examples(
    "batchtts manifest from-text sample_manifests/book.epub -o chapters.csv",
    "batchtts manifest from-text sample_manifests/book.md -o chapters.csv --no-front-matter --force",
    "batchtts manifest from-text novel.txt -o chapters.csv --chapter-pattern '^CHAPTER [IVXLC]+'",
))
@click.argument("book", type=click.Path(path_type=Path, dir_okay=False))
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path, dir_okay=False), help="chapters.csv to write.")
@click.option("--chapter-pattern", help="Regular expression for the lines (in an EPUB, the headings) that start a chapter.")
@click.option("--no-front-matter", "front_matter", is_flag=True, flag_value=False, default=True,
              help="Leave out what comes before the first chapter (title page, dedication, preface), otherwise track 0.")
@click.option("--force", is_flag=True, help="Overwrite --out (and the cover beside it) if it exists.")
def from_text(book: Path, out: Path, chapter_pattern: str | None, front_matter: bool, force: bool) -> None:
    """Turn an EPUB, Markdown or plain-text BOOK into a manifest with one row per chapter (id, title,
    track, text; from an EPUB also album, artist and cover, its image written beside the manifest).
    "Chapter 1" is track 1; what comes before it is one row, track 0."""
    from ..books import book_to_manifest

    try:
        written = book_to_manifest(book, out, chapter_pattern, front_matter=front_matter, force=force)
    except BatchTTSError as exc:
        fail(exc)
    characters = sum(len(c.text) for c in written.chapters)
    click.echo(f"wrote {len(written.chapters)} chapters ({characters} characters) to {out}")
    if written.cover is not None:
        click.echo(f"wrote the cover to {written.cover}")
    for c in written.chapters[:50]:
        click.echo(f"  {c.track:>3}  {len(c.text):>8} chars  {c.title}")


@click.command(epilog=examples(
    "batchtts audiobook out/book --to Book.m4b",
    "batchtts audiobook out/book --to Book.m4b --split-hours 10",
    "batchtts audiobook out/book --to Book.mp3 --allow-missing",
))
@click.argument("targets", nargs=-1)
@click.option("--to", "to", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="The book to write: .m4b (AAC with chapter marks), .m4a, or .mp3 (ID3 chapters).")
@click.option("--split-hours", type=click.FloatRange(min=0, min_open=True),
              help="Write parts 'BOOK - Part N' of at most this many hours each, split between chapters.")
@click.option("--allow-missing", is_flag=True, help="Leave out chapters not narrated (or failed) instead of refusing.")
@click.option("--bitrate", "bitrate_kbps", default=64, show_default=True, type=click.IntRange(16, 320),
              help="Audio bitrate in kbit/s.")
@click.option("--manifest", type=click.Path(path_type=Path, dir_okay=False), help="Manifest (default: the last run's).")
@click.option("--job", "job_file", type=click.Path(path_type=Path, dir_okay=False), help="Job file naming the manifest.")
def audiobook(targets: tuple[str, ...], to: Path, split_hours: float | None, allow_missing: bool, bitrate_kbps: int,
              manifest: Path | None, job_file: Path | None) -> None:
    """Make a finished run of a chapters manifest into one audiobook file: the chapters in the order
    of the manifest's track column, a chapter mark each named by its title, the book tagged from its
    album, artist and cover columns (cover: a JPEG or PNG, relative to the manifest's folder)."""
    from ..audiobook import make_audiobook

    try:
        result = make_audiobook(targets, to, manifest=manifest, job=load_job(job_file) if job_file else None,
                                split_hours=split_hours, allow_missing=allow_missing, bitrate_kbps=bitrate_kbps)
    except BatchTTSError as exc:
        fail(exc)
    if result.left_out:
        shown = "; ".join(map(str, result.left_out[:5])) + ("; ..." if len(result.left_out) > 5 else "")
        click.echo(f"left out {count(len(result.left_out), 'chapter')} with no audio: {shown}")
    for f in result.files:
        minutes, seconds = divmod(round(f.duration_s), 60)
        click.echo(f"wrote {f.path}: {count(f.chapters, 'chapter')}, {minutes // 60}:{minutes % 60:02d}:{seconds:02d}, "
                   f"{size(f.bytes)}")


@click.command(epilog=examples(
    "batchtts qc out/book",
    "batchtts qc out/book --preset acx",
    "batchtts qc out/book --json | jq -c 'select(.passed | not) | {row, problems}'",
))
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--preset", "preset_name", type=click.Choice([p for p in MASTERING_PRESETS if p != "none"]),
              help="The spec to hold the files to (default: the preset each file was mastered to).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object a line, a file each.")
def qc(target: Path, preset_name: str | None, as_json: bool) -> None:
    """Measure each file of a job and hold it to a store's spec: integrated loudness, RMS, peak, true
    peak, noise floor, head and tail silence, length. TARGET is an output folder or a ledger file. A
    job run with --master is checked by its mastered files; one without, by its narrated files
    against --preset.

    \b
    Exit codes: 0 every file passes; 1 some file fails; 2 usage error."""
    from ..qc import check_files

    failed = checked = 0
    try:
        for f in check_files(target, preset_name):
            if not as_json and not checked:
                click.echo(f"{'row':>5} {'id':<20} {'LUFS':>6} {'RMS':>6} {'peak':>6} {'TP':>6} {'floor':>6} "
                           f"{'head':>5} {'tail':>5} {'length':>8}  result")
            checked += 1
            failed += not f.passed
            click.echo(json.dumps(f.as_dict()) if as_json else _qc_text(f))
    except BatchTTSError as exc:
        fail(exc)
    except BrokenPipeError:
        reader_left()
    if not as_json:
        click.echo(f"{count(checked, 'file')}: {checked - failed:,} pass, {failed:,} fail")
    sys.exit(1 if failed else 0)


def _qc_text(f: FileCheck) -> str:
    """One file of `qc` as a table row, its problems on the lines below."""
    m = f.measurement

    def level(value: float | None) -> str:
        return "-inf" if value is None else f"{value:.1f}"

    ident = f.id if len(f.id) <= 20 else f.id[:19] + "…"
    if m is None:
        cells = f"{'':>6} {'':>6} {'':>6} {'':>6} {'':>6} {'':>5} {'':>5} {'':>8}"
    else:
        loudness = "-" if m.loudness_lufs is None else f"{m.loudness_lufs:.1f}"
        minutes, seconds = divmod(m.length_s, 60)
        cells = (f"{loudness:>6} {level(m.rms_db):>6} {level(m.peak_db):>6} {level(m.true_peak_db):>6} "
                 f"{level(m.noise_floor_db):>6} {m.head_s:>5.2f} {m.tail_s:>5.2f} {int(minutes):>4}:{seconds:04.1f}")
    lines = [f"{f.row if f.row is not None else '?':>5} {ident:<20} {cells}  {'pass' if f.passed else 'FAIL'} {f.preset}"]
    lines += [f"{'':>6}{problem}" for problem in f.problems]
    return "\n".join(lines)

