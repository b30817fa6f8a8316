"""Real-time factor of the embedded eSpeak NG engine on one core.

    python bench/engine.py [--passages 40]

Pins itself to one CPU, narrates passages of typical audiobook sentences in each format, and prints
seconds of audio produced per second of CPU (the issue's bar: at least 100x real time).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

from batchtts.engine import engine
from batchtts.local import synthesize

PASSAGE = (
    "The lighthouse keeper counted the ships each evening, one lantern at a time. By morning the fog had "
    "lifted, and the harbour smelled of salt and tar. She called across the bay, and the wind carried her "
    "voice to the far shore, where a boy was mending nets beside an upturned boat. "
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--passages", type=int, default=40)
    args = parser.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    rate = engine().sample_rate
    print(f"{'format':<7} | {'voice':<10} | {'audio s':>8} | {'CPU s':>6} | {'x real time':>11}")
    print("-" * 54)
    for fmt in ("pcm", "mp3"):
        for voice in ("alloy", "nova", "fr"):
            audio_s = 0.0
            cpu = time.process_time()
            for i in range(args.passages):
                body, content_type = asyncio.run(synthesize(f"Passage {i}. {PASSAGE}", voice, fmt))
                audio_s += len(body) / 2 / rate if fmt == "pcm" else 0.0
                if fmt == "mp3":
                    audio_s += _mp3_seconds(body)
            cpu = time.process_time() - cpu
            print(f"{fmt:<7} | {voice:<10} | {audio_s:>8.1f} | {cpu:>6.2f} | {audio_s / cpu:>11.0f}")


def _mp3_seconds(body: bytes) -> float:
    import io

    import mutagen.mp3

    return mutagen.mp3.MP3(io.BytesIO(body)).info.length


if __name__ == "__main__":
    main()
