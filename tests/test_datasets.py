"""Speech datasets from a run (`batchtts export --format nemo|ljspeech|hf|webdataset`), each read back
by the trainers' own readers: NeMo's manifests against the files they name (decoded by miniaudio),
Hugging Face's `datasets`, webdataset's reader, Python's csv as LJSpeech's formatters use it.

Rows are narrated by a real `batchtts serve` (the tone engine: 24 kHz speech-length audio, fast).
"""

from __future__ import annotations

import csv
import json
import tarfile
from collections import Counter
from pathlib import Path

import av
import miniaudio
import pyarrow.parquet as pq
import pytest
from conftest import FAST_RETRY, cli, ledger_rows, write_csv
from test_unattended import S3_ENV, objects, s3  # noqa: F401  # s3: the moto fixture

from batchtts.datasets.layout import ShardSize, sample_name
from batchtts.datasets.splits import Splits
from batchtts.errors import EXIT_USAGE, UsageError

MODEL = "openai/gpt-4o-mini-tts"
ROWS = [
    {"id": "utt-0001", "text": "Hello there, friend.", "voice": "alloy", "speaker_id": "7",
     "normalized_text": "hello there friend"},
    {"id": "utt.0002", "text": "A pipe | inside the text, and \"quotes\".", "voice": "nova", "speaker_id": "8",
     "normalized_text": ""},
    {"id": "chapter 3/line 4", "text": "A line that breaks\nin two.", "voice": "alloy", "speaker_id": "7",
     "normalized_text": "a line that breaks in two"},
    *({"id": f"utt-{i:04d}", "text": f"Sentence number {i}, said once.", "voice": ("alloy", "nova")[i % 2],
       "speaker_id": str(7 + i % 2), "normalized_text": f"sentence number {i} said once"} for i in range(3, 13)),
]


def narrate(serve, folder: Path, rows: list[dict[str, str]] = ROWS, *extra: str, fmt: str = "wav") -> Path:
    """A run of `rows` into folder/out, at the tone engine's 24 kHz mono; returns the output folder."""
    server = serve()
    manifest = write_csv(folder / "manifest.csv", rows)
    out = folder / "out"
    run = cli("run", manifest, "--out", out, "--model", MODEL, "--base-url", server.url, "--format", fmt,
              *FAST_RETRY, *extra)
    assert run.returncode == 0, run.stderr
    return out


def export(out: Path | str, to: Path | str, fmt: str, *options: str, **env: str) -> str:
    result = cli("export", out, "--format", fmt, "--to", to, *options, **env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def frames(path: Path | bytes) -> tuple[int, int, int]:
    """Samples a channel, rate and channels, as miniaudio decodes the file (wav, flac or mp3) at its own rate."""
    data = path if isinstance(path, bytes) else path.read_bytes()
    read = {b"RIFF": miniaudio.wav_read_s16, b"fLaC": miniaudio.flac_read_s16}.get(data[:4], miniaudio.mp3_read_s16)
    decoded = read(data)
    return decoded.num_frames, decoded.sample_rate, decoded.nchannels


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_nemo_manifests_name_files_that_decode_to_their_duration(serve, tmp_path):
    out = narrate(serve, tmp_path)
    dest = tmp_path / "nemo"
    said = export(out, dest, "nemo", "--split", "train=0.5,validation=0.25,test=0.25")
    assert "wrote 13 rows" in said and "13 copied as narrated" in said  # wav at its own rate: no re-encode
    seen = {}
    for split in ("train", "validation", "test"):
        for entry in lines(dest / f"{split}_manifest.json"):
            audio = dest / entry["audio_filepath"]  # relative to the manifest's folder, as NeMo resolves it
            assert audio.is_file()
            samples, rate, _ = frames(audio)
            assert abs(samples / rate - entry["duration"]) < 0.010
            seen[entry["id"]] = entry
    assert set(seen) == {r["id"] for r in ROWS}
    first, piped, broken = seen["utt-0001"], seen["utt.0002"], seen["chapter 3/line 4"]
    assert first["text"] == "Hello there, friend." and first["normalized_text"] == "hello there friend"
    assert first["speaker"] == "alloy" and first["speaker_id"] == "7" and first["sample_rate"] == 24000
    assert piped["text"] == ROWS[1]["text"] and "normalized_text" not in piped  # an empty cell is not known
    assert broken["text"] == ROWS[2]["text"]
    # Copied as narrated: the very bytes of the run's file.
    ledger = {e["key"]: e for e in ledger_rows(out / "ledger.sqlite").values()}
    narrated = (out / ledger["utt-0001"]["path"]).read_bytes()
    assert (dest / first["audio_filepath"]).read_bytes() == narrated


def test_nemo_tarred_shards_hold_exactly_the_files_their_manifest_lists(serve, tmp_path):
    out = narrate(serve, tmp_path)
    dest = tmp_path / "tarred"
    said = export(out, dest, "nemo", "--shard-size", "5", "--sample-rate", "16000")
    assert "train/audio_{0..2}.tar" in said
    entries = lines(dest / "train" / "tarred_audio_manifest.json")
    assert len(entries) == len(ROWS)
    by_shard: dict[int, list[str]] = {}
    for entry in entries:
        by_shard.setdefault(entry["shard_id"], []).append(entry["audio_filepath"])
    assert sorted(by_shard) == [0, 1, 2] and [len(v) for _, v in sorted(by_shard.items())] == [5, 5, 3]
    durations = {e["audio_filepath"]: e["duration"] for e in entries}
    for shard, names in by_shard.items():
        with tarfile.open(dest / "train" / f"audio_{shard}.tar") as tar:
            members = tar.getmembers()
            assert [m.name for m in members] == names
            for member in members:
                samples, rate, channels = frames(tar.extractfile(member).read())
                assert rate == 16000 and channels == 1 and abs(samples / rate - durations[member.name]) < 0.010
        assert [e["audio_filepath"] for e in lines(dest / "train" / "sharded_manifests" / f"manifest_{shard}.json")] \
            == names
    assert all("." not in name.removesuffix(".wav") for name in durations)  # the key is up to the first '.'


def test_hugging_face_datasets_loads_the_shards_and_decodes_at_the_asked_rate(serve, tmp_path):
    import datasets  # the test extra's: slow to import, so only here
    out = narrate(serve, tmp_path)
    dest = tmp_path / "hf"
    export(out, dest, "hf", "--split", "train=0.7,validation=0.3", "--sample-rate", "16000", "--shard-size", "4")
    shards = sorted(p.name for p in (dest / "data").iterdir())
    train = [name for name in shards if name.startswith("train-")]
    assert train and all(name.endswith(f"-of-{len(train):05d}.parquet") for name in train)
    metadata = json.loads(pq.read_schema(dest / "data" / train[0]).metadata[b"huggingface"])
    assert metadata["info"]["features"]["audio"] == {"_type": "Audio", "mono": False, "sampling_rate": 16000}

    cache = tmp_path / "hf-cache"  # where `datasets` keeps what it loads: the test's own
    loaded = datasets.load_dataset("parquet", data_files={"train": str(dest / "data" / "train-*.parquet"),
                                                          "validation": str(dest / "data" / "validation-*.parquet")},
                                   cache_dir=str(cache))
    assert isinstance(loaded["train"].features["audio"], datasets.Audio)  # decoded on access, with no cast
    assert len(loaded["train"]) + len(loaded["validation"]) == len(ROWS)
    ledger = {e["key"]: e for e in ledger_rows(out / "ledger.sqlite").values()}
    row = loaded["train"][0]
    source, rate, _ = frames(out / ledger[row["id"]]["path"])
    assert rate == 24000 and row["audio"]["sampling_rate"] == 16000
    assert abs(len(row["audio"]["array"]) - source * 16000 / rate) <= 2
    assert row["audio"]["path"] == f"{sample_name(row['id'])}.flac"
    assert {"text", "speaker", "speaker_id", "duration", "normalized_text"} <= set(row)
    # The folder alone: `datasets` finds the splits by the shards' names.
    assert set(datasets.load_dataset(str(dest), cache_dir=str(cache))) == {"train", "validation"}


def test_webdataset_reads_every_key_once_from_the_tar_shards(serve, tmp_path):
    import webdataset
    out = narrate(serve, tmp_path)
    dest = tmp_path / "wds"
    export(out, dest, "webdataset", "--shard-size", "4", "--split", "train=0.8,test=0.2")
    urls = sorted(str(p) for p in dest.glob("*.tar"))
    assert len(urls) >= 4 and all(Path(u).name.split("-")[0] in ("train", "test") for u in urls)
    keys = Counter()
    for sample in webdataset.WebDataset(urls, shardshuffle=False, empty_check=False):
        keys[sample["__key__"]] += 1
        said = json.loads(sample["json"])
        samples, rate, _ = frames(sample["flac"])
        assert rate == said["sample_rate"] == 24000 and abs(samples / rate - said["duration"]) < 0.010
        assert sample_name(said["id"]) == sample["__key__"]
    assert keys == Counter(sample_name(r["id"]) for r in ROWS)


def test_ljspeech_metadata_has_three_fields_a_line_and_wavs_of_22050_hz_mono(serve, tmp_path):
    out = narrate(serve, tmp_path)
    dest = tmp_path / "lj"
    export(out, dest, "ljspeech", "--split", "train=0.9,validation=0.1")
    with open(dest / "metadata.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="|", quoting=csv.QUOTE_NONE))
    assert len(rows) == len(ROWS) and all(len(row) == 3 for row in rows)
    by_id = {row[0]: row for row in rows}
    assert by_id[sample_name("utt.0002")][1:] == ['A pipe inside the text, and "quotes".'] * 2
    assert by_id[sample_name("chapter 3/line 4")][1:] == ["A line that breaks in two.", "a line that breaks in two"]
    for name in by_id:
        with av.open(str(dest / "wavs" / f"{name}.wav")) as container:
            stream = container.streams.audio[0]
            assert (stream.codec_context.name, stream.rate, stream.channels) == ("pcm_s16le", 22050, 1)
    per_split = [row[0] for split in ("train", "validation")
                 for row in csv.reader(open(dest / f"metadata_{split}.csv", encoding="utf-8"), delimiter="|",
                                       quoting=csv.QUOTE_NONE)]
    assert sorted(per_split) == sorted(by_id)


def test_a_split_follows_the_key_alone_and_nears_its_fractions():
    splits = Splits.parse("train=0.98,validation=0.01,test=0.01")
    keys = [f"row-{i}" for i in range(1000)]
    counts = Counter(map(splits.of, keys))
    assert 960 <= counts["train"] <= 995 and 2 <= counts["validation"] <= 25 and 2 <= counts["test"] <= 25
    # Stable across runs and machines (a hash of the key, not Python's, salted in each process): these
    # are what every export has given these keys, and must go on giving them.
    halves = Splits.parse("train=0.5,test=0.5")
    assert [halves.of(f"row-{i}") for i in range(8)] == ["test", "test", "train", "train", "test", "train", "test", "test"]
    even = Counter(map(Splits.parse("a=0.5,b=0.5").of, keys))
    assert 440 <= even["a"] <= 560
    for bad in ("train=0.9,test=0.2", "train", "train=x", "train=0.5,train=0.5", "tr-ain=1", "train=0,test=1"):
        with pytest.raises(UsageError):
            Splits.parse(bad)


def test_worker_processes_make_the_very_dataset_one_process_makes(serve, tmp_path, monkeypatch):
    from batchtts.datasets import convert, export_dataset

    out = narrate(serve, tmp_path)
    here = export_dataset([out], tmp_path / "here", "nemo", sample_rate=16000, workers=1)
    monkeypatch.setattr(convert, "IN_PROCESS", 3)  # the rest of the rows go to the workers
    there = export_dataset([out], tmp_path / "there", "nemo", sample_rate=16000, workers=2)
    assert here.rows == there.rows == len(ROWS) and here.copied == there.copied == 0
    manifest = (tmp_path / "here" / "train_manifest.json").read_text(encoding="utf-8")
    assert (tmp_path / "there" / "train_manifest.json").read_text(encoding="utf-8") == manifest
    for entry in map(json.loads, manifest.splitlines()):
        made = (tmp_path / "there" / entry["audio_filepath"]).read_bytes()
        assert made == (tmp_path / "here" / entry["audio_filepath"]).read_bytes() and frames(made)[1] == 16000


def test_two_exports_put_the_same_rows_in_the_same_splits(serve, tmp_path):
    out = narrate(serve, tmp_path)
    first, again = tmp_path / "first", tmp_path / "again"
    export(out, first, "nemo", "--split", "train=0.5,test=0.5")
    export(out, again, "webdataset", "--split", "train=0.5,test=0.5")
    nemo = {e["id"]: split for split in ("train", "test") for e in lines(first / f"{split}_manifest.json")}
    wds = {}
    for tar_path in again.glob("*.tar"):
        with tarfile.open(tar_path) as tar:
            wds.update((json.loads(tar.extractfile(m).read())["id"], tar_path.name.split("-")[0])
                       for m in tar.getmembers() if m.name.endswith(".json"))
    assert nemo == wds and set(nemo.values()) == {"train", "test"}


def test_without_split_the_manifests_split_column_decides_and_raw_pcm_keeps_every_sample(serve, tmp_path):
    rows = [{**row, "split": ("train", "dev")[i % 2]} for i, row in enumerate(ROWS[:6])]
    out = narrate(serve, tmp_path, rows, fmt="pcm")
    dest = tmp_path / "wds"
    said = export(out, dest, "webdataset")
    assert "train 3, dev 3" in said and "6 files converted" in said
    assert sorted(p.name for p in dest.iterdir()) == ["dev-000000.tar", "train-000000.tar"]
    ledger = {e["key"]: e for e in ledger_rows(out / "ledger.sqlite").values()}
    wanted = {row["id"]: row["split"] for row in rows}
    for split in ("train", "dev"):
        with tarfile.open(dest / f"{split}-000000.tar") as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in (n for n in files if n.endswith(".json")):
            said = json.loads(files[name])
            assert wanted[said["id"]] == said["split"] == split
            samples, rate, channels = frames(files[name.replace(".json", ".flac")])
            assert (rate, channels) == (24000, 1) and samples == ledger[said["id"]]["bytes"] // 2  # raw 16-bit mono


def test_rows_without_audio_and_files_that_do_not_decode_are_left_out_and_counted(serve, tmp_path):
    out = narrate(serve, tmp_path, ROWS, "--limit", "10")
    ledger = {e["key"]: e for e in ledger_rows(out / "ledger.sqlite").values()}
    spoilt = out / ledger["utt-0003"]["path"]
    spoilt.write_bytes(bytes(spoilt.stat().st_size))  # the size the ledger has, but no audio
    said = export(out, tmp_path / "part", "nemo")
    assert "wrote 9 rows" in said and "left out 3 rows: 3 pending" in said
    assert "left out 1 row whose file does not decode:" in said and "(utt-0003)" in said
    assert {e["id"] for e in lines(tmp_path / "part" / "train_manifest.json")} == set(ledger) - {"utt-0003"}


def test_rows_the_audio_checks_flagged_are_left_out_unless_asked_for(serve, tmp_path):
    server = serve("--silence-rate", "0.5")  # half the rows answered with silence
    manifest = write_csv(tmp_path / "manifest.csv", ROWS)
    out = tmp_path / "out"
    run = cli("run", manifest, "--out", out, "--model", MODEL, "--base-url", server.url, "--format", "wav", *FAST_RETRY)
    assert run.returncode == 0, run.stderr
    flagged = json.loads(cli("status", out, "--json").stdout)["flagged"]
    assert flagged > 0
    said = export(out, tmp_path / "kept", "nemo")
    assert f"wrote {len(ROWS) - flagged} rows" in said and f"left out {flagged} rows: {flagged} flagged" in said
    assert len(lines(tmp_path / "kept" / "train_manifest.json")) == len(ROWS) - flagged
    assert f"wrote {len(ROWS)} rows" in export(out, tmp_path / "all", "nemo", "--include-flagged")


def test_dataset_exports_refuse_what_they_cannot_write(serve, tmp_path):
    out = narrate(serve, tmp_path, ROWS[:2])
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "old.parquet").write_bytes(b"x")
    for args, message in [
        (("--format", "hf", "--to", taken), "not an empty folder"),
        (("--format", "nemo"), "give --to a new folder"),
        (("--format", "ljspeech", "--to", tmp_path / "lj", "--audio-format", "mp3"), "LJSpeech's files are wav"),
        (("--format", "ljspeech", "--to", tmp_path / "lj", "--shard-size", "10"), "no shards"),
        (("--format", "webdataset", "--to", tmp_path / "w", "--shard-size", "lots"), "--shard-size takes"),
        (("--format", "hf", "--to", tmp_path / "h", "--split", "train=0.5"), "add up to 0.5"),
        (("--format", "hf", "--to", tmp_path / "h", "--audio-format", "mp3", "--sample-rate", "23000"),
         "mp3 takes the sample rates"),
        (("--to", tmp_path / "r.parquet", "--split", "train=1", "--include-flagged"),
         "--split, --include-flagged: only for a dataset"),
    ]:
        refused = cli("export", out, *args)
        assert refused.returncode == EXIT_USAGE and message in refused.stderr, (args, refused.stderr)
    assert not (tmp_path / "lj").exists() and not (tmp_path / "h").exists() and not (tmp_path / "w").exists()
    assert sorted(p.name for p in taken.iterdir()) == ["old.parquet"]


def test_shard_sizes_read_as_rows_or_bytes():
    assert ShardSize.parse("1000") == ShardSize(rows=1000)
    assert ShardSize.parse("500MB") == ShardSize(bytes=500_000_000)
    assert ShardSize.parse("1GB") == ShardSize(bytes=1_000_000_000)
    assert ShardSize.parse("512MiB") == ShardSize(bytes=512 * 1024**2)
    assert ShardSize.parse("1.5 kb") == ShardSize(bytes=1500)
    for bad in ("0", "ten", "5 parsecs", ""):
        with pytest.raises(UsageError):
            ShardSize.parse(bad)


def test_sample_names_carry_no_dot_and_never_collide():
    keys = ["utt-1", "utt.1", "utt_1", "a/b", "a_b", "ünïcode", "x" * 300]
    names = [sample_name(k) for k in keys]
    assert names[0] == "utt-1" and names[2] == "utt_1"
    assert len(set(names)) == len(keys) and all("." not in n and "/" not in n and len(n) < 140 for n in names)


def test_a_hugging_face_export_lands_in_an_s3_bucket_and_a_run_in_a_bucket_exports(serve, s3, tmp_path):  # noqa: F811
    fs, endpoint = s3
    env = {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}
    out = narrate(serve, tmp_path, ROWS[:6])
    said = export(out, "s3://audio-bucket/datasets/v1", "hf", "--sample-rate", "16000", **env)
    assert "s3://audio-bucket/datasets/v1" in said and "s3-SECRET" not in said
    stored = objects(fs, "audio-bucket/datasets/v1")
    assert list(stored) == ["data/train-00000-of-00001.parquet"]  # and nothing staged is left
    with fs.open_input_file("audio-bucket/datasets/v1/data/train-00000-of-00001.parquet") as f:
        table = pq.read_table(f)
    assert b"huggingface" in table.schema.metadata and table.num_rows == 6
    samples, rate, _ = frames(table.column("audio")[0].as_py()["bytes"])
    assert rate == 16000 and abs(samples / rate - table.column("duration")[0].as_py()) < 0.010
    again = cli("export", out, "--format", "hf", "--to", "s3://audio-bucket/datasets/v1", **env)
    assert again.returncode == EXIT_USAGE and "not empty" in again.stderr

    # A run whose audio is in the bucket: the export reads it from there.
    ledger = tmp_path / "state" / "ledger.sqlite"
    run = cli("run", write_csv(tmp_path / "more.csv", ROWS[6:9]), "--out", "s3://audio-bucket/narration",
              "--ledger", ledger, "--model", MODEL, "--base-url", serve().url, "--format", "wav", *FAST_RETRY, **env)
    assert run.returncode == 0, run.stderr
    export(ledger, tmp_path / "from-bucket", "nemo", **env)
    entries = lines(tmp_path / "from-bucket" / "train_manifest.json")
    assert [e["id"] for e in entries] == [r["id"] for r in ROWS[6:9]]
    narrated = {e["key"]: e["path"] for e in ledger_rows(ledger).values()}
    for entry in entries:
        with fs.open_input_file(f"audio-bucket/narration/{narrated[entry['id']]}") as f:
            assert (tmp_path / "from-bucket" / entry["audio_filepath"]).read_bytes() == f.read()  # copied as is
