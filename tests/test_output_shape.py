"""The job file's [output]: each row's file made into the trainer's shape (a rate, channels, flac) as
it lands, before it is tagged, checked and put in place, so that the file, the ledger's record of it
and the audio checks describe the same audio; and read back by readers that are not ours (PyAV,
soundfile, mutagen, the Hugging Face export).

Rows are narrated by the embedded eSpeak NG engine (22,050 Hz mono, no key) or by a real `batchtts
serve` (the tone engine: 24 kHz mono), so every file here is converted from another shape.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import av
import pyarrow.parquet as pq
import pytest
import soundfile
from conftest import FAST_RETRY, cli, ledger_rows, write_csv
from mutagen.flac import FLAC

from batchtts.audio import AudioInfo
from batchtts.config import Output
from batchtts.conform import ConversionError, conform
from batchtts.errors import EXIT_USAGE
from batchtts.manifest import Row
from batchtts.names import CHUNK_DIR

pytestmark = pytest.mark.timeout(120)

LOCAL = "local/espeak-ng"
MODEL = "openai/gpt-4o-mini-tts"  # the tone engine's, through `batchtts serve`
LONG = ("The first sentence of a long row is here. A second sentence follows it closely. "
        "And a third sentence ends the row.")
ROWS = [
    {"id": "u1", "text": "Hello there, my friend.", "title": "A greeting"},
    {"id": "u2", "text": "A second line, said once.", "title": ""},
    {"id": "long", "text": LONG, "title": ""},
]


def job(folder: Path, manifest: Path, fmt: str, output: str, model: str = LOCAL, voice: str = "en-us",
        chunk_chars: int = 60) -> Path:
    """A job file narrating `manifest` into folder/out in `fmt`, with `output` as its [output] table."""
    path = folder / "job.toml"
    path.write_text(f'manifest = "{manifest}"\nout = "{folder / "out"}"\nchunk_chars = {chunk_chars}\n'
                    f'[defaults]\nmodel = "{model}"\nvoice = "{voice}"\nformat = "{fmt}"\n'
                    f"[output]\n{output}\n", encoding="utf-8")
    return path


def decoded(path: Path, pcm: tuple[int, int] | None = None) -> tuple[int, int, int]:
    """Rate, channels and samples a channel, as PyAV decodes the file."""
    options = {} if pcm is None else {"format": "s16le", "options": {"sample_rate": str(pcm[0]),
                                                                     "ch_layout": ("mono", "stereo")[pcm[1] - 1]}}
    with av.open(str(path), "r", **options) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        return stream.rate, stream.channels, samples


def described_by_its_record(out: Path, record: dict, rate: int, channels: int) -> int:
    """Check a row's file against the ledger's record of it, as two decoders read it; its samples."""
    path = out / record["path"]
    data = path.read_bytes()
    assert record["bytes"] == len(data) and record["sha256"] == hashlib.sha256(data).hexdigest()
    assert (record["sample_rate"], record["channels"]) == (rate, channels)
    pcm = (rate, channels) if path.suffix == ".pcm" else None
    found_rate, found_channels, samples = decoded(path, pcm)
    assert (found_rate, found_channels) == (rate, channels)
    assert abs(record["duration_s"] - samples / rate) < 0.010
    if path.suffix in (".flac", ".wav"):
        info = soundfile.info(str(path))
        assert (info.samplerate, info.channels, info.frames) == (rate, channels, samples)
    return samples


def test_a_flac_job_at_16khz_mono_lands_files_the_ledger_and_the_checks_describe(tmp_path: Path):
    manifest = write_csv(tmp_path / "m.csv", ROWS)
    out = tmp_path / "out"
    result = cli("run", job(tmp_path, manifest, "flac", "sample_rate = 16000\nchannels = 1"), timeout=60)
    assert result.returncode == 0, result.stderr
    rows = ledger_rows(out / "ledger.sqlite")
    checked = ledger_rows(out / "ledger.sqlite", "checks")
    assert set(rows) == {"u1", "u2", "long"} and all(r["status"] == "done" for r in rows.values())
    for key, record in rows.items():
        assert record["path"] == f"{key}.flac" and (out / record["path"]).read_bytes()[:4] == b"fLaC"
        described_by_its_record(out, record, 16000, 1)
        # The checks measured the file that landed, not the provider's answer.
        assert checked[key]["sha256"] == record["sha256"]
        assert abs(checked[key]["duration_s"] - record["duration_s"]) < 0.010
    # The long row was asked for chunk by chunk, as pcm, and its stitched file converted as it landed.
    assert rows["long"]["chunks"] > 1
    chunks = [p for p in (out / CHUNK_DIR).rglob("*") if p.is_file()]
    assert len(chunks) == rows["long"]["chunks"] and all(p.suffix == ".pcm" for p in chunks)
    # Vorbis comments, written after the conversion, as any FLAC reader finds them.
    assert FLAC(out / "u1.flac")["TITLE"] == ["A greeting"]


def test_wav_pcm_and_mp3_rows_land_at_the_output_rate_and_a_rerun_sends_nothing(serve, tmp_path: Path):
    server = serve()
    rows = [{"id": "w", "text": "A wav row, said at an even pace.", "response_format": "wav"},
            {"id": "p", "text": "A raw pcm row, said at an even pace.", "response_format": "pcm"},
            {"id": "m", "text": "An mp3 row, said at an even pace.", "response_format": "mp3"}]
    manifest = write_csv(tmp_path / "m.csv", rows)
    out = tmp_path / "out"
    job_file = job(tmp_path, manifest, "wav", "sample_rate = 22050", model=MODEL, voice="alloy")

    def run() -> None:
        result = cli("run", job_file, "--base-url", server.url, *FAST_RETRY, timeout=60)
        assert result.returncode == 0, result.stderr

    run()
    assert server.stats()["requests"] == 3
    first = ledger_rows(out / "ledger.sqlite")
    samples = {key: described_by_its_record(out, record, 22050, 1) for key, record in first.items()}
    # pcm stays raw pcm, at the new rate: the ledger says its rate and channels.
    assert (out / "p.pcm").stat().st_size == samples["p"] * 2

    run()
    assert server.stats()["requests"] == 3  # every file is there, in its shape: nothing is asked for again
    assert ledger_rows(out / "ledger.sqlite") == first


def test_a_changed_output_narrates_again_and_a_file_in_shape_is_left_as_it_is(serve, tmp_path: Path):
    server = serve()
    manifest = write_csv(tmp_path / "m.csv", [{"id": "a", "text": "A row narrated in three shapes."},
                                              {"text": "A row without an id keeps its key."}])
    out = tmp_path / "out"

    def run(output: str) -> dict[str, dict]:
        result = cli("run", job(tmp_path, manifest, "wav", output, model=MODEL, voice="alloy"),
                     "--base-url", server.url, *FAST_RETRY, timeout=60)
        assert result.returncode == 0, result.stderr
        return ledger_rows(out / "ledger.sqlite")

    # The tone engine's own rate: the wav as the run wrote it, not encoded again.
    native = run("sample_rate = 24000")
    assert server.stats()["requests"] == 2 and b"Lavf" not in (out / "a.wav").read_bytes()
    shaped = run("sample_rate = 16000\nchannels = 2")
    assert server.stats()["requests"] == 4
    assert shaped.keys() == native.keys()  # a row without an id keeps its key, and its file's name
    for key, record in shaped.items():
        assert record["fingerprint"] != native[key]["fingerprint"] and record["path"] == native[key]["path"]
        described_by_its_record(out, record, 16000, 2)
    assert run("sample_rate = 16000\nchannels = 2") == shaped and server.stats()["requests"] == 4


def test_a_job_without_output_keeps_the_fingerprints_its_ledger_has():
    row = Row(1, "a", "hello", "m", "v", "wav", None, None, None, {})
    said = json.dumps(["m", "v", "hello", "wav", None, None], sort_keys=True, ensure_ascii=False)
    assert row.fingerprint == hashlib.sha256(said.encode()).hexdigest()
    shaped = Row(1, None, "hello", "m", "v", "wav", None, None, None, {}, shape=Output(sample_rate=16000))
    plain = Row(1, None, "hello", "m", "v", "wav", None, None, None, {})
    assert shaped.fingerprint != plain.fingerprint and shaped.key == plain.key
    # A long row's chunks are the provider's answers, asked for as pcm, whatever the shape.
    assert shaped.chunk_fingerprint("hello") == plain.chunk_fingerprint("hello")
    flac = Row(1, None, "hello", "m", "v", "flac", None, None, None, {})
    assert flac.chunk_fingerprint("hello") == plain.chunk_fingerprint("hello")


def test_a_flac_export_to_hugging_face_copies_each_file_as_it_is(tmp_path: Path):
    """Without the job file: the ledger says the shape the rows were narrated in."""
    manifest = write_csv(tmp_path / "m.csv", ROWS[:2])
    job_file = job(tmp_path, manifest, "flac", "sample_rate = 16000\nchannels = 1")
    assert cli("run", job_file, timeout=60).returncode == 0
    dest = tmp_path / "hf"
    said = cli("export", tmp_path / "out", "--format", "hf", "--to", dest, timeout=60)
    assert said.returncode == 0, said.stderr
    assert "wrote 2 rows" in said.stdout and "2 copied as narrated" in said.stdout
    table = pq.read_table(next((dest / "data").glob("train-*.parquet")))
    exported = {row["id"]: row["audio"]["bytes"] for row in table.to_pylist()}
    assert exported == {key: (tmp_path / "out" / f"{key}.flac").read_bytes() for key in ("u1", "u2")}


@pytest.mark.parametrize(("fmt", "output", "said"), [
    ("wav", "channels = 3", "[output] channels (--channels) must be a whole number, from 1 to 2, not 3"),
    ("mp3", "sample_rate = 12345", "[output] sample_rate (--sample-rate): mp3 takes the sample rates 8000, "),
    ("flac", "sample_rate = 100", "[output] sample_rate (--sample-rate) must be a whole number, from 1000"),
    ("flac", 'sample_rate = "16k"', "[output] sample_rate (--sample-rate) must be a whole number"),
    ("flac", "rate = 16000", "unknown key in [output]: rate; [output] takes sample_rate, channels"),
])
def test_a_bad_output_is_refused_before_anything_is_sent(serve, tmp_path: Path, fmt: str, output: str, said: str):
    server = serve()
    manifest = write_csv(tmp_path / "m.csv", ROWS[:1])
    result = cli("run", job(tmp_path, manifest, fmt, output, model=MODEL, voice="alloy"), "--base-url", server.url,
                 timeout=60)
    assert result.returncode == EXIT_USAGE and said in result.stderr
    assert server.stats()["requests"] == 0 and not (tmp_path / "out" / "ledger.sqlite").exists()


def test_a_row_whose_format_cannot_take_the_rate_is_refused_by_its_number(serve, tmp_path: Path):
    server = serve()
    manifest = write_csv(tmp_path / "m.csv", [{"id": "f", "text": "A flac row takes any rate."},
                                              {"id": "m", "text": "An mp3 row does not.", "response_format": "mp3"}])
    result = cli("run", manifest, "--out", tmp_path / "out", "--model", MODEL, "--voice", "alloy", "--format", "flac",
                 "--sample-rate", "12345", "--base-url", server.url, timeout=60)
    assert result.returncode == EXIT_USAGE and server.stats()["requests"] == 0
    assert "row 2 (id 'm'): [output] sample_rate: mp3 takes the sample rates" in result.stderr


def test_a_file_that_cannot_be_converted_is_its_rows_failure(tmp_path: Path):
    with open(tmp_path / "answer", "w+b") as f:
        f.write(b"\xff\xfb" + bytes(300))  # an mp3 frame header, and nothing a decoder can read after it
        with pytest.raises(ConversionError, match=r"^cannot make the audio mp3 at 16000 Hz, mono: "):
            conform(f, "mp3", AudioInfo(24000, 1, 1.0), Output(16000, 1))


def test_flac_rows_are_mastered_and_bound_into_an_audiobook(tmp_path: Path):
    manifest = write_csv(tmp_path / "m.csv", ROWS[:2])
    job_file = job(tmp_path, manifest, "flac", "sample_rate = 16000")
    result = cli("run", job_file, "--master", "podcast", timeout=90)
    assert result.returncode == 0, result.stderr
    mastered = ledger_rows(tmp_path / "out" / "ledger.sqlite", "mastered")
    assert {record["status"] for record in mastered.values()} == {"done"} and len(mastered) == 2
    book = tmp_path / "book.m4b"
    bound = cli("audiobook", tmp_path / "out", "--to", book, timeout=90)
    assert bound.returncode == 0, bound.stderr
    with av.open(str(book)) as container:
        assert len(container.chapters()) == 2
