"""Audio checks: every file measured as it lands, rows outside the bounds flagged, and
`--redo-flagged` narrating them again until a better take lands (at most [checks] max_redo times).

The measurements are held to numbers worked out here from synthetic signals; the files a run
writes are read back by miniaudio, the ledger by SQLite, the export by pyarrow."""

from __future__ import annotations

import hashlib
import json
import math
import wave
from pathlib import Path

import miniaudio
import numpy as np
import pyarrow.csv as pacsv
import pytest
from conftest import FAST_RETRY, cli, ledger_rows, sha, write_csv

from batchtts import checks
from batchtts.audio import AudioInfo
from batchtts.config import Checks
from batchtts.tone import RATE as TONE_RATE
from batchtts.tone import tone_seconds

MODEL = "openai/gpt-4o-mini-tts"
RATE = 24000


def speech_like(seconds: float, rng: np.random.Generator, level: float = 0.1) -> np.ndarray:
    """Noise under a syllable-rate envelope (4 Hz, never below a fifth of its top): loud enough in
    every 10 ms to be sound, never silence, as speech between its pauses."""
    t = np.arange(round(seconds * RATE)) / RATE
    envelope = 0.6 + 0.4 * np.sin(2 * np.pi * 4 * t)
    return (rng.normal(0, level, len(t)) * envelope).astype(np.float32)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * RATE), np.float32)


def db(power: float) -> float:
    return 10 * math.log10(power)


# Measurements, on signals whose answers are known.

def test_a_second_of_silence_inside_speech_like_noise_is_found_and_the_edges_measured():
    rng = np.random.default_rng(5)
    signal = np.concatenate([silence(0.3), speech_like(1.2, rng), silence(0.25), speech_like(0.8, rng), silence(1.0),
                             speech_like(1.5, rng), silence(0.2)])
    m = checks.measure(signal, RATE)
    assert m.duration_s == pytest.approx(len(signal) / RATE, abs=1e-3) == pytest.approx(5.25)
    assert m.max_inner_silence_s == pytest.approx(1.0, abs=0.011)  # found to the 10 ms block, not the 0.25 s pause
    assert m.lead_silence_s == pytest.approx(0.3, abs=0.011) and m.trail_silence_s == pytest.approx(0.2, abs=0.011)
    assert not m.silent and m.clipping == 0
    assert m.rms_db == pytest.approx(db(float(np.mean(signal.astype(np.float64) ** 2))), abs=0.01)
    assert m.peak_db == pytest.approx(20 * math.log10(float(np.abs(signal).max())), abs=0.01)


def test_noise_quieter_than_the_silence_threshold_counts_as_silence_inside():
    rng = np.random.default_rng(6)
    hiss = (rng.normal(0, 10 ** (-60 / 20), round(2.5 * RATE))).astype(np.float32)  # -60 dBFS: a quiet room
    m = checks.measure(np.concatenate([speech_like(1.0, rng), hiss, speech_like(1.0, rng)]), RATE)
    assert m.max_inner_silence_s == pytest.approx(2.5, abs=0.011) and m.lead_silence_s == m.trail_silence_s == 0


def test_clipping_share_is_exact_and_a_loud_sample_short_of_full_scale_is_not_clipped():
    pcm = (np.sin(np.arange(48000) / 10) * 12000).astype(np.int16)
    pcm[100:130] = 32767
    pcm[5000:5017] = -32768
    pcm[9000:9003] = -32767
    pcm[20000:20100] = 32766  # one step under full scale
    m = checks.measure(pcm, RATE)
    assert m.clipping == (30 + 17 + 3) / 48000
    assert m.peak_db == 0.0  # -32768 is full scale
    stereo = np.stack([pcm, np.zeros_like(pcm)], axis=1)
    assert checks.measure(stereo, RATE).clipping == (30 + 17 + 3) / (2 * 48000)


def test_a_sine_measures_as_its_formula_says_and_digital_silence_has_no_level():
    t = np.arange(RATE * 2) / RATE
    m = checks.measure((0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), RATE)
    assert m.peak_db == pytest.approx(20 * math.log10(0.5), abs=0.01)
    assert m.rms_db == pytest.approx(20 * math.log10(0.5 / math.sqrt(2)), abs=0.01)
    quiet = checks.measure(silence(1.5), RATE)
    assert quiet.silent and quiet.peak_db is None and quiet.rms_db is None
    assert quiet.lead_silence_s == quiet.duration_s == 1.5


def test_the_bounds_name_each_reason_and_a_better_take_is_nearer_its_bounds():
    rng = np.random.default_rng(7)
    speech = checks.measure(speech_like(4.0, rng), RATE)
    bounds = Checks(min_duration=1.0, max_duration=30.0)
    assert not checks.judge(speech, 64, bounds).flagged  # 16 characters a second
    fast = checks.judge(speech, 160, bounds)
    assert fast.reasons == ("fast: 40.0 characters/s, over 25",) and fast.chars_per_second == 40
    slow = checks.judge(speech, 20, bounds)
    assert slow.reasons == ("slow: 5.0 characters/s, under 8",)
    mute = checks.judge(checks.measure(silence(4.0), RATE), 64, bounds)
    assert mute.reasons[0].startswith("silent") and mute.distance == math.inf
    clipped = checks.measure((np.clip(speech_like(4.0, rng, level=0.6), -1, 1)).astype(np.float32), RATE)
    assert any(r.startswith("clipping: ") for r in checks.judge(clipped, 64, bounds).reasons)
    long = checks.judge(checks.measure(speech_like(31.0, rng), RATE), 31 * 15, bounds)
    assert long.reasons == ("long: 31.00 s, over 30 s",)
    short = checks.judge(checks.measure(speech_like(0.5, rng), RATE), 8, bounds)
    assert short.reasons == ("short: 0.50 s, under 1 s",)
    worded = checks.judge(speech, 64, bounds, wer=0.9)
    assert worded.reasons == ("wer: 0.90, over 0.75",)
    # A redo take replaces the take kept when it passes, or is nearer its bounds.
    assert fast.replaces(mute) and not mute.replaces(fast) and not mute.replaces(mute)
    assert checks.judge(speech, 64, bounds).replaces(fast)
    assert checks.judge(speech, 130, bounds).replaces(fast) and not fast.replaces(checks.judge(speech, 130, bounds))


@pytest.mark.parametrize("fmt", ["pcm", "wav", "mp3"])
def test_a_file_is_measured_as_written_in_each_format(tmp_path: Path, fmt: str):
    from batchtts.audio import encode_mp3

    rng = np.random.default_rng(8)
    signal = np.concatenate([silence(0.5), speech_like(1.0, rng), silence(1.0), speech_like(1.0, rng)])
    pcm = (signal * 32767).astype(np.int16)
    path = tmp_path / f"a.{fmt}"
    if fmt == "wav":
        with wave.open(str(path), "wb") as riff:
            riff.setnchannels(1)
            riff.setsampwidth(2)
            riff.setframerate(RATE)
            riff.writeframes(pcm.tobytes())
    else:
        path.write_bytes(pcm.tobytes() if fmt == "pcm" else encode_mp3(pcm.tobytes(), RATE))
    frames = len(decoded(path)) if fmt != "pcm" else len(pcm)  # as miniaudio decodes it, at its own rate
    with open(path, "r+b") as f:
        f.seek(0, 2)
        verdict = checks.Checker(Checks()).check(f, fmt, AudioInfo(RATE, 1, None), "x" * 50, None)
        assert f.tell() == path.stat().st_size and not f.closed  # left as found, for publishing
    m = verdict.measurement
    assert m.duration_s == pytest.approx(frames / RATE, abs=1e-3)
    assert m.max_inner_silence_s == pytest.approx(1.0, abs=0.03)
    assert m.lead_silence_s == pytest.approx(0.5, abs=0.06)  # mp3's encoder delay adds a few ms
    assert verdict.chars_per_second == pytest.approx(50 / m.duration_s, abs=0.01) and not verdict.flagged


def test_a_file_that_does_not_decode_is_flagged_not_raised(tmp_path: Path):
    with open(tmp_path / "bad.wav", "w+b") as f:
        f.write(b"RIFF\x24\x00\x00\x00WAVEjunk" + bytes(40))
        verdict = checks.Checker(Checks()).check(f, "wav", AudioInfo(RATE, 1, None), "Hello there.", None)
    assert verdict.flagged and verdict.reasons[0].startswith("undecodable: ") and verdict.distance == math.inf


# A run: the server answers 5% of inputs with silence and 5% with half their speech.

def dataset(n: int) -> list[dict[str, str]]:
    return [{"id": f"u{i:03d}", "text": f"Line {i} of the dataset, spoken at an even pace from start to end.",
             "voice": "alloy"} for i in range(n)]


def run(manifest: Path, out: Path, server, *extra: str | Path):
    return cli("run", manifest, "--out", out, "--model", MODEL, "--base-url", server.url, *FAST_RETRY,
               "--log-format", "json", *extra)


def verdicts(ledger: Path) -> dict[str, dict]:
    """The checks table by key, as SQLite reads it."""
    return ledger_rows(ledger, "checks")


def decoded(path: Path) -> np.ndarray:
    data = path.read_bytes()
    read = miniaudio.wav_read_s16 if data[:4] == b"RIFF" else miniaudio.mp3_read_s16
    return np.frombuffer(read(data).samples, np.int16)


def test_silent_and_half_length_answers_are_flagged_then_redone_once_the_faults_are_off(serve, tmp_path: Path):
    server = serve("--silence-rate", "0.05", "--short-rate", "0.05", "--seed", "2")
    rows = dataset(60)
    manifest = write_csv(tmp_path / "m.csv", rows)
    out = tmp_path / "out"
    first = run(manifest, out, server, "--format", "mp3")
    assert first.returncode == 0, first.stderr  # flagged rows are done: a run of them succeeds
    wrong = {e["input_sha256"]: e["audio"] for e in server.stats()["log"] if "audio" in e}
    by_text = {sha(r["text"]): r["id"] for r in rows}
    silent = {by_text[h] for h, fault in wrong.items() if fault == "silence"}
    short = {by_text[h] for h, fault in wrong.items() if fault == "short"}
    assert len(silent) >= 3 and len(short) >= 3  # as the seed picks them: about 5% each (3 and 4 here)

    found = verdicts(out / "ledger.sqlite")
    assert set(found) == {r["id"] for r in rows}  # every file measured
    assert {k for k, v in found.items() if v["flagged"]} == silent | short
    for key in silent:
        assert found[key]["flag_reasons"].startswith("silent") and found[key]["peak_db"] is None
        assert not decoded(out / f"{key}.mp3").any()  # what the ledger says, the decoder hears
    for key in short:
        assert found[key]["flag_reasons"].startswith("fast: ") and found[key]["chars_per_second"] > 30, found[key]
        assert len(decoded(out / f"{key}.mp3")) / TONE_RATE == pytest.approx(tone_seconds(rows[0]["text"]) / 2, abs=0.2)
    summary = next(e for e in map(json.loads, first.stderr.splitlines()) if e.get("event") == "summary")
    assert (summary["checked"], summary["flagged"]) == (60, len(silent | short))
    status = json.loads(cli("status", out, "--json").stdout)
    assert (status["checked"], status["flagged"]) == (60, len(silent | short))
    assert {f["key"] for f in status["flags"]} == silent | short
    assert f"{len(silent | short)} flagged" in cli("status", out).stdout

    assert cli("export", out, "--to", tmp_path / "r.csv").returncode == 0
    exported = pacsv.read_csv(tmp_path / "r.csv").to_pylist()
    flagged = {r["id"]: r for r in exported if r["flagged"]}
    assert set(flagged) == silent | short and all(r["status"] == "done" for r in flagged.values())
    good = next(r for r in exported if not r["flagged"])
    assert good["chars_per_second"] == pytest.approx(len(good["text"]) / tone_seconds(good["text"]), rel=0.03)
    assert good["lead_silence_s"] < 0.1 and good["max_inner_silence_s"] == 0 and good["clipping"] == 0
    assert good["peak_dbfs"] == pytest.approx(20 * math.log10(6000 / 32768), abs=0.3)  # the tone's amplitude
    kept = {key: (out / f"{key}.mp3").read_bytes() for key in silent | short}

    server.faults(silence_rate=0.0, short_rate=0.0)
    before = server.stats()["requests"]
    redo = run(manifest, out, server, "--format", "mp3", "--redo-flagged")
    assert redo.returncode == 0, redo.stderr
    asked = {by_text[e["input_sha256"]] for e in server.stats()["log"][before:]}
    assert asked == silent | short  # the flagged rows, and no other
    after = verdicts(out / "ledger.sqlite")
    entries = ledger_rows(out / "ledger.sqlite")
    for key in silent | short:
        assert not after[key]["flagged"] and after[key]["redos"] == 1
        samples = decoded(out / f"{key}.mp3")
        # as long as the speech, give or take the mp3 encoder's delay and padding
        assert len(samples) / TONE_RATE == pytest.approx(tone_seconds(rows[0]["text"]), abs=0.2) and samples.any()
        assert (out / f"{key}.mp3").read_bytes() != kept[key]
        assert hashlib.sha256((out / f"{key}.mp3").read_bytes()).hexdigest() == entries[key]["sha256"]
    assert json.loads(cli("status", out, "--json").stdout)["flagged"] == 0
    again = server.stats()["requests"]
    assert run(manifest, out, server, "--format", "mp3", "--redo-flagged").returncode == 0
    assert server.stats()["requests"] == again  # nothing flagged is left to redo


def test_a_redo_keeps_the_better_take_and_stops_after_max_redo(serve, tmp_path: Path):
    server = serve("--silence-rate", "1")
    manifest = write_csv(tmp_path / "m.csv", dataset(1))
    out = tmp_path / "out"
    path = out / "u000.wav"
    assert run(manifest, out, server, "--format", "wav").returncode == 0
    assert verdicts(out / "ledger.sqlite")["u000"]["flag_reasons"].startswith("silent")

    server.faults(silence_rate=0.0, short_rate=1.0)  # half the speech: flagged too, but nearer its bounds
    assert run(manifest, out, server, "--format", "wav", "--redo-flagged").returncode == 0
    half = path.read_bytes()
    take = verdicts(out / "ledger.sqlite")["u000"]
    assert take["flag_reasons"].startswith("fast") and take["redos"] == 1 and decoded(path).any()

    server.faults(silence_rate=1.0, short_rate=0.0)  # worse than the take kept: thrown away
    second = run(manifest, out, server, "--format", "wav", "--redo-flagged")
    assert second.returncode == 0 and path.read_bytes() == half
    assert any(json.loads(line).get("event") == "redo_kept" for line in second.stderr.splitlines())
    take = verdicts(out / "ledger.sqlite")["u000"]
    assert take["flag_reasons"].startswith("fast") and take["redos"] == 2
    assert ledger_rows(out / "ledger.sqlite")["u000"]["sha256"] == hashlib.sha256(half).hexdigest()

    server.faults(silence_rate=0.0)
    before = server.stats()["requests"]
    assert run(manifest, out, server, "--format", "wav", "--redo-flagged").returncode == 0
    assert server.stats()["requests"] == before  # max_redo (2) reached: flagged, with its best take
    assert verdicts(out / "ledger.sqlite")["u000"]["flagged"] == 1 and path.read_bytes() == half


def test_a_long_rows_redo_asks_for_every_chunk_again(serve, tmp_path: Path):
    server = serve("--silence-rate", "1")
    text = ("The first sentence of a long row is here. The second sentence follows it closely. "
            "And the third one ends the row for good.")
    manifest = write_csv(tmp_path / "m.csv", [{"id": "long", "text": text, "voice": "alloy"}])
    out = tmp_path / "out"
    assert run(manifest, out, server, "--format", "wav", "--chunk-chars", "45").returncode == 0
    assert verdicts(out / "ledger.sqlite")["long"]["flag_reasons"].startswith("silent")
    server.faults(silence_rate=0.0)
    before = server.stats()["requests"]
    assert run(manifest, out, server, "--format", "wav", "--chunk-chars", "45", "--redo-flagged").returncode == 0
    assert server.stats()["requests"] - before == ledger_rows(out / "ledger.sqlite")["long"]["chunks"] == 3
    assert not verdicts(out / "ledger.sqlite")["long"]["flagged"] and decoded(out / "long.wav").any()


def test_checks_are_set_in_the_job_file_and_refused_when_wrong(serve, tmp_path: Path):
    server = serve("--short-rate", "1")
    manifest = write_csv(tmp_path / "m.csv", dataset(2))
    job = tmp_path / "job.toml"
    job.write_text(f'manifest = "{manifest}"\nout = "{tmp_path / "out"}"\n[checks]\nmax_chars_per_second = 40\n')
    assert run(job, tmp_path / "out", server, "--format", "pcm").returncode == 0
    assert not any(v["flagged"] for v in verdicts(tmp_path / "out" / "ledger.sqlite").values())  # 33/s is in bounds

    job.write_text(f'manifest = "{manifest}"\nout = "{tmp_path / "off"}"\n[checks]\nenabled = false\n')
    assert run(job, tmp_path / "off", server, "--format", "pcm").returncode == 0
    assert verdicts(tmp_path / "off" / "ledger.sqlite") == {}
    refused = run(job, tmp_path / "off", server, "--redo-flagged")
    assert refused.returncode == 2 and "needs the checks on" in refused.stderr

    job.write_text(f'manifest = "{manifest}"\nout = "{tmp_path / "x"}"\n[checks]\nmax_clipping = 1.5\n')
    wrong = run(job, tmp_path / "x", server)
    assert wrong.returncode == 2 and "[checks] max_clipping must be a number, from 0 to 1" in wrong.stderr
    job.write_text(f'manifest = "{manifest}"\nout = "{tmp_path / "x"}"\n[checks]\nmax_cps = 30\n')
    unknown = run(job, tmp_path / "x", server)
    assert unknown.returncode == 2 and "unknown key in [checks]: max_cps" in unknown.stderr


# --verify asr: PocketSphinx's English model, offline.

@pytest.fixture
def recogniser():
    pytest.importorskip("pocketsphinx")
    from batchtts import asr

    yield asr
    asr.shutdown()


def test_verify_asr_gives_each_english_row_a_word_error_rate(recogniser, tmp_path: Path):
    assert recogniser.word_error_rate("Hello, world!", "hello word") == 0.5
    assert recogniser.word_error_rate("Hello, world!", "") == 1.0 and recogniser.word_error_rate("...", "a") is None
    assert recogniser.is_english(None) and recogniser.is_english("en-GB") and not recogniser.is_english("fr")
    rows = [{"id": "en", "text": "Hello world, this is a test of the speech recogniser.", "voice": "alloy"},
            {"id": "fr", "text": "Bonjour tout le monde, ceci est un essai.", "voice": "fr", "language": "fr"}]
    manifest = write_csv(tmp_path / "m.csv", rows)
    out = tmp_path / "out"
    result = cli("run", manifest, "--out", out, "--model", "local/espeak-ng", "--format", "wav", "--verify", "asr",
                 "--log-format", "json")
    assert result.returncode == 0, result.stderr
    found = verdicts(out / "ledger.sqlite")
    assert 0 <= found["en"]["wer"] < 1  # eSpeak NG's voice is hard on the model, but words come through
    assert found["fr"]["wer"] is None  # the model hears English alone
    # A silent file is heard as no words at all: every word missed, flagged.
    with open(tmp_path / "mute.pcm", "w+b") as f:
        f.write(bytes(RATE * 2 * 2))
        verdict = checks.Checker(Checks(verify="asr")).check(f, "pcm", AudioInfo(RATE, 1, 2.0), "Hello world.", "en")
    assert verdict.wer == 1.0 and "wer: 1.00, over 0.75" in verdict.reasons
