"""Unattended and at scale: model list, cost preview, budgets, max runtime, shards, object storage.

Every run is the real CLI against a real `batchtts serve` on loopback; object storage is moto's S3
server on loopback, reached through pyarrow's S3 filesystem exactly as a bucket would be.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import (
    FAST_RETRY,
    ROOT,
    batchtts,
    batchtts_command,
    cli,
    cli_env,
    error_message,
    ledger_rows,
    start_batchtts,
    stop,
    wait_for,
    write_csv,
)

from batchtts.config import Budget, Job, parse_duration
from batchtts.errors import (
    EXIT_BUDGET,
    EXIT_MAX_RUNTIME,
    EXIT_PROVIDER_STOP,
    EXIT_SIGINT,
    EXIT_USAGE,
    UsageError,
)
from batchtts.models import parse
from batchtts.money import usd
from batchtts.redact import redact_uri
from batchtts.sharding import Shard, detect, shard_of
from batchtts.storage import OutputFolder

MODEL = "openai/gpt-4o-mini-tts"
PRICE = 0.6 / 1_000_000  # what `batchtts serve` lists for MODEL, USD per character


def rows(n: int, prefix: str = "r") -> list[dict[str, str]]:
    return [{"id": f"{prefix}{i:04d}", "text": f"Line {i} of the {prefix} batch, said once.", "voice": "alloy"}
            for i in range(n)]


def run_args(manifest: Path, out: Path | str, server, *extra: str) -> list[str | Path]:
    return ["run", manifest, "--out", out, "--model", MODEL, "--base-url", server.url, *FAST_RETRY, *extra]


def received(server) -> list[dict]:
    """What the server answered with audio: one entry per request that succeeded."""
    return [e for e in server.stats()["log"] if e["outcome"] == "ok"]


def plan_lines(stdout: str) -> dict[str, list[str]]:
    """The dry run's table, by model (and 'total'): rows, done, failed, to do, requests, chars, price, estimate."""
    table = {}
    for line in stdout.splitlines():
        name, *cells = line.split()
        if name == "total" or "/" in name:
            table[name] = [c.replace(",", "") for c in cells]
    return table


# --- models ---------------------------------------------------------------------------------------


def test_models_lists_prices_and_limits_and_is_cached_for_a_day(serve):
    server = serve()
    listed = cli("models", "--base-url", server.url, "--json")
    assert listed.returncode == 0, listed.stderr
    models = {m["id"]: m for m in json.loads(listed.stdout)["models"]}
    assert set(models) == {MODEL, "elevenlabs/eleven-turbo-v2", "local/espeak-ng"}
    assert models[MODEL]["usd_per_million_chars"] == pytest.approx(0.60)
    assert models[MODEL]["max_input_chars"] == 4096
    assert models["local/espeak-ng"]["usd_per_char"] == 0

    server.process.terminate()
    server.process.wait(5)
    cached = cli("models", "--base-url", server.url)
    assert cached.returncode == 0, cached.stderr
    assert "cached at" in cached.stdout and "$0.60" in cached.stdout and "4,096" in cached.stdout
    refreshed = cli("models", "--base-url", server.url, "--refresh")
    assert refreshed.returncode == EXIT_USAGE
    assert "cannot reach" in refreshed.stderr and "Traceback" not in refreshed.stderr


def test_model_list_parsing_keeps_what_it_understands():
    models = parse({"data": [
        {"id": "a/tts", "name": "A", "pricing": {"prompt": "0.000015"}, "context_length": 2000},
        {"id": "b/tts", "pricing": {"prompt": "free"}},
        {"name": "no id"},
        "not an object",
        {"id": "c/tts", "pricing": {"prompt": "-1"}, "context_length": "big"},
    ]})
    assert [(m.id, m.name, m.usd_per_million, m.max_input_chars) for m in models] == [
        ("a/tts", "A", pytest.approx(15.0), 2000), ("b/tts", "b/tts", None, None), ("c/tts", "c/tts", None, None),
    ]
    with pytest.raises(ValueError):
        parse({"models": []})


# --- cost preview and budgets ---------------------------------------------------------------------


def test_dry_run_sends_nothing_and_its_estimate_is_what_the_run_sends(serve, tmp_path):
    server = serve()
    out = tmp_path / "out"
    long_text = " ".join(f"Sentence {i} of a chapter long enough to be cut into several requests." for i in range(30))
    manifest = write_csv(tmp_path / "m.csv", [
        *rows(6),
        {"id": "chapter", "text": long_text, "voice": "nova"},
        {"id": "eleven", "text": "A row for another model.", "voice": "21m00Tcm4TlvDq8ikWAM", "model": "elevenlabs/eleven-turbo-v2"},
        {"id": "offline", "text": "A row the embedded engine narrates.", "voice": "en", "model": "local/espeak-ng"},
    ])
    chunking = ("--chunk-chars", "500")
    assert cli(*run_args(manifest, out, server, *chunking, "--limit", "2")).returncode == 0
    before = len(received(server))

    dry = cli(*run_args(manifest, out, server, *chunking, "--dry-run"), key=None)
    assert dry.returncode == 0, dry.stderr
    assert len(server.stats()["log"]) == before  # the dry run sent no speech request
    table = plan_lines(dry.stdout)
    rows_, done, failed, todo, requests, chars, price, estimate = table[MODEL]
    assert (rows_, done, failed, todo) == ("7", "2", "0", "5")
    assert int(requests) > 5  # the chapter is several requests
    assert price == "$0.60" and estimate == usd(int(chars) * PRICE)
    assert table["local/espeak-ng"][-2:] == ["$0.00", "$0.0000"]
    assert "model list" in dry.stdout  # fetched by the first run, cached since

    real = cli(*run_args(manifest, out, server, *chunking))
    assert real.returncode == 0, real.stderr
    sent = Counter()
    sent_requests = Counter()
    for entry in received(server)[before:]:
        sent[entry["model"]] += entry["characters"]
        sent_requests[entry["model"]] += 1
    assert int(chars) == sent[MODEL] and int(requests) == sent_requests[MODEL]
    assert int(table["elevenlabs/eleven-turbo-v2"][5]) == sent["elevenlabs/eleven-turbo-v2"]
    expected = sent[MODEL] * PRICE + sent["elevenlabs/eleven-turbo-v2"] * 0.00003
    assert float(table["total"][-1].lstrip("$")) == pytest.approx(expected, abs=0.00005)
    spent = re.search(r"estimated cost \$([\d.]+)", real.stdout)
    assert spent and float(spent[1]) == pytest.approx(expected, abs=0.00005)
    summary = next(json.loads(line) for line in real.stderr.splitlines() if '"summary"' in line)
    assert summary["cost_usd"] == pytest.approx(expected, abs=1e-6) and summary["characters_sent"] == sum(sent.values())
    assert summary["local_characters"] == len("A row the embedded engine narrates.")  # free, and sent nowhere


def test_max_chars_stops_at_the_cap_and_reruns_complete_the_job(serve, tmp_path):
    server = serve("--latency", "0.1")
    out = tmp_path / "out"
    manifest = write_csv(tmp_path / "m.csv", rows(10))
    length = len(rows(10)[0]["text"])
    cap = 3 * length + length // 2  # three rows fit, the fourth would pass the cap

    first = cli(*run_args(manifest, out, server, "--max-chars", str(cap), "--concurrency", "2",
                               "--progress-interval", "0.05"))
    assert first.returncode == EXIT_BUDGET, first.stderr
    progress = [e for e in map(json.loads, first.stderr.splitlines()) if e["event"] == "progress"]
    assert progress and {(e["total"], e["total_characters"]) for e in progress} == {(3, 3 * length)}  # what the cap allows
    assert "character budget" in first.stdout and "run the same command again" in first.stdout
    assert sum(e["characters"] for e in received(server)) == 3 * length <= cap
    assert len(ledger_rows(out / "ledger.sqlite")) == 3

    codes = []
    for _ in range(3):
        codes.append(cli(*run_args(manifest, out, server, "--max-chars", str(cap))).returncode)
    assert codes == [EXIT_BUDGET, EXIT_BUDGET, 0]  # 6, 9, then the last row: each night takes its share
    done = ledger_rows(out / "ledger.sqlite")
    assert len(done) == 10 and all(e["status"] == "done" for e in done.values())
    assert set(Counter(e["input_sha256"] for e in received(server)).values()) == {1}  # nothing bought twice


def test_a_row_over_the_budget_fails_by_name_and_free_local_rows_are_not_counted(serve, tmp_path):
    server = serve()
    out = tmp_path / "out"
    short = rows(6)
    length = len(short[0]["text"])
    huge = {"id": "huge", "text": "A row longer than a whole night's budget. " * 20, "voice": "alloy"}
    free = {"id": "free", "text": "Narrated offline at no cost, whatever its length. " * 10, "voice": "en",
            "model": "local/espeak-ng"}
    manifest = write_csv(tmp_path / "m.csv", [short[0], huge, short[1], free, *short[2:]])
    cap = ("--max-chars", str(4 * length))  # four short rows; the huge one alone passes it; the local row is free

    dry = cli(*run_args(manifest, out, server, *cap, "--dry-run"), key=None)
    assert dry.returncode == 0, dry.stderr
    assert f"this run takes 5 of the 8 rows to do: {4 * length:,} characters sent" in dry.stdout
    assert "then the character budget" in dry.stdout and "1 row passed over" in dry.stdout
    assert "row 2 (huge): needs 840 characters, more than the budget per run allows (--max-chars" in dry.stdout

    first = cli(*run_args(manifest, out, server, *cap))
    assert first.returncode == EXIT_BUDGET, first.stderr  # the cap was reached, and that says more than the failure
    assert "character budget" in first.stdout and "narrated 5 rows, 1 failed" in first.stdout
    assert f"{4 * length:,} characters sent (and {len(free['text']):,} narrated locally)" in first.stdout
    assert sum(e["characters"] for e in received(server)) == 4 * length
    entries = ledger_rows(out / "ledger.sqlite")
    assert {k for k, e in entries.items() if e["status"] == "done"} == {"r0000", "r0001", "free", "r0002", "r0003"}
    assert entries["huge"]["status"] == "failed" and entries["huge"]["retryable"] == 1  # tried again next run
    assert "raise it to narrate this row" in entries["huge"]["error"]
    status = cli("status", out)
    assert "row 2 (huge): needs 840 characters" in status.stdout and "retried on next run" in status.stdout

    second = cli(*run_args(manifest, out, server, *cap))  # the rest; the huge row fails again, by name
    assert second.returncode == 1 and "see the failed rows with" in second.stdout, second.stdout
    assert sum(e["status"] == "done" for e in ledger_rows(out / "ledger.sqlite").values()) == 7

    limited = cli(*run_args(manifest, tmp_path / "limited", server, *cap, "--limit", "2"))
    assert limited.returncode == 1  # the row passed over does not count against --limit
    assert {k for k, e in ledger_rows(tmp_path / "limited" / "ledger.sqlite").items() if e["status"] == "done"} == {
        "r0000", "r0001"}

    raised = cli(*run_args(manifest, out, server, "--max-chars", str(len(huge["text"]))))
    assert raised.returncode == 0, raised.stdout
    entries = ledger_rows(out / "ledger.sqlite")
    assert len(entries) == 8 and all(e["status"] == "done" for e in entries.values()) and len(received(server)) == 9


def test_max_cost_uses_the_job_files_prices_and_refuses_unpriced_models(serve, tmp_path):
    server = serve("--any-model")  # serves acme/new-tts, which its model list does not price
    out = tmp_path / "out"
    manifest = write_csv(tmp_path / "m.csv", rows(8))
    length = len(rows(8)[0]["text"])
    job = tmp_path / "job.toml"
    # $100 per million characters here: a row costs length * 0.0001.
    job.write_text(f'manifest = "m.csv"\nout = "out"\n[defaults]\nmodel = "{MODEL}"\n'
                   f'[provider]\nbase_url = "{server.url}"\n[prices]\n"{MODEL}" = 100\n')
    capped = cli("run", job, "--max-cost", str(round(5.5 * length * 0.0001, 6)), *FAST_RETRY)
    assert capped.returncode == EXIT_BUDGET, capped.stderr
    assert "cost budget" in capped.stdout
    assert len(ledger_rows(out / "ledger.sqlite")) == 5
    assert re.search(r"estimated cost \$([\d.]+)", capped.stdout)[1] == f"{5 * length * 0.0001:.4f}"
    assert "prices: job file" in cli("run", job, "--dry-run").stdout

    unpriced = cli(*run_args(manifest, tmp_path / "other", server, "--model", "acme/new-tts", "--max-cost", "1"))
    assert unpriced.returncode == EXIT_USAGE
    assert "--max-cost needs a price for acme/new-tts" in unpriced.stderr
    assert len(server.stats()["log"]) == 5

    uncapped = cli(*run_args(manifest, tmp_path / "other", server, "--model", "acme/new-tts", "--limit", "2"))
    assert uncapped.returncode == 0, uncapped.stderr
    assert f"estimated cost unknown ({2 * length} characters to models without a known price)" in uncapped.stdout


def test_a_job_file_with_the_old_chunk_limit_key_is_refused_with_the_new_names(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('manifest = "m.csv"\nout = "out"\nmax_chars = 3000\n')
    result = cli("run", job)
    assert result.returncode == EXIT_USAGE
    assert "max_chars is now chunk_chars" in result.stderr and "[budget]" in result.stderr


# --- unattended runs ------------------------------------------------------------------------------


def test_max_runtime_ends_inside_the_window_and_the_next_run_goes_on(serve, tmp_path):
    server = serve("--latency", "0.3")
    out = tmp_path / "out"
    manifest = write_csv(tmp_path / "m.csv", rows(60))
    started = time.monotonic()
    first = cli(*run_args(manifest, out, server, "--concurrency", "2", "--max-runtime", "2", "--grace", "0.5"))
    assert first.returncode == EXIT_MAX_RUNTIME, first.stderr
    assert time.monotonic() - started < 10  # a process start, then a run that gave up on its own
    events = [json.loads(line) for line in first.stderr.splitlines()]  # not a terminal: JSON lines
    summary = next(e for e in events if e["event"] == "summary")
    assert summary["wall_s"] <= 2.3 and summary["stop_reason"].startswith("the maximum run time")
    assert any(e["event"] == "max_runtime" for e in events)
    kept = len(ledger_rows(out / "ledger.sqlite"))
    assert 0 < kept < 60

    second = cli(*run_args(manifest, out, server, "--concurrency", "16"))
    assert second.returncode == 0, second.stderr
    assert len(ledger_rows(out / "ledger.sqlite")) == 60


def test_a_long_row_whose_chunks_all_came_back_is_stitched_even_as_the_run_stops(serve, tmp_path):
    server = serve("--latency", "1.5")
    long_text = " ".join(f"Sentence {i} of a chapter that needs three requests." for i in range(30))
    manifest = write_csv(tmp_path / "m.csv", [{"id": "chapter", "text": long_text, "voice": "nova"}, *rows(20)])
    out = tmp_path / "out"
    proc = start_batchtts(*run_args(manifest, out, server, "--chunk-chars", "600", "--concurrency", "3"))
    try:
        # The stop comes while the chapter's three chunks are in flight, whatever the start-up took.
        wait_for(lambda: server.stats()["in_flight"] == 3)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    finally:
        stop(proc)
    assert proc.returncode == EXIT_SIGINT, stderr
    assert server.stats()["requests"] == 3  # no row was taken on after the stop
    assert ledger_rows(out / "ledger.sqlite")["chapter"]["status"] == "done"
    assert (out / "chapter.mp3").stat().st_size > 0


def test_budget_and_runtime_values_are_checked():
    for budget in (Budget(max_cost="5"), Budget(max_cost=float("nan")), Budget(max_cost=-1), Budget(max_chars=1.5),
                   Budget(max_chars=True), Budget(max_chars="3000")):
        with pytest.raises(UsageError, match="max_c"):
            Job(manifest=Path("m.csv"), out=Path("o"), budget=budget).validate()
    with pytest.raises(UsageError, match="not a duration"):
        parse_duration(True)


def test_durations_read_as_written():
    assert [parse_duration(v) for v in ("90", "45s", "50m", "2h", "1h30m", "1.5h", 12)] == [
        90, 45, 3000, 7200, 5400, 5400, 12]
    for unclear in ("1h30", "x", "", "5 min"):
        with pytest.raises(UsageError, match="not a duration"):
            parse_duration(unclear)


def test_the_cron_and_systemd_recipes_run_the_nightly_job(serve, tmp_path):
    server = serve()
    crontab = (ROOT / "jobs" / "crontab").read_text()
    service = (ROOT / "jobs" / "batchtts-nightly.service").read_text()
    exec_start = re.search(r"^ExecStart=\S+/batchtts (.*)$", service, re.MULTILINE)[1]
    assert "OnCalendar=" in (ROOT / "jobs" / "batchtts-nightly.timer").read_text()
    assert re.search(r"^SuccessExitStatus=4 5 143$", service, re.MULTILINE)
    preview = batchtts(*shlex.split(exec_start), "--dry-run", "--base-url", server.url, key=None, cwd=ROOT)
    assert preview.returncode == 0, preview.stderr
    assert "budget per run: $5.00" in preview.stdout and "prices: job file" in preview.stdout

    # The crontab line itself, as cron runs it (sh, `%` unescaped), in a copy of the folder it expects,
    # with the key (and here the server's address) in an .env of plain KEY=value lines.
    schedule = next(line for line in crontab.splitlines() if line.strip() and not line.startswith("#"))
    command = schedule.split(None, 5)[5].replace("\\%", "%")
    home = tmp_path / "narration"
    for folder in ("jobs", "sample_manifests"):
        shutil.copytree(ROOT / folder, home / folder)
    (home / ".venv" / "bin").mkdir(parents=True)
    (home / ".venv" / "bin" / "batchtts").symlink_to(batchtts_command())
    (home / ".env").write_text(f"OPENROUTER_API_KEY=sk-or-test\nBATCHTTS_BASE_URL={server.url}\n")
    env = {k: v for k, v in cli_env(None).items() if k not in ("OPENROUTER_API_KEY", "BATCHTTS_BASE_URL")}
    night = subprocess.run(["sh", "-c", command.replace("/srv/narration", str(home))], env=env,
                           capture_output=True, text=True, timeout=120, check=False)
    assert night.returncode == 0, night.stderr
    month = time.strftime("%Y-%m")
    events = [json.loads(line) for line in (home / "logs" / f"nightly-{month}.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "summary" and events[-1]["done"] == 6
    assert "narrated 6 rows" in (home / "logs" / f"nightly-{month}.log").read_text()
    assert len(received(server)) == 6


# --- sharding -------------------------------------------------------------------------------------


def test_shard_detection_from_flags_and_schedulers():
    assert detect("3/8", None, {}) == Shard(3, 8)
    assert detect(None, 4, {"JOB_COMPLETION_INDEX": "2"}) == Shard(2, 4)
    assert detect(None, None, {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "8"}) == Shard(5, 8)
    assert detect(None, None, {"SLURM_ARRAY_TASK_ID": "11", "SLURM_ARRAY_TASK_MIN": "10",
                               "SLURM_ARRAY_TASK_COUNT": "4"}) == Shard(1, 4)
    assert detect(None, None, {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_STEP": "2",
                               "SLURM_ARRAY_TASK_COUNT": "8"}) == Shard(3, 8)
    assert detect(None, None, {}) is None
    for bad in (("8/8", None, {}), ("x", None, {}), (None, None, {"JOB_COMPLETION_INDEX": "0"}),
                (None, 4, {}), (None, None, {"SLURM_ARRAY_TASK_ID": "two", "SLURM_ARRAY_TASK_COUNT": "4"}),
                (None, None, {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_STEP": "3", "SLURM_ARRAY_TASK_COUNT": "4"}),
                (None, None, {"SLURM_ARRAY_TASK_ID": "1"}), ("0/0", None, {}), ("1/3", 4, {}),
                (None, 4, {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3"})):
        with pytest.raises(UsageError, match=r"shard|--shards|index|whole number|not set"):
            detect(*bad)


def test_each_shard_has_a_ledger_of_its_own_next_to_the_one_named():
    def ledger(**job: object) -> Path:
        return Job(manifest=Path("m.csv"), **job).ledger_path

    assert ledger(out=Path("out")) == Path("out/ledger.sqlite")
    assert ledger(out=Path("out"), shard=Shard(2, 8)) == Path("out/ledger-shard-0002-of-0008.sqlite")
    assert ledger(out="s3://b/p", ledger=Path("state/run.db"), shard=Shard(2, 8)) == Path("state/run-shard-0002-of-0008.db")
    assert ledger(out="out", ledger=Path("state/run.db")) == Path("state/run.db")
    assert ledger(out=Path("out"), shard=Shard(0, 1)) == Path("out/ledger.sqlite")  # one shard: the whole job
    with pytest.raises(UsageError, match="needs a local ledger"):
        ledger(out="gs://bucket/audio")


def test_ledgers_of_the_same_name_in_other_folders_have_partial_folders_of_their_own(tmp_path):
    a = OutputFolder(tmp_path / "out", tmp_path / "a" / "ledger.sqlite")
    b = OutputFolder(tmp_path / "out", tmp_path / "b" / "ledger.sqlite")
    assert a.partial_dir != b.partial_dir
    assert a.partial_dir == OutputFolder(tmp_path / "out", tmp_path / "a" / "ledger.sqlite").partial_dir


def test_a_rows_shard_depends_on_its_key_alone():
    keys = [f"utt-{i}" for i in range(20_000)]
    before = {k: shard_of(k, 16) for k in keys}
    grown = [f"new-{i}" for i in range(5_000)] + keys[::-1]  # more rows, another order
    assert all(shard_of(k, 16) == before[k] for k in grown if k in before)
    counts = Counter(before.values())
    assert len(counts) == 16 and all(abs(c - 20_000 / 16) < 150 for c in counts.values())  # even, within noise
    # Fixed across processes, machines and versions (unlike hash()): a change here would move rows
    # of running sharded jobs to other ledgers.
    assert [shard_of(k, 8) for k in ("r0000", "r0001", "chapter-12", "utt-999999")] == [6, 1, 5, 0]


def test_four_shards_cover_every_row_once_and_merge_like_one_run(serve, tmp_path):
    server = serve()
    manifest = write_csv(tmp_path / "m.csv", rows(240))
    sharded = tmp_path / "sharded"
    job = tmp_path / "job.toml"
    job.write_text(f'manifest = "m.csv"\nout = "sharded"\nconcurrency = 8\n[defaults]\nmodel = "{MODEL}"\n'
                   f'voice = "alloy"\nformat = "wav"\n[provider]\nbase_url = "{server.url}"\n')
    base = ["run", str(job), *FAST_RETRY]
    # The same four shards as a flag, a Kubernetes Indexed Job, and two tasks of the project's Slurm
    # script, whose `batchtts` is found on the PATH.
    slurm = ["bash", str(ROOT / "jobs" / "slurm-array.sh"), *FAST_RETRY]
    path = {"PATH": str(Path(batchtts_command()).parent) + os.pathsep + os.environ["PATH"]}
    procs = [
        start_batchtts(*base, "--shard", "0/4"),
        start_batchtts(*base, "--shards", "4", JOB_COMPLETION_INDEX="1"),
        *(subprocess.Popen(slurm, env={**cli_env(), **path, "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": "4",
                                       "BATCHTTS_JOB": str(job)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for task in (2, 3)),
    ]
    for proc, source in zip(procs, ["--shard", "JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_ID"],
                            strict=True):
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        assert f"/4, from {source})" in stdout  # the summary says which shard ran, and why
    ledgers = sorted(sharded.glob("ledger-shard-*.sqlite"))
    assert [p.name for p in ledgers] == [f"ledger-shard-{i:04d}-of-0004.sqlite" for i in range(4)]
    keys = [set(ledger_rows(p)) for p in ledgers]
    assert sum(map(len, keys)) == 240 and set().union(*keys) == {r["id"] for r in rows(240)}
    assert min(map(len, keys)) > 30
    assert Counter(e["input_sha256"] for e in received(server)).most_common(1)[0][1] == 1
    assert len(received(server)) == 240

    single = tmp_path / "single"
    assert cli(*run_args(manifest, single, server, "--voice", "alloy", "--format", "wav")).returncode == 0
    merged = json.loads(cli("status", sharded, "--json").stdout)
    one = json.loads(cli("status", single, "--json").stdout)
    for field in ("total", "done", "failed", "pending", "bytes", "audio_s"):
        assert merged[field] == one[field], field
    assert merged["total"] == 240 and merged["pending"] == 0 and len(merged["ledgers"]) == 4
    listed = json.loads(cli("status", *ledgers, "--json").stdout)
    assert listed["done"] == 240
    half = json.loads(cli("status", *ledgers[:2], "--json").stdout)
    assert half["total"] == len(keys[0]) + len(keys[1]) == half["done"]

    assert cli("export", sharded).returncode == 0
    assert cli("export", single).returncode == 0
    a = pq.read_table(sharded / "results.parquet").to_pylist()
    b = pq.read_table(single / "results.parquet").to_pylist()
    assert len(a) == 240 and a == b
    umask = os.umask(0o22)
    os.umask(umask)
    assert (sharded / "results.parquet").stat().st_mode & 0o777 == 0o666 & ~umask  # as any file written in place

    # The same ledger named twice is read once.
    twice = json.loads(cli("status", ledgers[0], sharded / ".." / sharded.name / ledgers[0].name, "--json").stdout)
    assert twice["done"] == len(keys[0]) and twice["bytes"] == json.loads(cli("status", ledgers[0], "--json").stdout)["bytes"]

    # Another shard layout on the same ledgers would buy their rows again: refused before any request.
    requests = server.stats()["requests"]
    for other in (["--shard", "0/2"], []):
        refused = cli("run", job, *other)
        assert refused.returncode == EXIT_USAGE and "would be narrated again" in refused.stderr, refused.stderr
    assert server.stats()["requests"] == requests

    # A shard that has not run yet (a pod still pending): the folder's status is not complete.
    aside = tmp_path / "aside"
    aside.mkdir()
    ledgers[3].rename(aside / ledgers[3].name)
    partial = json.loads(cli("status", sharded, "--json").stdout)
    assert partial["missing_shards"] == [3] and partial["total"] == 240
    assert partial["pending"] == len(keys[3]) and partial["done"] == 240 - len(keys[3])
    assert "no ledger yet for shard 3" in cli("status", sharded).stdout
    assert cli("export", sharded, "--to", tmp_path / "partial.csv").returncode == 0
    statuses = Counter(pacsv.read_csv(tmp_path / "partial.csv").column("status").to_pylist())
    assert statuses == {"done": 240 - len(keys[3]), "pending": len(keys[3])}


def test_two_jobs_sharing_a_ledger_folder_are_read_apart(serve, tmp_path):
    server = serve()
    write_csv(tmp_path / "a.csv", rows(12, "a"))
    write_csv(tmp_path / "b.csv", rows(7, "b"))
    for name in ("a", "b"):
        (tmp_path / f"{name}.toml").write_text(
            f'manifest = "{name}.csv"\nout = "out/{name}"\nledger = "state/{name}.sqlite"\nshard = "0/2"\n'
            f'[defaults]\nmodel = "{MODEL}"\nvoice = "alloy"\n[provider]\nbase_url = "{server.url}"\n')
        assert cli("run", tmp_path / f"{name}.toml", *FAST_RETRY).returncode == 0
    mine = json.loads(cli("status", "--job", tmp_path / "a.toml", "--json").stdout)
    assert [Path(p).name for p in mine["ledgers"]] == ["a-shard-0000-of-0002.sqlite"]
    assert mine["total"] == 12 and mine["missing_shards"] == [1]
    assert mine["done"] == len(ledger_rows(tmp_path / "state" / "a-shard-0000-of-0002.sqlite")) == 12 - mine["pending"]
    both = cli("status", tmp_path / "state")
    assert both.returncode == EXIT_USAGE and "ledgers of several jobs (a.sqlite, b.sqlite)" in both.stderr


def test_ledger_and_shard_mistakes_are_told_plainly(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('manifest = "m.csv"\nout = "out"\nshard = 3\n')
    wrong = cli("run", job)
    event = json.loads(wrong.stderr.splitlines()[-1])  # off a terminal, an expected fault is a JSON event
    assert event["event"] == "error" and event["exit_code"] == EXIT_USAGE == wrong.returncode
    assert 'shard takes "I/N"' in event["message"] == error_message(wrong)
    assert "Traceback" not in wrong.stderr
    bucket = cli("status", "s3://bucket/audio")
    assert bucket.returncode == EXIT_USAGE and "the ledger is on local disk" in bucket.stderr
    missing = cli("status", tmp_path / "nothing-here")
    assert missing.returncode == EXIT_USAGE and "no such ledger file or folder" in missing.stderr
    # A run refused before it starts (here: no key) leaves no ledger behind to speak for the job.
    manifest = write_csv(tmp_path / "m.csv", rows(2))
    keyless = cli("run", manifest, "--out", tmp_path / "out", "--model", MODEL, key=None)
    assert keyless.returncode == EXIT_USAGE and not (tmp_path / "out").exists()  # nor the folder it made
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "ledger-shard-0000-of-0002.sqlite").touch()  # a shard's ledger not yet set up
    dry = cli("run", manifest, "--out", tmp_path / "out", "--model", MODEL, "--dry-run", "--base-url",
                   "http://127.0.0.1:9/api/v1", key=None)
    assert dry.returncode == 0 and "Traceback" not in dry.stderr, dry.stderr
    (tmp_path / "Thumbs.db").write_bytes(b"not a database at all")
    assert "not a batchtts ledger" in cli("status", tmp_path / "Thumbs.db").stderr
    assert "no ledger in" in cli("status", tmp_path).stderr


def test_the_kubernetes_indexed_job_runs_its_command_as_shard_of_its_completions(serve):
    server = serve()
    manifest = yaml.safe_load((ROOT / "jobs" / "k8s-indexed-job.yaml").read_text())
    spec = manifest["spec"]
    container = spec["template"]["spec"]["containers"][0]
    script = container["args"][0]
    command = script.split("exec ", 1)[1]
    assert spec["completionMode"] == "Indexed" and spec["template"]["spec"]["restartPolicy"] == "Never"
    assert f"--shards {spec['completions']}" in command
    rule = spec["podFailurePolicy"]["rules"][0]["onExitCodes"]
    assert rule["containerName"] == container["name"]
    assert rule["values"] == [EXIT_USAGE, EXIT_PROVIDER_STOP, EXIT_BUDGET, EXIT_MAX_RUNTIME]
    assert container["workingDir"] == "/work/batchtts"
    # The pod's command, in the project folder as the pod sees it, for pod 5 of 8: a dry run.
    program, *args = shlex.split(command)
    assert program == "batchtts"
    preview = batchtts(*args, "--dry-run", "--base-url", server.url, key=None, cwd=ROOT, JOB_COMPLETION_INDEX="5")
    assert preview.returncode == 0, preview.stderr
    assert "dataset.parquet, shard 5/8:" in preview.stdout


# --- object storage -------------------------------------------------------------------------------

S3_ENV = {"AWS_ACCESS_KEY_ID": "test-access-key", "AWS_SECRET_ACCESS_KEY": "s3-SECRET-never-logged",
          "AWS_DEFAULT_REGION": "us-east-1"}


def listening_port(proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    """The port a server started with port 0 listens on, read from /proc: no port is picked here and
    taken there a moment later (by then, perhaps, by another test worker's connection)."""
    found: list[int] = []

    def listening() -> bool:
        assert proc.poll() is None, f"the server exited with {proc.returncode}"
        inodes = set()
        for fd in os.listdir(f"/proc/{proc.pid}/fd"):
            try:
                inodes.add(os.readlink(f"/proc/{proc.pid}/fd/{fd}"))
            except OSError:
                continue
        with open("/proc/net/tcp") as table:
            for line in list(table)[1:]:
                fields = line.split()
                if fields[3] == "0A" and f"socket:[{fields[9]}]" in inodes:  # LISTEN
                    found.append(int(fields[1].split(":")[1], 16))
        return bool(found)

    wait_for(listening, timeout=timeout)
    return found[0]


@pytest.fixture
def refusing_port():
    """A port bound and never listened on: every connection to it is refused, and no other process
    can take it while the test runs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.fixture
def s3():
    """moto's S3 server on loopback with an empty bucket; stopped when the test ends."""
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port = listening_port(proc)
        fs = pafs.S3FileSystem(access_key=S3_ENV["AWS_ACCESS_KEY_ID"], secret_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
                               region="us-east-1", endpoint_override=f"127.0.0.1:{port}", scheme="http",
                               allow_bucket_creation=True)
        fs.create_dir("audio-bucket")
        yield fs, f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def objects(fs: pafs.FileSystem, prefix: str) -> dict[str, int]:
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return {i.path.removeprefix(prefix + "/"): i.size for i in infos if i.type == pafs.FileType.File}


def test_output_to_s3_publishes_whole_objects_and_exports_next_to_them(serve, s3, tmp_path, refusing_port):
    fs, endpoint = s3
    server = serve()
    manifest = write_csv(tmp_path / "m.csv", rows(12))
    ledger = tmp_path / "state" / "ledger.sqlite"
    env = {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}
    uri = "s3://audio-bucket/narration/v1"

    missing = cli(*run_args(manifest, uri, server), **env)
    assert missing.returncode == EXIT_USAGE and "needs a local ledger: pass --ledger" in missing.stderr
    no_bucket = cli(*run_args(manifest, "s3://no-such-bucket/audio", server, "--ledger", ledger), **env)
    assert no_bucket.returncode == EXIT_USAGE and "cannot write to s3://no-such-bucket/audio" in no_bucket.stderr
    assert server.stats()["requests"] == 0  # refused before any audio was bought

    # A dry run (and status) uses the ledger alone: no store needs to answer.
    unreachable = {**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{refusing_port}"}
    dry = cli(*run_args(manifest, uri, server, "--ledger", ledger, "--format", "wav", "--dry-run"), **unreachable)
    assert dry.returncode == 0 and "12 rows" in dry.stdout, dry.stderr

    run = cli(*run_args(manifest, uri, server, "--ledger", ledger, "--format", "wav"), **env)
    assert run.returncode == 0, run.stderr
    for named in (ledger, ledger.parent):  # the file, or the folder of ledgers
        status = json.loads(cli("status", named, "--json", **unreachable).stdout)
        assert status["done"] == 12 and status["pending"] == 0
    idle = cli(*run_args(manifest, uri, server, "--ledger", ledger, "--format", "wav"), **unreachable)
    assert idle.returncode == 0 and "narrated 0 rows" in idle.stdout, idle.stderr  # nothing to do: no store needed
    stored = objects(fs, "audio-bucket/narration/v1")
    entries = ledger_rows(ledger)
    assert stored == {e["path"]: e["bytes"] for e in entries.values()}
    for e in list(entries.values())[:3]:
        with fs.open_input_stream(f"audio-bucket/narration/v1/{e['path']}") as f:
            body = f.read()
        assert hashlib.sha256(body).hexdigest() == e["sha256"] and body[:4] == b"RIFF"
    assert not (tmp_path / "state" / ".batchtts-partial").exists()
    assert "s3-SECRET" not in run.stdout + run.stderr

    # Credentials in the URI itself, as pyarrow takes them: kept out of the output and the ledger too.
    secret_uri = f"s3://{S3_ENV['AWS_ACCESS_KEY_ID']}:{S3_ENV['AWS_SECRET_ACCESS_KEY']}@audio-bucket/narration/v1"
    again = cli(*run_args(manifest, secret_uri, server, "--ledger", ledger, "--format", "wav"),
                     AWS_ENDPOINT_URL=endpoint, AWS_DEFAULT_REGION="us-east-1")
    assert again.returncode == 0 and len(received(server)) == 12  # the rerun trusts the ledger: nothing sent
    assert "s3-SECRET" not in again.stdout + again.stderr
    assert all(b"s3-SECRET" not in p.read_bytes() for p in ledger.parent.glob("ledger.sqlite*"))

    moved = cli(*run_args(manifest, "s3://audio-bucket/narration/v2", server, "--ledger", ledger), **env)
    assert moved.returncode == EXIT_USAGE and "records the audio of s3://audio-bucket/narration/v1" in moved.stderr
    assert objects(fs, "audio-bucket/narration/v2") == {}

    exported = cli("export", ledger, **env)
    assert exported.returncode == 0, exported.stderr
    assert "s3://audio-bucket/narration/v1/results.parquet" in exported.stdout
    with fs.open_input_file("audio-bucket/narration/v1/results.parquet") as f:
        table = pq.read_table(f).to_pylist()
    assert len(table) == 12 and {r["status"] for r in table} == {"done"}


@pytest.fixture
def gcs():
    """A Google Cloud Storage emulator on loopback with an empty bucket; stopped when the test ends."""
    proc = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
                             "--port", "0", "--in-memory"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port = listening_port(proc)
        fs = pafs.GcsFileSystem(anonymous=True, scheme="http", endpoint_override=f"127.0.0.1:{port}", project_id="test")
        fs.create_dir("audio-bucket")
        yield fs, port
    finally:
        proc.terminate()
        proc.wait(10)


def test_output_to_gcs_takes_the_same_path(serve, gcs, tmp_path):
    fs, port = gcs
    server = serve()
    manifest = write_csv(tmp_path / "m.csv", rows(8))
    ledger = tmp_path / "ledger.sqlite"
    uri = f"gs://anonymous@audio-bucket/narration?scheme=http&endpoint_override=127.0.0.1:{port}"
    run = cli(*run_args(manifest, uri, server, "--ledger", ledger))
    assert run.returncode == 0, run.stderr
    entries = ledger_rows(ledger)
    assert objects(fs, "audio-bucket/narration") == {e["path"]: e["bytes"] for e in entries.values()}
    exported = cli("export", ledger)
    assert exported.returncode == 0, exported.stderr
    with fs.open_input_file("audio-bucket/narration/results.parquet") as f:
        assert pq.read_table(f).num_rows == 8


def test_uris_lose_their_credentials_in_logs_but_keep_their_other_options():
    uri = "s3://bucket/audio?access_key=AKIA123&secret_key=s3cr3t&session_token=tok&region=eu-west-1&scheme=http"
    assert redact_uri(uri) == "s3://bucket/audio?region=eu-west-1&scheme=http"
    assert redact_uri("gs://bucket/audio") == "gs://bucket/audio"
    assert redact_uri("s3://AKIA123:s3cr3t@bucket/audio?region=eu-west-1") == "s3://bucket/audio?region=eu-west-1"
    assert redact_uri("gs://anonymous@bucket/audio") == "gs://anonymous@bucket/audio"
    assert redact_uri("s3://AKIA123:ab%2Fcd%2Bef@bucket/audio") == "s3://bucket/audio"  # a '/' in a secret is escaped
    for plain in ("s3://audio/runs/2024-06-01T02:15/take@2", "hdfs://namenode:8020/data/x@y", "gs://b/v1/ed:it@home/"):
        assert redact_uri(plain) == plain  # ':' and '@' in a path are not credentials


class CuttingProxy:
    """A TCP proxy to the S3 server that cuts any connection once it has carried `limit` bytes
    upstream: small requests pass, an upload of an audio file is cut off in the middle."""

    def __init__(self, upstream: tuple[str, int], limit: int) -> None:
        self.upstream, self.limit, self.cuts = upstream, limit, 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, counted: bool) -> None:
        carried = 0
        try:
            while data := source.recv(65536):
                carried += len(data)
                if counted and carried > self.limit:
                    self.cuts += 1
                    sink.sendall(data[: len(data) // 2])
                    break
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.server.close()


def test_an_interrupted_upload_leaves_no_object_under_the_final_key(serve, s3, tmp_path):
    fs, endpoint = s3
    server = serve()
    # Two rows in one request each, two long enough to be narrated in chunks and stitched.
    long_rows = [{"id": f"long{i}", "text": f"Row {i}. " + "A long passage of narration. " * (60 if i < 2 else 180),
                  "voice": "alloy"} for i in range(4)]
    manifest = write_csv(tmp_path / "m.csv", long_rows)
    ledger = tmp_path / "ledger.sqlite"
    uri = "s3://audio-bucket/cut"
    args = run_args(manifest, uri, server, "--ledger", ledger, "--format", "wav", "--chunk-chars", "2000")
    proxy = CuttingProxy(("127.0.0.1", int(endpoint.rsplit(":", 1)[1])), limit=64 * 1024)
    try:
        cut = cli(*args, timeout=120, **S3_ENV, AWS_ENDPOINT_URL=f"http://127.0.0.1:{proxy.port}")
    finally:
        proxy.close()
    assert cut.returncode == 1, cut.stderr
    assert proxy.cuts > 0
    assert objects(fs, "audio-bucket/cut") == {}  # neither a final object nor a staging leftover
    failed = ledger_rows(ledger)
    assert len(failed) == 4 and all(e["status"] == "failed" and e["retryable"] for e in failed.values())
    assert "upload to audio-bucket/cut/long0.wav failed" in failed["long0"]["error"]

    healed = cli(*args, timeout=120, **S3_ENV, AWS_ENDPOINT_URL=endpoint)
    assert healed.returncode == 0, healed.stderr
    entries = ledger_rows(ledger)
    assert objects(fs, "audio-bucket/cut") == {e["path"]: e["bytes"] for e in entries.values()}
    assert all(e["bytes"] > 64 * 1024 for e in entries.values())
