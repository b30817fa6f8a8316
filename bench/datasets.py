"""What a dataset export costs: wall time, CPU and peak RSS of `batchtts export --format F` per layout,
over a finished run of 10,000 and 100,000 rows, beside the plain results table of the same run.

    python bench/datasets.py                     # 10,000 and 100,000 rows (about half an hour)
    python bench/datasets.py --rows 10000

The run is seeded through the library with a provider that answers every row at once with one
second of a 24 kHz tone (as 16-bit PCM, kept as wav; some 20 characters a row, a speaking rate the
audio checks pass), so only the export is measured. Peak RSS
that stays put from 10^4 to 10^5 rows is what holds memory flat at 10^6.
"""

from __future__ import annotations

import argparse
import math
import shutil
import struct
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from throughput import measure

import batchtts
from batchtts import Defaults, Job
from batchtts.providers import SpeechRequest

RATE = 24000
TONE = b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * 220 * i / RATE))) for i in range(RATE))
EXPORTS = [
    ("results.parquet", ["--to", "{dest}/results.parquet"]),
    ("nemo (wav, copied)", ["--format", "nemo", "--to", "{dest}/nemo", "--split", "train=0.98,validation=0.02"]),
    ("nemo tarred 16 kHz", ["--format", "nemo", "--to", "{dest}/nemo", "--shard-size", "10000",
                            "--sample-rate", "16000"]),
    ("ljspeech", ["--format", "ljspeech", "--to", "{dest}/lj"]),
    ("hf (flac)", ["--format", "hf", "--to", "{dest}/hf", "--split", "train=0.98,validation=0.02"]),
    ("webdataset (flac)", ["--format", "webdataset", "--to", "{dest}/wds", "--shard-size", "100MB"]),
]


@dataclass
class Audio:
    content_type: str = f"audio/pcm;rate={RATE};channels=1"
    content_length: int | None = len(TONE)
    generation_id: str | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        yield TONE


class Tone:
    """A second of tone for every request, at once."""

    @asynccontextmanager
    async def speak(self, request: SpeechRequest) -> AsyncIterator[Audio]:
        yield Audio()

    async def aclose(self) -> None:
        return None


def seed(folder: Path, rows: int) -> Path:
    manifest = folder / "manifest.parquet"
    pq.write_table(pa.table({"id": [f"utt-{i:08d}" for i in range(rows)],
                             "text": [f"Utterance number {i}." for i in range(rows)],
                             "speaker_id": [str(i % 7) for i in range(rows)]}), manifest, row_group_size=65536)
    out = folder / "out"
    batchtts.run(Job(manifest=manifest, out=out, concurrency=64,
                     defaults=Defaults(model="openai/gpt-4o-mini-tts", voice="alloy", format="wav")), Tone())
    report = batchtts.status([out])
    assert report["done"] == rows and not report.get("flagged"), report  # every row goes into the dataset
    return out


def table(rows: int) -> None:
    print(f"Exports of {rows:,} rows of 1 s (24 kHz wav)")
    print(f"{'export':<22} {'wall s':>8} {'cpu s':>8} {'rows/s':>8} {'peak RSS MB':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        out = seed(Path(tmp), rows)
        dest = Path(tmp) / "dest"
        for name, args in EXPORTS:
            dest.mkdir()
            code, wall, cpu, rss = measure([sys.executable, "-m", "batchtts", "export", str(out),
                                            *(a.format(dest=dest) for a in args)])
            assert code == 0, name
            print(f"{name:<22} {wall:>8.1f} {cpu:>8.1f} {rows / wall:>8.0f} {rss:>12}", flush=True)
            shutil.rmtree(dest)
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, action="append", help="rows of the run (again for more runs)")
    for rows in parser.parse_args().rows or [10_000, 100_000]:
        table(rows)


if __name__ == "__main__":
    main()
