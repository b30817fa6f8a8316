"""Speaker mixing: a row's voice may be a list of voices or a pool of the job's [voices] table, and
each row takes one of them from its key, the same in every run and every shard. Runs are the real
CLI against a real `batchtts serve` on loopback, which records the voice of every request."""

from __future__ import annotations

import json
import sqlite3
import string
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import FAST_RETRY, cli, ledger_rows, sha, write_csv, write_jsonl

from batchtts.errors import UsageError
from batchtts.markup import Cast
from batchtts.speakers import choose

MODEL = "openai/gpt-4o-mini-tts"
POOL = ["alloy", "nova", "onyx"]


def texts(n: int) -> list[str]:
    return [f"Utterance {i} for the speaker mix." for i in range(n)]


def sent_voices(server) -> dict[str, str]:
    """The voice the server was asked for, by the sha256 of the text, for the requests it answered."""
    return {e["input_sha256"]: e["voice"] for e in server.stats()["log"] if e["outcome"] == "ok"}


def summary(stderr: str) -> dict:
    return next(json.loads(line) for line in stderr.splitlines() if '"event": "summary"' in line)


def test_a_pool_spreads_rows_over_its_voices_by_key_and_the_export_names_the_voice_sent(serve, tmp_path):
    server = serve()
    write_csv(tmp_path / "m.csv", [{"id": f"u{i:03d}", "text": t} for i, t in enumerate(texts(300))])
    job = tmp_path / "job.toml"
    job.write_text(f'manifest = "m.csv"\nout = "out"\nconcurrency = 16\n[defaults]\nmodel = "{MODEL}"\n'
                   f'voice = "narrators"\n[voices]\nnarrators = {json.dumps(POOL)}\n')
    plan = json.loads(cli("run", job, "--dry-run", "--json", "--base-url", server.url).stdout)
    assert plan["pooled"] == 300 and sum(plan["speakers"].values()) == 300
    assert set(plan["speakers"]) == set(POOL) and min(plan["speakers"].values()) >= 75  # 100 each, give or take

    first = cli("run", job, "--base-url", server.url, "--limit", "30", *FAST_RETRY)
    assert first.returncode == 0, first.stderr
    sent = sent_voices(server)
    ledger = ledger_rows(tmp_path / "out" / "ledger.sqlite")
    assert len(sent) == len(ledger) == 30 and {r["voice"] for r in ledger.values()} == {"narrators"}
    assert all(r["speaker"] == sent[sha(texts(300)[int(key[1:])])] for key, r in ledger.items())
    # The export names each row's speaker: the voice sent for the rows done, the one they will take
    # for the rest, as the dry run counted them.
    assert cli("export", tmp_path / "out", "--to", tmp_path / "r.parquet").returncode == 0
    exported = pq.read_table(tmp_path / "r.parquet").to_pylist()
    assert all(r["speaker"] == sent[sha(r["text"])] for r in exported if r["status"] == "done")
    assert Counter(r["speaker"] for r in exported) == Counter(plan["speakers"])
    assert {r["voice"] for r in exported} == {"narrators"}

    # The next run takes the next rows; those done keep their voice and their file.
    again = cli("run", job, "--base-url", server.url, "--limit", "30", *FAST_RETRY)
    assert again.returncode == 0 and summary(again.stderr)["requests"] == 30
    after = ledger_rows(tmp_path / "out" / "ledger.sqlite")
    assert len(after) == 60 and all(after[key] == row for key, row in ledger.items())
    assert Counter(sent_voices(server).values()) == Counter(r["speaker"] for r in after.values())


def test_shards_and_a_whole_run_give_each_key_the_same_voice(serve, tmp_path):
    server = serve()
    voices = "alloy|nova|onyx|fable"
    manifest = write_csv(tmp_path / "m.csv", [{"id": f"s{i:02d}", "text": t, "voice": voices}
                                              for i, t in enumerate(texts(40))])
    base = ["run", manifest, "--model", MODEL, "--base-url", server.url, *FAST_RETRY]
    assert cli(*base, "--out", tmp_path / "whole").returncode == 0
    for shard in ("0/2", "1/2"):
        result = cli(*base, "--out", tmp_path / "sharded", "--shard", shard)
        assert result.returncode == 0, result.stderr
    whole = ledger_rows(tmp_path / "whole" / "ledger.sqlite")
    sharded = {key: row for path in sorted((tmp_path / "sharded").glob("ledger-shard-*.sqlite"))
               for key, row in ledger_rows(path).items()}
    assert len(whole) == len(sharded) == 40
    assert {k: r["speaker"] for k, r in whole.items()} == {k: r["speaker"] for k, r in sharded.items()}
    assert len({r["speaker"] for r in whole.values()}) == 4 and {r["voice"] for r in whole.values()} == {voices}
    # Each text was asked for twice (once by each layout), in one voice, the one recorded.
    log = [e for e in server.stats()["log"] if e["outcome"] == "ok"]
    by_text = {e["input_sha256"]: set() for e in log}
    for e in log:
        by_text[e["input_sha256"]].add(e["voice"])
    assert len(log) == 80 and all(len(v) == 1 for v in by_text.values())
    assert all(by_text[sha(t)] == {whole[f"s{i:02d}"]["speaker"]} for i, t in enumerate(texts(40)))


def test_lists_in_json_lines_and_parquet_and_the_dry_runs_voice_mix(tmp_path):
    rows = [{"id": f"j{i}", "text": t, "voice": ["echo", "sage"]} for i, t in enumerate(texts(6))]
    write_jsonl(tmp_path / "m.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    for manifest in (tmp_path / "m.jsonl", tmp_path / "m.parquet"):
        shown = cli("run", manifest, "--out", tmp_path / manifest.suffix[1:], "--model", MODEL, "--dry-run")
        assert shown.returncode == 0, shown.stderr
        mix = next(line for line in shown.stdout.splitlines() if line.startswith("voice mix"))
        counts = dict(part.rsplit(" ", 1) for part in mix.split(": ", 1)[1].split(", "))
        assert mix.startswith("voice mix (6 rows drawn from a list or pool)") and set(counts) == {"echo", "sage"}
        assert sum(map(int, counts.values())) == 6
    # A row without a list keeps the line out of the dry run.
    plain = write_csv(tmp_path / "plain.csv", [{"id": "p", "text": "Hello.", "voice": "alloy"}])
    assert "voice mix" not in cli("run", plain, "--out", tmp_path / "p", "--model", MODEL, "--dry-run").stdout


@pytest.mark.parametrize("voice, problem", [
    ("alloy||nova", "voice holds '', not a voice name"),
    ("alloy|nova|alloy", "voice names 'alloy' twice"),
    ('["alloy", 3]', "voice holds 3, not a voice name"),
    ('["alloy|nova"]', "voice holds 'alloy|nova': a voice in a list cannot hold '|'"),
    ("[]", "voice is an empty list of voices"),
])
def test_a_list_that_is_not_one_fails_the_manifest_by_row(tmp_path, voice, problem):
    value = json.loads(voice) if voice.startswith("[") else voice
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "text": "Fine.", "voice": "alloy"},
                                                  {"id": "b", "text": "Bad voice.", "voice": value}])
    result = cli("run", manifest, "--out", tmp_path / "out", "--model", MODEL, "--dry-run")
    assert result.returncode == 2 and "row 2" in result.stderr and problem in result.stderr, result.stderr


def test_the_embedded_engine_maps_a_pool_of_openai_names_and_refuses_a_voice_it_lacks(tmp_path):
    write_csv(tmp_path / "m.csv", [{"id": f"e{i}", "text": t} for i, t in enumerate(texts(4))])
    job = tmp_path / "job.toml"
    job.write_text('manifest = "m.csv"\nout = "out"\n[defaults]\nmodel = "local/espeak-ng"\nvoice = "pair"\n'
                   '[voices]\npair = ["fable", "en-us+f3"]\n')
    result = cli("run", job)
    assert result.returncode == 0, result.stderr
    ledger = ledger_rows(tmp_path / "out" / "ledger.sqlite")
    assert {r["speaker"] for r in ledger.values()} <= {"fable", "en-us+f3"} and len(ledger) == 4
    job.write_text(job.read_text().replace('"en-us+f3"', '"xx-nowhere"'))
    refused = cli("run", job)
    assert refused.returncode == 2 and "xx-nowhere" in refused.stderr and "batchtts voices" in refused.stderr


def test_the_choice_depends_on_the_key_and_the_voices_alone():
    keys = [f"row-{i}" for i in range(2000)]
    three = {k: choose(k, ["a", "b", "c"]) for k in keys}
    assert three == {k: choose(k, ["c", "a", "b"]) for k in keys}  # the order listed does not matter
    four = {k: choose(k, ["a", "b", "c", "d"]) for k in keys}
    moved = [k for k in keys if four[k] != three[k]]
    assert all(four[k] == "d" for k in moved) and 350 < len(moved) < 650  # a quarter move, all to the new voice
    without_b = {k: choose(k, ["a", "c"]) for k in keys}
    assert all(without_b[k] == three[k] for k in keys if three[k] != "b")  # only b's rows move


def test_a_cast_takes_pools_by_model_and_refuses_what_is_not_one():
    cast = Cast({"crowd": {"openai/": ["alloy", "nova"], "local/espeak-ng": "en-us"}, "Mara": "shimmer"})
    assert cast.pool("Crowd", MODEL) == ("alloy", "nova") and cast.pool("crowd", "local/espeak-ng") == ("en-us",)
    assert cast.pool("crowd", "elevenlabs/x") is None and cast.pool("Mara", MODEL) is None
    assert {cast.voice("crowd", MODEL, key) for key in string.ascii_lowercase} == {"alloy", "nova"}
    assert Cast(json.loads(json.dumps(cast.as_table()))) == cast  # as the ledger keeps it
    for bad in ({"x": []}, {"x": ["a", "a"]}, {"x": ["a", 1]}, {"x": ["a|b"]}, {"x": {"openai/": [None]}}):
        with pytest.raises(UsageError):
            Cast(bad)


def test_a_ledger_of_schema_6_is_upgraded_with_each_rows_voice_as_its_speaker(tmp_path):
    from batchtts import ledger

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    for number in range(1, 7):
        db.executescript(f"BEGIN; {ledger.upgrade(number)} PRAGMA user_version={number}; COMMIT;")
    db.execute("INSERT INTO runs (started_at) VALUES ('2026-01-01')")
    db.execute("INSERT INTO rows (key, fingerprint, status, voice, created_at, updated_at) "
               "VALUES ('a', 'f', 'done', 'nova', 'now', 'now')")
    db.commit()
    db.close()
    ledger.Ledger(path).close()
    upgraded = ledger_rows(path)["a"]
    assert (upgraded["speaker"], upgraded["request"], upgraded["copy_of"]) == ("nova", None, None)
    indexes = {r[0] for r in sqlite3.connect(path).execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "rows_request" in indexes


def test_status_and_export_without_the_job_choose_as_the_run_did(tmp_path):
    write_csv(tmp_path / "m.csv", [{"id": f"x{i}", "text": t} for i, t in enumerate(texts(5))])
    job = tmp_path / "job.toml"
    job.write_text('manifest = "m.csv"\nout = "out"\n[defaults]\nmodel = "local/espeak-ng"\nvoice = "duo"\n'
                   '[voices]\nduo = ["alloy", "onyx"]\n')
    assert cli("run", job).returncode == 0
    out = Path(tmp_path / "out")
    status = json.loads(cli("status", out, "--json").stdout)
    assert (status["done"], status["pending"]) == (5, 0)  # the pool is read back from the ledger
    lines = [json.loads(line) for line in cli("export", out, "--to", "-", "--format", "jsonl").stdout.splitlines()]
    ledger = ledger_rows(out / "ledger.sqlite")
    assert [(r["voice"], r["speaker"]) for r in lines] == [("duo", ledger[r["id"]]["speaker"]) for r in lines]
