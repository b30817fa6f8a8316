"""Mastering and QC: files made to a store's spec, measured back with readers that are not ours.

Each mastered file is decoded here with PyAV and measured here: loudness by pyloudnorm, true peak by
a 4x oversampling with scipy, RMS, peaks and the room tone with numpy; the mp3 framing by mutagen.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import threading
import time
import wave
from pathlib import Path

import av
import mutagen.mp3
import numpy as np
import pytest
from conftest import FAST_RETRY, cli, error_message, ledger_rows, start_batchtts, write_csv

from batchtts import mastering
from batchtts.captions import Cue, render
from batchtts.decoding import PcmShape
from batchtts.ledger import MASTERED
from batchtts.mastering import (
    MEASUREMENTS,
    PRESETS,
    MasteringCancelled,
    Measurement,
    MemoryBudget,
    check,
    master,
    measure,
    measure_file,
)
from batchtts.storage import OutputFolder

LOCAL = ("--model", "local/espeak-ng", "--voice", "alloy")
TEXTS = ["The first chapter begins on a cold morning by the sea.",
         "In the second, the ship sails at dawn. All hands are aboard."]
RATE = 48000


# --- readers of our own, for the tests: PyAV to decode, pyloudnorm and scipy to measure ----------

def decode(path: Path) -> tuple[np.ndarray, int]:
    """The file's samples as float64 (frames, channels), full scale ±1, and its rate."""
    pieces = []
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate
        for frame in container.decode(stream):
            data = frame.to_ndarray()
            channels = len(frame.layout.channels)
            data = data.T if frame.format.is_planar else data.reshape(-1, channels)
            if np.issubdtype(data.dtype, np.integer):
                data = data / float(np.iinfo(data.dtype).max + 1)
            pieces.append(data.astype(np.float64))
    return np.concatenate(pieces), rate


def db(power: float) -> float:
    return 10 * np.log10(power)


def true_peak_db(samples: np.ndarray) -> float:
    """The peak of a 4x oversampling. scipy.signal (which pyloudnorm loads too) takes a second to
    import: it is loaded by the tests that measure, not by every process that collects this file."""
    from scipy.signal import resample_poly

    return 20 * np.log10(np.abs(resample_poly(samples, 4, 1, axis=0)).max())


def loudness_lufs(samples: np.ndarray, rate: int) -> float:
    """Integrated loudness by pyloudnorm (BS.1770)."""
    import pyloudnorm

    return pyloudnorm.Meter(rate).integrated_loudness(samples)


def room_tone(samples: np.ndarray, rate: int) -> tuple[float, float, float]:
    """Seconds of quiet (10 ms blocks under -50 dBFS) at the head and tail, and their RMS in dB."""
    block = rate // 100
    usable = len(samples) // block * block
    levels = np.square(samples[:usable]).mean(axis=1).reshape(-1, block).mean(axis=1)
    loud = np.flatnonzero(levels > 10 ** (-50 / 10))
    head, tail = loud[0], len(levels) - loud[-1] - 1
    quiet = np.concatenate([samples[:head * block], samples[usable - tail * block:usable]])
    return head / 100, tail / 100, db(np.square(quiet).mean())


def speech_onset(samples: np.ndarray, rate: int) -> float:
    """Seconds before the first 10 ms block within 30 dB of the file's RMS: where the speech starts."""
    block = rate // 100
    levels = np.square(samples[: len(samples) // block * block]).mean(axis=1).reshape(-1, block).mean(axis=1)
    return np.flatnonzero(levels > np.square(samples).mean() / 1000)[0] / 100


def cue_times(path: Path) -> list[tuple[float, float, str]]:
    """A caption file's cues, read by FFmpeg's subtitle demuxer (PyAV): start, end and text."""
    with av.open(str(path)) as container:
        stream = container.streams.subtitles[0]
        return [(float(p.pts * stream.time_base), float((p.pts + p.duration) * stream.time_base),
                 bytes(p).decode().strip()) for p in container.demux(stream) if p.pts is not None]


def write_wav(path: Path, samples: np.ndarray, rate: int = RATE) -> None:
    """16-bit pcm: samples of shape (frames,) or (frames, channels)."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1 if samples.ndim == 1 else samples.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((samples * 32767).astype("<i2").tobytes())


def mastered_records(out: Path) -> dict[str, dict]:
    return ledger_rows(out / "ledger.sqlite", "mastered")


def events(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def manifest(tmp_path: Path, texts: list[str] = TEXTS, **columns: str) -> Path:
    return write_csv(tmp_path / "m.csv", [{"id": f"ch{i + 1}", "text": t, **columns} for i, t in enumerate(texts)])


def sine(db_fs: float, seconds: float, frequency: float = 997.0, rate: int = RATE, phase: float = 0.0) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (10 ** (db_fs / 20) * np.sin(2 * np.pi * frequency * t + phase)).astype(np.float32)


def noise(db_rms: float, seconds: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(round(seconds * RATE)) * 10 ** (db_rms / 20)).astype(np.float32)


# --- measure() on signals of known levels -------------------------------------------------------

def test_a_sine_at_minus_20_dbfs_measures_as_the_books_say():
    m = measure(sine(-20, 5), RATE)
    assert m.peak_db == pytest.approx(-20, abs=0.01)
    assert m.rms_db == pytest.approx(-23.01, abs=0.01)  # a sine's RMS is its peak less 3.01 dB
    assert m.loudness_lufs == pytest.approx(-23.0, abs=0.1)  # BS.1770: a 1 kHz sine in one channel
    assert m.true_peak_db == pytest.approx(-20, abs=0.05)
    assert m.length_s == pytest.approx(5) and m.sample_rate == RATE and m.channels == 1
    assert m.head_s == 0 and m.tail_s < 0.011 and m.noise_floor_db == pytest.approx(-23.01, abs=0.05)


def test_true_peak_finds_what_lies_between_the_samples():
    # A quarter of the rate, sampled 45 degrees off its crests: every sample sits 3 dB under the peak.
    m = measure(sine(-6, 2, frequency=RATE / 4, phase=np.pi / 4), RATE)
    assert m.peak_db == pytest.approx(-9.01, abs=0.05)
    assert m.true_peak_db == pytest.approx(-6, abs=0.3)


def test_noise_floor_head_tail_and_room_tone_of_a_narration_like_signal():
    signal = np.concatenate([noise(-70, 0.7, 1), sine(-18, 2), noise(-65, 1.0, 2), sine(-18, 2), noise(-70, 1.5, 3)])
    m = measure(signal, RATE)
    assert m.head_s == pytest.approx(0.7, abs=0.011) and m.tail_s == pytest.approx(1.5, abs=0.011)
    assert m.room_tone_db == pytest.approx(-70, abs=0.3)
    assert m.noise_floor_db == pytest.approx(-70, abs=0.5)  # the quietest half second: the tail's
    assert m.length_s == pytest.approx(7.2)


def test_stereo_short_and_silent_signals():
    stereo = np.stack([sine(-20, 1), sine(-20, 1)], axis=1)
    m = measure(stereo, RATE)
    assert m.channels == 2 and m.loudness_lufs == pytest.approx(-20.0, abs=0.1)  # two channels: 3 dB louder
    assert measure(sine(-20, 0.3), RATE).loudness_lufs is None  # shorter than one gating block
    silent = measure(np.zeros(RATE, np.float32), RATE)
    assert (silent.rms_db, silent.peak_db, silent.true_peak_db, silent.room_tone_db) == (None, None, None, None)
    assert silent.head_s == silent.tail_s == 1.0


def test_check_says_what_misses_the_spec():
    good = Measurement(loudness_lufs=-19.0, rms_db=-20.1, peak_db=-4.2, true_peak_db=-4.1, noise_floor_db=-72.0,
                       head_s=0.76, tail_s=2.0, room_tone_db=-72.0, length_s=600.0, sample_rate=44100, channels=1,
                       container="mp3", bitrate_kbps=192)
    assert check(good, PRESETS["acx"]).passed
    assert check(good, PRESETS["none"]).passed
    bad = Measurement(loudness_lufs=-30.0, rms_db=-31.5, peak_db=-1.0, true_peak_db=0.4, noise_floor_db=-50.0,
                      head_s=0.1, tail_s=0.2, room_tone_db=None, length_s=7300.0, sample_rate=22050, channels=1,
                      container="mp3", bitrate_kbps=64)
    acx = check(bad, PRESETS["acx"]).problems
    assert [p.split(" ")[0] for p in acx] == ["RMS", "peak", "noise", "0.10", "0.20", "the", "121.7", "22050", "mp3"]
    assert "digital silence" in acx[5] and "not 0.5 to 1" in acx[3] and "not mp3 at 192 kbps" in acx[8]
    podcast = check(bad, PRESETS["podcast"]).problems
    assert podcast == ("integrated loudness -30.0 LUFS, not -17 to -15", "true peak 0.4 dBTP, above -1",
                       "22050 Hz, not 44100")


def test_every_measurement_has_its_ledger_column():
    assert set(MEASUREMENTS) <= set(MASTERED.names)


def test_raw_pcm_is_measured_with_the_shape_the_ledger_gives(tmp_path):
    samples = (sine(-12, 1, rate=24000) * 32767).astype("<i2")
    (tmp_path / "a.pcm").write_bytes(samples.tobytes())
    with wave.open(str(tmp_path / "a.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(24000)
        w.writeframes(samples.tobytes())
    raw, riff = measure_file(tmp_path / "a.pcm", PcmShape(24000, 1)), measure_file(tmp_path / "a.wav")
    assert raw.rms_db == pytest.approx(riff.rms_db) and raw.length_s == riff.length_s == 1.0
    assert (raw.container, riff.container) == ("s16le", "wav")


def test_a_stopped_master_leaves_nothing_under_its_name(tmp_path):
    src = tmp_path / "src.wav"
    write_wav(src, sine(-20, 3))
    scratch = tmp_path / "scratch"
    asked: list[list[str]] = []

    def cancelled() -> bool:  # asked before each frame: the sixth is stopped
        asked.append([p.name for p in scratch.iterdir()])
        return len(asked) > 5

    with pytest.raises(MasteringCancelled):
        master(src, tmp_path / "out" / "src.mp3", PRESETS["podcast"], scratch=scratch, cancelled=cancelled)
    assert [name.startswith(".src.mp3.mastering-") for name in asked[-1]] == [True]  # stopped while encoding
    assert not (tmp_path / "out" / "src.mp3").exists()
    assert list(scratch.iterdir()) == []


def test_captions_move_with_the_speech_and_stay_within_the_mastered_file(tmp_path):
    # 1.5 s of silence, 2 s of "speech", 4 s of silence: ACX's head (0.75 s) and tail (2 s) take the
    # place of the silences, so the speech starts 0.73 s sooner and the file ends 2 s sooner.
    src = tmp_path / "ch01.wav"
    write_wav(src, np.concatenate([np.zeros(round(1.5 * RATE), np.float32), sine(-20, 2), np.zeros(4 * RATE, np.float32)]))
    written = [Cue(0.0, 1.5, "Before the speech."), Cue(1.5, 2.5, "Salt & <pepper>."), Cue(2.5, 7.5, "To the end.")]
    for fmt in ("srt", "vtt"):
        (tmp_path / f"ch01.{fmt}").write_text(render(written, fmt))
    dst = tmp_path / "mastered" / "ch01.mp3"
    master(src, dst, PRESETS["acx"], scratch=tmp_path / "scratch")
    samples, rate = decode(dst)
    length, onset = len(samples) / rate, speech_onset(samples, rate)
    assert onset == pytest.approx(0.77, abs=0.02)  # the head, and the 20 ms kept before the speech
    for fmt, said in (("srt", "Salt & <pepper>."), ("vtt", "Salt &amp; &lt;pepper&gt;.")):
        cues = cue_times(dst.with_suffix(f".{fmt}"))
        assert [text for *_, text in cues] == ["Before the speech.", said, "To the end."]
        (first_start, first_end, _), (start, end, _), (last_start, last_end, _) = cues
        assert first_start == 0 and first_end == pytest.approx(start, abs=0.001)  # begun in the silence cut: from 0
        assert start == pytest.approx(onset, abs=0.05)  # the speech's cue where the speech now starts
        assert (end - start, last_start - start) == (pytest.approx(1.0, abs=0.001), pytest.approx(1.0, abs=0.001))
        assert last_end == pytest.approx(length, abs=0.002)  # cut at the end of the file, not 2 s past it
    assert sorted(p.name for p in dst.parent.iterdir()) == ["ch01.mp3", "ch01.srt", "ch01.vtt"]
    assert list((tmp_path / "scratch").iterdir()) == []
    (tmp_path / "ch01.vtt").unlink()  # narrated again, with SRT captions only
    master(src, dst, PRESETS["acx"], scratch=tmp_path / "scratch")
    assert sorted(p.name for p in dst.parent.iterdir()) == ["ch01.mp3", "ch01.srt"]


@pytest.mark.parametrize("foreseen, passes", [((3.0, 3.0), True), ((3.0, 9.0), False)])
def test_a_file_that_misses_its_level_is_made_once_more_and_no_more(tmp_path, monkeypatch, foreseen, passes):
    src = tmp_path / "tone.wav"
    write_wav(src, sine(-20, 3))
    renders = []
    real_render = mastering._render
    monkeypatch.setattr(mastering, "_render", lambda *args: renders.append(1) or real_render(*args))
    wrong = iter(foreseen)  # the encoder foreseen to add 3 dB (then 9) that it does not: the file comes out quieter
    monkeypatch.setattr(mastering, "_encoder_gain", lambda *args: next(wrong))
    measured = master(src, tmp_path / "tone.mp3", PRESETS["podcast"])
    assert len(renders) == 2  # the miss measured, one pass corrected by it, and never a third
    samples, rate = decode(tmp_path / "tone.mp3")
    loudness = loudness_lufs(samples, rate)
    assert measured.loudness_lufs == pytest.approx(loudness, abs=0.05)
    assert check(measured, PRESETS["podcast"]).passed is passes and bool(-17 <= loudness <= -15) is passes


def test_a_stereo_narration_stays_stereo_with_its_channels_apart(tmp_path):
    quiet = np.zeros((RATE // 2, 2), np.float32)
    src = tmp_path / "duet.wav"
    write_wav(src, np.concatenate([quiet, np.stack([sine(-10, 3), sine(-20, 3, frequency=660)], axis=1), quiet]))
    for name in ("acx", "podcast"):
        dst = tmp_path / f"duet-{name}.mp3"
        master(src, dst, PRESETS[name])
        samples, rate = decode(dst)
        assert samples.shape[1] == 2 and mutagen.mp3.MP3(dst).info.channels == 2
        middle = samples[round(1.5 * rate):round(2.5 * rate)]
        left, right = (db(np.square(middle[:, channel]).mean()) for channel in (0, 1))
        assert left - right == pytest.approx(10, abs=0.5), name  # one gain for both, neither mixed into the other


def test_the_memory_budget_runs_a_file_too_big_for_it_alone():
    budget = MemoryBudget(100)
    order: list[str] = []
    inside, release = threading.Event(), threading.Event()

    def big() -> None:
        with budget.held(500):  # more than the whole budget: held alone
            order.append("big in")
            inside.set()
            release.wait(10)
            order.append("big out")

    def small() -> None:
        inside.wait(10)
        with budget.held(30):
            order.append("small in")

    threads = [threading.Thread(target=big), threading.Thread(target=small)]
    for t in threads:
        t.start()
    inside.wait(10)
    time.sleep(0.05)  # a chance for the small file to get in, were it let
    assert order == ["big in"]
    release.set()
    for t in threads:
        t.join(10)
    assert order == ["big in", "big out", "small in"]
    with budget.held(100), budget.held(50, stop=lambda: True):  # a stop ends the wait, holding nothing
        pass
    with budget.held(100):  # all of it free again
        pass


# --- runs that master ---------------------------------------------------------------------------

def test_podcast_masters_are_at_minus_16_lufs_under_minus_1_dbtp_at_44_1_khz(tmp_path):
    out = tmp_path / "out"
    result = cli("run", manifest(tmp_path), "--out", out, *LOCAL, "--master", "podcast", "--log-format", "json")
    assert result.returncode == 0, result.stderr
    assert "mastered 2 files to podcast" in result.stdout
    rows, made = ledger_rows(out / "ledger.sqlite"), mastered_records(out)
    assert set(made) == {"ch1", "ch2"}
    for key, record in made.items():
        path = out / "mastered" / f"{key}.mp3"
        assert record["path"] == f"mastered/{key}.mp3" and record["status"] == "done" and record["passed"] == 1
        assert record["preset"] == "podcast" and record["source_sha256"] == rows[key]["sha256"]
        assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        samples, rate = decode(path)
        assert rate == 44100
        loudness = loudness_lufs(samples, rate)
        assert -17 <= loudness <= -15, (key, loudness)
        assert true_peak_db(samples) <= -1, key
        assert record["loudness_lufs"] == pytest.approx(loudness, abs=0.05)
    summary = next(e for e in events(result.stderr) if e["event"] == "summary")
    assert (summary["preset"], summary["mastered"], summary["master_failed"]) == ("podcast", 2, 0)


def test_acx_masters_meet_the_acx_spec_set_in_the_job_file(tmp_path):
    out = tmp_path / "out"
    job = tmp_path / "job.toml"
    job.write_text(f'manifest = "{manifest(tmp_path)}"\nout = "{out}"\ncaptions = "vtt"\n[defaults]\n'
                   'model = "local/espeak-ng"\nvoice = "alloy"\nformat = "wav"\n[mastering]\npreset = "acx"\n')
    result = cli("run", job)
    assert result.returncode == 0, result.stderr
    for key in ("ch1", "ch2"):
        path = out / "mastered" / f"{key}.mp3"  # from ch1.wav: the preset's container
        # The captions beside it: each cue as far from the start of the speech as it was in the narration.
        narrated, mastered = cue_times(out / f"{key}.vtt"), cue_times(out / "mastered" / f"{key}.vtt")
        assert [c[2] for c in mastered] == [c[2] for c in narrated] and len(mastered) == 1 + (key == "ch2")  # sentences
        narrated_onset, onset = speech_onset(*decode(out / f"{key}.wav")), speech_onset(*decode(path))
        for (start, _, _), (was, _, _) in zip(mastered, narrated, strict=True):
            assert start - onset == pytest.approx(was - narrated_onset, abs=0.05), (key, start, onset, was, narrated_onset)
        assert mastered[-1][1] <= mutagen.mp3.MP3(path).info.length + 0.001
        info = mutagen.mp3.MP3(path).info
        assert (info.sample_rate, round(info.bitrate / 1000), info.bitrate_mode) == (44100, 192, mutagen.mp3.BitrateMode.CBR)
        assert info.channels == 1  # as narrated
        samples, rate = decode(path)
        assert rate == 44100
        assert -23 <= db(np.square(samples).mean()) <= -18
        assert 20 * np.log10(np.abs(samples).max()) <= -3
        head, tail, tone = room_tone(samples, rate)
        assert 0.5 <= head <= 1.0 and 1.0 <= tail <= 5.0, (head, tail)
        assert -90 < tone <= -60, tone  # the quiet of a room: low, but not digital silence
        quiet = samples[: int(head * rate)]
        assert np.count_nonzero(quiet) > 0.9 * quiet.size
    assert cli("qc", out, "--json").returncode == 0


def test_switching_the_preset_masters_again_without_a_request(serve, tmp_path):
    server = serve()
    out = tmp_path / "out"
    run = ("run", manifest(tmp_path), "--out", out, "--model", "openai/gpt-4o-mini-tts", "--voice", "alloy",
           "--base-url", server.url, *FAST_RETRY, "--log-format", "json")
    assert cli(*run, "--master", "podcast").returncode == 0
    assert server.stats()["requests"] == 2
    before = mastered_records(out)
    assert {r["preset"] for r in before.values()} == {"podcast"}
    assert all(round(mutagen.mp3.MP3(out / r["path"]).info.bitrate / 1000) == 128 for r in before.values())

    result = cli(*run, "--master", "acx")
    assert result.returncode == 0, result.stderr
    assert server.stats()["requests"] == 2  # nothing narrated again: the narrated files are mastered anew
    after = mastered_records(out)
    assert {r["preset"] for r in after.values()} == {"acx"}
    for key, record in after.items():
        assert record["sha256"] != before[key]["sha256"] and record["updated_at"] > before[key]["updated_at"]
        assert record["sha256"] == hashlib.sha256((out / record["path"]).read_bytes()).hexdigest()
        assert round(mutagen.mp3.MP3(out / record["path"]).info.bitrate / 1000) == 192
        assert 0.5 <= room_tone(*decode(out / record["path"]))[0] <= 1.0

    again = cli(*run, "--master", "acx")  # the same preset and audio: nothing to do
    summary = next(e for e in events(again.stderr) if e["event"] == "summary")
    assert (summary["mastered"], summary["mastered_before"]) == (0, 2)
    assert mastered_records(out) == after and server.stats()["requests"] == 2
    assert "mastering" not in [e["event"] for e in events(again.stderr)]


def test_a_file_that_cannot_be_mastered_fails_alone(tmp_path):
    out = tmp_path / "out"
    m = manifest(tmp_path, [*TEXTS, "A third and final chapter, short and sweet."])
    assert cli("run", m, "--out", out, *LOCAL).returncode == 0
    broken = out / "ch2.mp3"
    broken.write_bytes(bytes(broken.stat().st_size))  # damaged on disk: the size the ledger recorded, no audio
    result = cli("run", m, "--out", out, *LOCAL, "--master", "acx", "--log-format", "json")
    assert result.returncode == 1
    assert "narrated 0 rows" in result.stdout
    assert "mastered 2 files to acx" in result.stdout and "could not master row 2 (ch2):" in result.stdout
    failed = [e for e in events(result.stderr) if e["event"] == "master_failed"]
    assert [(e["row"], e["id"]) for e in failed] == [(2, "ch2")]
    made = mastered_records(out)
    assert (made["ch2"]["status"], made["ch2"]["path"]) == ("failed", None) and made["ch2"]["error"]
    assert made["ch1"]["status"] == made["ch3"]["status"] == "done"
    assert sorted(p.name for p in (out / "mastered").iterdir()) == ["ch1.mp3", "ch3.mp3"]
    qc = cli("qc", out)
    assert qc.returncode == 1 and "not mastered" in qc.stdout


def test_a_mastered_file_never_overwrites_a_narrated_one_or_another_mastered_one(tmp_path):
    out = tmp_path / "out"
    m = write_csv(tmp_path / "m.csv", [{"id": "ch1", "text": TEXTS[0]},
                                       {"id": "extra", "text": TEXTS[1], "output": "mastered/ch1"}])
    refused = cli("run", m, "--out", out, *LOCAL, "--master", "podcast")  # mastered/ is batchtts's own
    assert refused.returncode == 2 and "'mastered/ch1' is a name batchtts uses itself" in error_message(refused)
    assert not list(out.glob("**/*.mp3"))
    m = write_csv(tmp_path / "m.csv", [{"id": "a", "text": TEXTS[0], "response_format": "wav"},
                                       {"id": "b", "text": TEXTS[1], "output": "a", "response_format": "mp3"}])
    result = cli("run", m, "--out", out, *LOCAL, "--master", "podcast")
    assert result.returncode == 1
    assert "could not master row 2 (b): row 1's mastered file is mastered/a.mp3 too" in result.stdout
    assert sorted(p.name for p in (out / "mastered").iterdir()) == ["a.mp3"]
    assert mastered_records(out)["a"]["sha256"] == hashlib.sha256((out / "mastered" / "a.mp3").read_bytes()).hexdigest()


def test_a_stopped_or_killed_run_leaves_no_half_mastered_file_and_a_rerun_finishes(tmp_path):
    out = tmp_path / "out"
    m = manifest(tmp_path, [" ".join(TEXTS * 4), " ".join(TEXTS[::-1] * 4)])  # 20 s each: a signal finds them mastering
    assert cli("run", m, "--out", out, *LOCAL).returncode == 0
    command = ("run", m, "--out", out, *LOCAL, "--master", "acx", "--log-format", "json")

    def started_mastering() -> subprocess.Popen[str]:
        proc = start_batchtts(*command)
        while (line := proc.stderr.readline()) and '"event": "mastering"' not in line:
            pass
        return proc

    proc = started_mastering()
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "interrupted by SIGINT while mastering" in stdout
    assert not OutputFolder(out, out / "ledger.sqlite").partial_dir.exists()  # the stopped files' work removed

    proc = started_mastering()
    proc.kill()
    proc.communicate(timeout=30)
    made = mastered_records(out)
    for path in (out / "mastered").glob("*"):  # none, or whole files under their final names
        assert path.name in {"ch1.mp3", "ch2.mp3"}
        samples, rate = decode(path)
        assert len(samples) / rate == pytest.approx(mutagen.mp3.MP3(path).info.length, abs=0.05)
        if path.stem in made:  # recorded once renamed into place; a kill in between leaves it to be made again
            assert made[path.stem]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    folder = OutputFolder(out, out / "ledger.sqlite")
    folder.partial_dir.mkdir(parents=True, exist_ok=True)
    (folder.partial_dir / ".ch1.mp3.mastering-1-0").write_bytes(b"half")  # as a kill mid-encoding leaves it

    result = cli(*command)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (out / "mastered").iterdir()) == ["ch1.mp3", "ch2.mp3"]
    assert all(r["status"] == "done" for r in mastered_records(out).values())
    assert not folder.partial_dir.exists()


def test_mastering_refuses_an_object_store_output(tmp_path):
    result = cli("run", manifest(tmp_path), "--out", "s3://bucket/book", "--ledger", tmp_path / "l.sqlite", *LOCAL,
                 "--master", "acx")
    assert result.returncode == 2
    assert "local" in error_message(result) and "s3://bucket/book" in error_message(result)
    bad = tmp_path / "job.toml"
    bad.write_text(f'manifest = "{tmp_path / "m.csv"}"\nout = "{tmp_path / "out"}"\n[mastering]\npreset = "loud"\n')
    refused = cli("run", bad, *LOCAL)
    assert refused.returncode == 2 and '[mastering] preset (--master) must be one of "acx"' in error_message(refused)


# --- qc and export ------------------------------------------------------------------------------

def test_qc_fails_a_too_quiet_narration_against_acx(tmp_path):
    out = tmp_path / "out"
    m = manifest(tmp_path)
    assert cli("run", m, "--out", out, *LOCAL, "--format", "wav").returncode == 0
    with wave.open(str(out / "ch2.wav"), "rb") as r:
        params, frames = r.getparams(), np.frombuffer(r.readframes(r.getnframes()), "<i2")
    with wave.open(str(out / "ch2.wav"), "wb") as w:  # 40 dB down, the size the ledger recorded
        w.setparams(params)
        w.writeframes((frames * 0.01).astype("<i2").tobytes())

    unchosen = cli("qc", out)
    assert unchosen.returncode == 2 and "--preset" in unchosen.stderr
    assert cli("qc", tmp_path / "nowhere", "--preset", "acx").returncode == 2
    assert cli("qc", out, "--preset", "loud").returncode == 2

    table = cli("qc", out, "--preset", "acx")
    assert table.returncode == 1
    assert "FAIL acx" in table.stdout and "2 files: 0 pass, 2 fail" in table.stdout
    lines = cli("qc", out, "--preset", "acx", "--json")
    assert lines.returncode == 1
    found = {r["id"]: r for r in map(json.loads, lines.stdout.splitlines())}
    quiet, loud = found["ch2"], found["ch1"]
    samples, _ = decode(out / "ch2.wav")
    assert quiet["rms_db"] == pytest.approx(db(np.square(samples).mean()), abs=0.01)
    assert quiet["rms_db"] < -50 and any(p.startswith("RMS") for p in quiet["problems"])
    assert not any(p.startswith("RMS") for p in loud["problems"])  # espeak narrates at a sound level...
    assert "22050 Hz, not 44100" in loud["problems"]  # ... but not at ACX's rate
    assert cli("qc", out, "--preset", "podcast").returncode == 1


def test_export_carries_the_mastered_file_and_its_measurements(tmp_path):
    out = tmp_path / "out"
    assert cli("run", manifest(tmp_path), "--out", out, *LOCAL, "--master", "podcast").returncode == 0
    result = cli("export", out, "--to", "-", "--format", "jsonl")
    assert result.returncode == 0
    records = [json.loads(line) for line in result.stdout.splitlines()]
    made = mastered_records(out)
    for r in records:
        assert r["mastered_path"] == f"mastered/{r['id']}.mp3" and r["preset"] == "podcast" and r["meets_preset"]
        assert r["loudness_lufs"] == made[r["id"]]["loudness_lufs"] and r["true_peak_db"] <= -1
    os.remove(out / "mastered" / "ch1.mp3")
    records = {json.loads(line)["id"]: json.loads(line) for line in
               cli("export", out, "--to", "-", "--format", "jsonl").stdout.splitlines()}
    assert records["ch1"]["mastered_path"] is None and records["ch2"]["mastered_path"] == "mastered/ch2.mp3"
    qc = cli("qc", out)
    assert qc.returncode == 1 and "mastered/ch1.mp3 is missing" in qc.stdout
    again = cli("run", manifest(tmp_path), "--out", out, *LOCAL, "--master", "podcast")
    assert again.returncode == 0 and "mastered 1 file to podcast" in again.stdout and "(1 mastered before)" in again.stdout
    assert cli("qc", out).returncode == 0
