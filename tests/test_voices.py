"""Several voices in one chapter: voice markup and the [voices] table, breaks, and one stitched file."""

from __future__ import annotations

import av
import numpy as np
import pytest
from conftest import cli, ledger_rows, sha, write_csv

from batchtts.markup import Cast, MarkupError, stretches
from batchtts.tone import RATE as TONE_RATE

MODEL = "openai/gpt-4o-mini-tts"
BOB = "I have kept this light for thirty years, and I have never once seen the sea so calm as it is tonight."
ALICE = "Then you have not been watching closely, because the sea is always calm just before the worst of it."


def decode(path) -> tuple[np.ndarray, int]:
    """The file's samples as floats in [-1, 1] (first channel), decoded by FFmpeg through PyAV."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        rate = stream.sample_rate
        frames = [frame.to_ndarray() for frame in container.decode(stream)]
    samples = np.concatenate([f[0] if f.ndim == 2 and f.shape[0] < f.shape[1] else f.reshape(-1) for f in frames])
    if samples.dtype.kind == "i":
        samples = samples / float(np.iinfo(samples.dtype).max)
    return samples.astype(np.float64), rate


def pitch(samples: np.ndarray, rate: int) -> float:
    """Median fundamental frequency of the voiced 40 ms frames, by autocorrelation (60-400 Hz)."""
    window, hop = int(0.04 * rate), int(0.01 * rate)
    low, high = int(rate / 400), int(rate / 60)
    found = []
    for at in range(0, len(samples) - window, hop):
        frame = samples[at:at + window] - samples[at:at + window].mean()
        if np.sqrt(np.mean(frame ** 2)) < 0.02:
            continue  # silence or breath
        correlation = np.correlate(frame, frame, "full")[window - 1:]
        lag = low + int(np.argmax(correlation[low:high]))
        if correlation[lag] > 0.5 * correlation[0]:  # voiced: a clear period
            found.append(rate / lag)
    assert len(found) > 20, "too few voiced frames to judge a pitch"
    return float(np.median(found))


def silences(samples: np.ndarray, rate: int, shortest: float = 0.2) -> list[tuple[float, float]]:
    """Runs of digital silence at least `shortest` seconds long, as (start, length) in seconds."""
    quiet = np.abs(samples) < 1e-4
    edges = np.flatnonzero(np.diff(np.concatenate(([0], quiet.astype(np.int8), [0]))))
    runs = [(a / rate, (b - a) / rate) for a, b in zip(edges[::2], edges[1::2], strict=True)]
    return [run for run in runs if run[1] >= shortest]


def test_a_chapter_in_two_voices_is_one_file_whose_halves_sound_apart(tmp_path):
    (tmp_path / "job.toml").write_text(
        'manifest = "m.csv"\nout = "out"\n[defaults]\nmodel = "local/espeak-ng"\nvoice = "alloy"\nformat = "mp3"\n'
        '[voices]\nBob = "en-us+m3"\nAlice = { "local/espeak-ng" = "en-us+f3", "openai/" = "nova" }\n')
    write_csv(tmp_path / "m.csv", [{"id": "ch", "text": f'<voice name="Bob">{BOB}</voice>\n'
                                                         f'<voice name="Alice">{ALICE}</voice>'}])
    result = cli("run", tmp_path / "job.toml")
    assert result.returncode == 0, result.stderr
    files = sorted(p.name for p in (tmp_path / "out").iterdir() if p.suffix == ".mp3")
    assert files == ["ch.mp3"] and ledger_rows(tmp_path / "out" / "ledger.sqlite")["ch"]["chunks"] == 2
    samples, rate = decode(tmp_path / "out" / "ch.mp3")
    third = len(samples) // 3  # the two sentences are about as long: each voice fills its third
    bob, alice = pitch(samples[:third], rate), pitch(samples[-third:], rate)
    assert 80 < bob < 150 and alice > 1.4 * bob, (bob, alice)


def test_requests_carry_the_cast_s_voices_and_never_the_markup(serve, tmp_path):
    server = serve()
    text = (f'Narration first. <voice name="Alice">{ALICE}</voice> Narration between.\n\n'
            f'<voice name="Bob">{BOB} <voice name="coral">Nested words.</voice> Back to Bob.</voice> <emphasis>Loud</emphasis>.')
    write_csv(tmp_path / "m.csv", [{"id": "ch", "text": text}])
    (tmp_path / "job.toml").write_text(
        f'manifest = "m.csv"\nout = "out"\n[defaults]\nmodel = "{MODEL}"\nvoice = "alloy"\nformat = "pcm"\n'
        '[voices]\nalice = { "openai/gpt-4o-mini-tts" = "nova", "local/espeak-ng" = "en-us+f3" }\nBob = "onyx"\n')
    result = cli("run", tmp_path / "job.toml", "--base-url", server.url)
    assert result.returncode == 0, result.stderr
    sent = {e["input_sha256"]: e["voice"] for e in server.stats()["log"] if e["outcome"] == "ok"}
    expected = {"Narration first.": "alloy", ALICE: "nova", "Narration between.": "alloy", BOB: "onyx",
                "Nested words.": "coral", "Back to Bob.": "onyx", "<emphasis>Loud</emphasis>.": "alloy"}
    assert sent == {sha(words): voice for words, voice in expected.items()}  # no other request, no tag sent

    # Recasting Bob asks again for his two chunks alone, in his new voice.
    (tmp_path / "job.toml").write_text((tmp_path / "job.toml").read_text().replace('"onyx"', '"echo"'))
    assert cli("run", tmp_path / "job.toml", "--base-url", server.url).returncode == 0
    again = [(e["input_sha256"], e["voice"]) for e in server.stats()["log"][len(expected):]]
    assert sorted(again) == sorted([(sha(BOB), "echo"), (sha("Back to Bob."), "echo")])


def test_a_break_is_a_silence_of_its_length_and_a_voice_change_a_sentence_gap(serve, tmp_path):
    server = serve()
    text = 'One line here.<break time="1.5s"/>Two lines here. <voice name="nova">And a third.</voice><break time="250ms"/>'
    write_csv(tmp_path / "m.csv", [{"id": "ch", "text": text}])
    (tmp_path / "job.toml").write_text('manifest = "m.csv"\nout = "out"\n[stitching]\nsentence_gap = 0.5\n')
    result = cli("run", tmp_path / "job.toml", "--model", MODEL, "--voice", "alloy", "--format", "wav",
                 "--base-url", server.url)
    assert result.returncode == 0, result.stderr
    samples, rate = decode(tmp_path / "out" / "ch.wav")
    assert rate == TONE_RATE
    # The tone engine's audio has no silence of its own: every silent run is one the stitcher put there.
    gaps = [round(length, 3) for _, length in silences(samples, rate)]
    assert gaps == [1.5, 0.5]  # the break, then the seam where the voice changes; a break at the end is dropped


def test_broken_markup_fails_its_row_naming_where_and_the_others_go_on(serve, tmp_path):
    server = serve()
    write_csv(tmp_path / "m.csv", [
        {"id": "open", "text": 'Fine.\nThen <voice name="Alice">never closed.'},
        {"id": "close", "text": "Fine. </voice>"},
        {"id": "pause", "text": 'Wait <break time="soon"/> here.'},
        {"id": "good", "text": "Nothing wrong here."},
    ])
    args = ("run", tmp_path / "m.csv", "--out", tmp_path / "out", "--model", MODEL, "--voice", "alloy",
            "--base-url", server.url, "--format", "pcm")
    result = cli(*args)
    assert result.returncode == 1
    rows = ledger_rows(tmp_path / "out" / "ledger.sqlite")
    assert rows["good"]["status"] == "done"
    assert rows["open"]["error"] == ('voice markup at line 2, column 6 (character 12): <voice name="Alice"> is never '
                                     "closed with </voice>")
    assert rows["close"]["error"].startswith("voice markup at line 1, column 7 (character 7): </voice> closes no")
    assert "column 6" in rows["pause"]["error"] and '"1.5s" or "500ms"' in rows["pause"]["error"]
    assert all(rows[key]["status"] == "failed" and rows[key]["retryable"] == 0 for key in ("open", "close", "pause"))
    assert server.stats()["requests"] == 1  # nothing of the broken rows was sent
    assert cli(*args).returncode == 1 and server.stats()["requests"] == 1  # failed for good until edited


def test_markup_is_read_exactly_and_the_cast_refuses_lists():
    assert stretches("No tags <b>here</b>, 3 < 4.") is None
    found = stretches('<break time="2s"/>Hi <voice name=\'Al\'>there</voice>\n\n<break time=".5s"/><break time="100ms"/>Go.')
    assert [(s.voice, s.pause, s.paragraph_before) for s in found] == [(None, 2.0, False), ("Al", None, False),
                                                                       (None, 0.6, True)]
    for bad in ('<voice name="">x</voice>', '<voice>x</voice>', 'x <break time="61s"/> y', 'x <voice name="a"'):
        with pytest.raises(MarkupError):
            stretches(bad)
    cast = Cast({"Alice": {"openai/": "nova", "openai/gpt-4o-mini-tts": "shimmer"}, "Bob": "onyx"})
    assert cast.voice("alice", MODEL) == "shimmer" and cast.voice("Alice", "openai/other") == "nova"
    assert cast.voice("Alice", "local/espeak-ng") == "Alice" and cast.voice("Dave", MODEL) == "Dave"


def test_a_list_of_voices_is_a_pool_and_an_empty_one_is_refused(tmp_path):
    write_csv(tmp_path / "m.csv", [{"text": "Hello."}])
    (tmp_path / "job.toml").write_text('manifest = "m.csv"\nout = "out"\n[voices]\nAlice = []\n')
    result = cli("run", tmp_path / "job.toml", "--model", "local/espeak-ng", "--voice", "alloy")
    assert result.returncode == 2
    assert "[voices] Alice is an empty pool" in result.stderr
    (tmp_path / "job.toml").write_text('manifest = "m.csv"\nout = "out"\n[voices]\nAlice = ["nova", "shimmer"]\n')
    assert cli("run", tmp_path / "job.toml", "--model", "local/espeak-ng", "--voice", "alloy").returncode == 0
