"""What the audio checks cost per row, against what narrating the row costs on the same core.

    python bench/checks.py [--rows 200] [--seconds 4]

Pins itself to one CPU. Narrates rows of about `--seconds` of speech with the embedded eSpeak NG
engine (the cheapest narration there is: a provider's answer costs a second or more of waiting and
far more money), writes each as a run would (pcm, wav, mp3), and measures each file as the run's
checks do. Prints CPU microseconds per second of audio for narrating and for checking, and their
ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import wave
from pathlib import Path

from batchtts.audio import AudioInfo
from batchtts.checks import Checker
from batchtts.config import Checks
from batchtts.engine import engine
from batchtts.local import synthesize

SENTENCE = "The keeper counted the ships each evening, one lantern at a time, until the fog came in."


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    rate = engine().sample_rate
    words = SENTENCE.split()
    text = " ".join(words[: max(1, round(len(words) * args.seconds / 5.5))])  # eSpeak NG says it in about 5.5 s
    checker = Checker(Checks())
    print(f"{'format':<7} | {'audio s/row':>11} | {'narrate µs/s':>12} | {'check µs/s':>10} | {'check/narrate':>13}")
    print("-" * 66)
    with tempfile.TemporaryDirectory() as folder:
        for fmt in ("pcm", "wav", "mp3"):
            narrate = check = audio_s = 0.0
            path = Path(folder) / f"row.{fmt}"
            for i in range(args.rows):
                started = time.process_time()
                body, _ = asyncio.run(synthesize(f"{text} {i}.", "alloy", "mp3" if fmt == "mp3" else "pcm"))
                narrate += time.process_time() - started
                _write(path, fmt, body, rate)
                with open(path, "r+b") as f:
                    f.seek(0, os.SEEK_END)
                    started = time.process_time()
                    verdict = checker.check(f, fmt, AudioInfo(rate, 1, None), text, None)
                    check += time.process_time() - started
                audio_s += verdict.measurement.duration_s
            print(f"{fmt:<7} | {audio_s / args.rows:>11.2f} | {narrate / audio_s * 1e6:>12,.0f} | "
                  f"{check / audio_s * 1e6:>10,.0f} | {check / narrate:>13.1%}")


def _write(path: Path, fmt: str, body: bytes, rate: int) -> None:
    if fmt != "wav":
        path.write_bytes(body)
        return
    with wave.open(str(path), "wb") as riff:
        riff.setnchannels(1)
        riff.setsampwidth(2)
        riff.setframerate(rate)
        riff.writeframes(body)


if __name__ == "__main__":
    main()
