"""The embedded eSpeak NG engine behind `local/*` models and `batchtts serve`, checked with parsers
written here (MPEG frames) and the standard library (RIFF), not with batchtts's own code."""

from __future__ import annotations

import hashlib
import wave
from pathlib import Path

from conftest import ROOT, cli, error_message, http, ledger_rows, write_csv

LOCAL = "local/espeak-ng"
SENTENCE = "The quick brown fox jumps over the lazy dog, and then it rests beside the river for a while."
WORDS = len(SENTENCE.split())

_BITRATES = {  # kbps by bitrate index, layer III
    "1": [0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320],
    "2": [0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160],
}
_RATES = {"1": [44100, 48000, 32000], "2": [22050, 24000, 16000], "2.5": [11025, 12000, 8000]}


def mpeg_frames(data: bytes) -> tuple[int, int, int]:
    """Walk an mp3 frame by frame; returns (frames, sample rate, channels). Fails on any stray byte."""
    pos = 0
    if data[:3] == b"ID3":
        size = data[6] << 21 | data[7] << 14 | data[8] << 7 | data[9]
        pos = 10 + size
    frames, rates, modes = 0, set(), set()
    while pos < len(data):
        header = int.from_bytes(data[pos:pos + 4], "big")
        assert header >> 21 == 0x7FF, f"no frame sync at byte {pos}"
        version = {0: "2.5", 2: "2", 3: "1"}[(header >> 19) & 3]
        assert (header >> 17) & 3 == 1, "not layer III"
        bitrate = _BITRATES["1" if version == "1" else "2"][(header >> 12) & 0xF] * 1000
        rate = _RATES[version][(header >> 10) & 3]
        padding = (header >> 9) & 1
        assert bitrate > 0
        length = (144 if version == "1" else 72) * bitrate // rate + padding
        pos += length
        frames += 1
        rates.add(rate)
        modes.add((header >> 6) & 3)
    assert pos == len(data), "the last frame runs past the end of the file"
    assert len(rates) == 1 and len(modes) == 1
    return frames, rates.pop(), 1 if modes.pop() == 3 else 2


def run_local(tmp_path: Path, rows: list[dict], *extra: str, key: str | None = None):
    manifest = write_csv(tmp_path / "m.csv", rows)
    out = tmp_path / "out"
    result = cli("run", manifest, "--out", out, "--model", LOCAL, *extra, key=key)
    return result, out, ledger_rows(out / "ledger.sqlite") if (out / "ledger.sqlite").exists() else {}


def test_a_sentence_in_mp3_pcm_and_wav_without_a_key(tmp_path):
    rows = [{"id": fmt, "text": SENTENCE, "voice": "alloy", "response_format": fmt} for fmt in ("mp3", "pcm", "wav")]
    result, out, entries = run_local(tmp_path, rows)
    assert result.returncode == 0, result.stderr

    frames, rate, channels = mpeg_frames((out / "mp3.mp3").read_bytes())
    mp3_seconds = frames * 576 / rate
    assert (rate, channels) == (22050, 1)
    with wave.open(str(out / "wav.wav")) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (22050, 1, 2)
        wav_seconds = w.getnframes() / w.getframerate()
        frames_wav = w.readframes(w.getnframes())
    pcm = (out / "pcm.pcm").read_bytes()
    assert abs(len(pcm) - len(frames_wav)) <= 0.02 * len(pcm)  # the same text, wrapped in RIFF or not
    for seconds in (mp3_seconds, wav_seconds, len(pcm) / 2 / 22050):
        assert 0.15 <= seconds / WORDS <= 1.0, seconds
    assert abs(mp3_seconds - wav_seconds) < 0.2
    assert all(e["sample_rate"] == 22050 for e in entries.values())
    assert entries["wav"]["duration_s"] == round(wav_seconds, 3)
    samples = memoryview(pcm).cast("h")
    assert max(abs(s) for s in samples) > 3000  # speech, not silence


def test_distinct_voices_give_different_audio_and_speed_changes_the_rate(tmp_path):
    voices = ["alloy", "nova", "onyx", "echo", "en-us+klatt", "de", "fr"]
    rows = [{"id": v.replace("+", "_"), "text": SENTENCE, "voice": v, "response_format": "pcm"} for v in voices]
    rows.append({"id": "fast", "text": SENTENCE, "voice": "alloy", "response_format": "pcm", "speed": "2"})
    result, out, entries = run_local(tmp_path, rows)
    assert result.returncode == 0, result.stderr
    digests = {hashlib.sha256((out / entries[r["id"]]["path"]).read_bytes()).hexdigest() for r in rows}
    assert len(digests) == len(rows)
    assert entries["fast"]["duration_s"] < 0.7 * entries["alloy"]["duration_s"]


def test_an_unknown_voice_is_refused_before_any_row_is_narrated(tmp_path):
    rows = [{"id": "good", "text": SENTENCE, "voice": "shimmer"}, {"id": "bad", "text": SENTENCE, "voice": "vulcan"},
            {"id": "bad-variant", "text": SENTENCE, "voice": "en-us+nobody"}]
    result, out, entries = run_local(tmp_path, rows)
    message = error_message(result)
    assert result.returncode == 2 and entries == {} and "Traceback" not in result.stderr
    assert "row 2 (id 'bad'): unknown eSpeak NG voice 'vulcan'" in message
    assert "row 3 (id 'bad-variant'): unknown eSpeak NG variant 'nobody'" in message
    assert "batchtts voices" in message


def test_a_mixed_manifest_runs_local_and_remote_rows_in_one_run(serve, tmp_path):
    server = serve()
    rows = [{"id": f"l{i}", "text": f"Local row {i}.", "voice": "nova", "model": LOCAL} for i in range(5)]
    rows += [{"id": f"r{i}", "text": f"Remote row {i}.", "voice": "nova", "model": "openai/gpt-4o-mini-tts"} for i in range(5)]
    manifest = write_csv(tmp_path / "m.csv", rows)
    out = tmp_path / "out"
    missing_key = cli("run", manifest, "--out", out, "--base-url", server.url, key=None)
    assert missing_key.returncode == 2 and server.stats()["requests"] == 0
    result = cli("run", manifest, "--out", out, "--base-url", server.url, "--format", "wav")
    assert result.returncode == 0, result.stderr
    entries = ledger_rows(out / "ledger.sqlite")
    assert len(entries) == 10 and all(e["status"] == "done" for e in entries.values())
    assert server.stats()["requests"] == 5
    assert {entries[f"l{i}"]["sample_rate"] for i in range(5)} == {22050}
    assert {entries[f"r{i}"]["sample_rate"] for i in range(5)} == {24000}


def test_the_demo_job_narrates_offline(tmp_path):
    result = cli("run", ROOT / "jobs" / "demo.toml", "--out", tmp_path / "demo", key=None)
    assert result.returncode == 0, result.stderr
    files = sorted(p.name for p in (tmp_path / "demo").iterdir() if p.suffix in (".mp3", ".wav"))
    assert len(files) == 6 and any(f.endswith(".wav") for f in files) and any(f.endswith(".mp3") for f in files)
    assert (tmp_path / "demo" / "ledger.sqlite").exists()
    assert f"files in {tmp_path / 'demo'}" in result.stdout


def test_serve_answers_with_the_engine_by_default(serve):
    server = serve("--engine", "espeak")
    speech = f"{server.url}/audio/speech"
    ok = http.post(speech, json={"model": "openai/gpt-4o-mini-tts", "input": SENTENCE, "voice": "coral"})
    assert ok.status_code == 200 and ok.headers["content-type"] == "audio/pcm;rate=22050;channels=1"
    assert 0.15 <= len(ok.content) / 2 / 22050 / WORDS <= 1.0
    mp3 = http.post(speech, json={"model": "openai/gpt-4o-mini-tts", "input": SENTENCE, "voice": "coral", "response_format": "mp3"})
    assert mpeg_frames(mp3.content)[1] == 22050
    bad = http.post(speech, json={"model": "openai/gpt-4o-mini-tts", "input": SENTENCE, "voice": "vulcan"})
    assert bad.status_code == 400 and "vulcan" in bad.json()["error"]["message"]


def test_voices_lists_openai_names_espeak_voices_and_variants():
    result = cli("voices", key=None)
    assert result.returncode == 0
    for expected in ("alloy", "verse", "en-us", "fr-be", "French (France)", "f3", "klatt"):
        assert expected in result.stdout
    remote = cli("voices", "--model", "openai/gpt-4o-mini-tts", key=None)
    assert "remote provider" in remote.stdout and "shimmer" in remote.stdout
