"""What a person or a program reads after a run: `status`, `export`, the dry run's plan, all counting
alike; and what the commands leave behind (nothing, when a start is refused or a ledger is read)."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
from collections import Counter
from pathlib import Path

from conftest import FAST_RETRY, batchtts, batchtts_command, cli, cli_env, start_batchtts, stop, wait_for, write_csv

MODEL = "openai/gpt-4o-mini-tts"


def _job_of_every_kind(serve, tmp_path: Path) -> tuple[Path, Path, str]:
    """A job whose rows are done, failed for good, failed and retried by the next run, passed over by
    a budget, and never tried; returns the manifest, the output folder and the second run's summary."""
    rows = [{"id": "r1", "text": "Hello one.", "voice": "alloy"},
            {"id": "r2", "text": "Hello two.", "voice": "alloy"},
            {"id": "r3", "text": "Hello three.", "voice": "alloy"},
            {"id": "r4", "text": "A voice the model lacks.", "voice": "zz-nope"},
            {"id": "r5", "text": "Long " * 100, "voice": "alloy"},
            {"id": "r6", "text": "Hello six.", "voice": "alloy"}]
    manifest, out = write_csv(tmp_path / "m.csv", rows), tmp_path / "out"
    failing = serve("--fail-first", "1", "--fail-status", "503")
    first = cli("run", manifest, "-o", out, "-m", MODEL, "--base-url", failing.url, "--max-attempts", "1", *FAST_RETRY)
    assert first.returncode == 1, first.stderr
    plain = serve()
    second = cli("run", manifest, "-o", out, "-m", MODEL, "--base-url", plain.url, "--max-chars", "200", *FAST_RETRY)
    assert second.returncode == 1, second.stderr
    write_csv(manifest, [*rows, {"id": "r7", "text": "Hello seven.", "voice": "alloy"},
                         {"id": "r8", "text": "Hello eight.", "voice": "alloy"}])
    return manifest, out, second.stdout


def test_run_status_export_and_the_plan_count_alike(serve, tmp_path):
    manifest, out, summary = _job_of_every_kind(serve, tmp_path)
    # The second run: r1-r3 and r6 narrated, r5 passed over (recorded failed, retried next run), r4
    # refused by the provider in the first run for good.
    assert re.search(r"narrated 4 rows, 1 failed, 0 already done, 1 failed earlier", summary), summary

    status = json.loads(cli("status", out, "--json").stdout)
    assert (status["total"], status["done"], status["failed"], status["retried_next_run"], status["pending"]) == (8, 4, 2, 1, 2)

    exported = cli("export", out, "--to", "-", "--format", "jsonl")
    assert exported.returncode == 0
    records = [json.loads(line) for line in exported.stdout.splitlines()]
    assert Counter(r["status"] for r in records) == {"done": 4, "failed": 2, "pending": 2}
    assert {r["id"] for r in records if r["status"] == "failed"} == {"r4", "r5"}

    plan = json.loads(cli("run", manifest, "-o", out, "-m", MODEL, "--dry-run", "--json").stdout)["total"]
    assert plan["done"] == status["done"]
    assert plan["failed"] + plan["retrying"] == status["failed"] and plan["retrying"] == status["retried_next_run"]
    assert plan["pending"] - plan["retrying"] == status["pending"]

    text = cli("status", out).stdout
    assert "failed 2 (1 retried by the next run, 1 with --retry-failed), pending 2" in text
    assert cli("status", out, "--check").returncode == 1
    assert cli("status", out).returncode == 0


def test_status_check_passes_a_job_without_failures(tmp_path):
    out = tmp_path / "out"
    manifest = write_csv(tmp_path / "m.csv", [{"id": "a", "text": "Hello.", "voice": "en-us"}])
    assert cli("run", manifest, "-o", out, "-m", "local/espeak-ng").returncode == 0
    check = cli("status", out, "--check")
    assert check.returncode == 0 and "failed 0, pending 0" in check.stdout
    assert "retried" not in check.stdout


def test_ledgers_of_different_jobs_are_reported_apart_never_merged(tmp_path):
    outs = []
    for name, count in (("a", 3), ("b", 2)):
        manifest = write_csv(tmp_path / f"{name}.csv", [{"id": f"{name}{i}", "text": f"Row {i}.", "voice": "en-us"}
                                                        for i in range(count)])
        outs.append(tmp_path / name)
        assert cli("run", manifest, "-o", outs[-1], "-m", "local/espeak-ng").returncode == 0
    reports = [json.loads(line) for line in cli("status", *outs, "--json").stdout.splitlines()]
    assert [(r["total"], r["done"]) for r in reports] == [(3, 3), (2, 2)]
    by_file = [json.loads(line) for line in cli("status", outs[0] / "ledger.sqlite", outs[1] / "ledger.sqlite",
                                                "--json").stdout.splitlines()]
    assert [r["done"] for r in by_file] == [3, 2]
    merged = cli("export", *outs, "--to", tmp_path / "all.csv")
    assert merged.returncode == 2 and "2 different jobs" in merged.stderr
    assert not (tmp_path / "all.csv").exists()


def test_a_refused_start_leaves_no_folder_and_no_lock(tmp_path):
    manifest = write_csv(tmp_path / "bad.csv", [{"text": "", "voice": "alloy"}])
    out = tmp_path / "new" / "deeper"
    refused = cli("run", manifest, "-o", out, "-m", "local/espeak-ng")
    assert refused.returncode == 2
    assert not (tmp_path / "new").exists()
    no_key = cli("run", write_csv(tmp_path / "ok.csv", [{"text": "Hi.", "voice": "alloy"}]), "-o", out, "-m", MODEL,
                 "--base-url", "http://127.0.0.1:9/api/v1", key=None)
    assert no_key.returncode == 2 and "OPENROUTER_API_KEY" in no_key.stderr
    assert not (tmp_path / "new").exists()


def test_reading_a_ledger_leaves_no_wal_or_shm(tmp_path):
    out = tmp_path / "out"
    manifest = write_csv(tmp_path / "m.csv", [{"id": "a", "text": "Hello.", "voice": "en-us"}])
    assert cli("run", manifest, "-o", out, "-m", "local/espeak-ng").returncode == 0
    for command in (["status", out], ["export", out, "--to", tmp_path / "r.csv"],
                    ["run", manifest, "-o", out, "-m", "local/espeak-ng", "--dry-run"]):
        assert cli(*command).returncode == 0
        assert sorted(p.name for p in out.glob("ledger.sqlite*")) == ["ledger.sqlite"], command
    # ...and a reader refuses to write: the ledger is unchanged.
    with sqlite3.connect(out / "ledger.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM rows").fetchone() == (1,)


def test_export_to_stdout_as_csv_and_jsonl(tmp_path):
    out = tmp_path / "out"
    manifest = write_csv(tmp_path / "m.csv", [{"id": "a", "text": "Hello.", "voice": "en-us", "speaker": "x"},
                                              {"id": "b", "text": "World.", "voice": "en-us", "speaker": "y"}])
    assert cli("run", manifest, "-o", out, "-m", "local/espeak-ng").returncode == 0
    as_csv = cli("export", out, "--to", "-")
    assert as_csv.returncode == 0 and as_csv.stdout.splitlines()[0].startswith('"row","id","text"')
    assert len(as_csv.stdout.splitlines()) == 3 and "wrote" not in as_csv.stdout
    lines = [json.loads(line) for line in cli("export", out, "--to", "-", "--format", "jsonl").stdout.splitlines()]
    assert [(r["id"], r["status"], r["speaker"]) for r in lines] == [("a", "done", "x"), ("b", "done", "y")]
    to_file = cli("export", out, "--to", tmp_path / "r.jsonl")
    assert to_file.returncode == 0 and len((tmp_path / "r.jsonl").read_text().splitlines()) == 2
    parquet_out = cli("export", out, "--to", "-", "--format", "parquet")
    assert parquet_out.returncode == 2 and "Parquet needs a file" in parquet_out.stderr


def test_status_watch_follows_a_run_until_it_ends(serve, tmp_path):
    server = serve("--latency", "0.3")
    out = tmp_path / "out"
    manifest = write_csv(tmp_path / "m.csv", [{"id": f"r{i}", "text": f"Row {i}.", "voice": "alloy"} for i in range(6)])
    run = start_batchtts("run", manifest, "-o", out, "-m", MODEL, "--base-url", server.url, "-c", "1")
    try:
        wait_for(lambda: server.stats()["requests"] >= 1, timeout=30)
        watch = batchtts("status", out, "--watch", "--interval", "0.2", "--json")
        assert run.wait(timeout=30) == 0
    finally:
        stop(run)
    reports = [json.loads(line) for line in watch.stdout.splitlines()]
    assert watch.returncode == 0 and len(reports) >= 2
    assert reports[0]["running"] == run.pid and reports[-1]["running"] is None
    assert reports[-1]["done"] == 6 and reports[0]["done"] < 6
    # A pid left in the lock file, alive or not, is no run: the lock itself is asked.
    lock = next(out.glob(".batchtts-*.lock"))
    for pid in (os.getpid(), 1):
        lock.write_text(str(pid))
        assert json.loads(cli("status", out, "--json").stdout)["running"] is None


def test_export_to_a_reader_that_stops_early_ends_quietly(tmp_path):
    out = tmp_path / "out"
    rows = [{"id": f"r{i:04d}", "text": f"Row number {i}.", "voice": "en-us"} for i in range(200)]
    manifest = write_csv(tmp_path / "m.csv", rows)
    assert cli("run", manifest, "-o", out, "-m", "local/espeak-ng", "--limit", "1").returncode == 0
    export = f"{batchtts_command()} export {out} --to -"
    for fmt in ("csv", "jsonl"):  # `true` has gone before the first line is written
        piped = subprocess.run(f"set -o pipefail; {export} --format {fmt} | true", shell=True, executable="/bin/bash",
                               capture_output=True, text=True, timeout=60, env=cli_env())
        assert piped.returncode == 141 and piped.stderr == "", piped.stderr  # as a tool killed by SIGPIPE
    full = subprocess.run(f"{export} > /dev/full", shell=True, capture_output=True, text=True, timeout=60, env=cli_env())
    assert full.returncode == 2 and "cannot write the export to standard output: No space left" in full.stderr
    assert "Traceback" not in full.stderr and "unexpected" not in full.stderr


def test_env_file_fills_the_environment_but_never_overrides_it(serve, tmp_path):
    server = serve()
    manifest = write_csv(tmp_path / "m.csv", [{"id": "a", "text": "Hello.", "voice": "alloy"}])
    (tmp_path / ".env").write_text(f"# the rehearsal\nBATCHTTS_BASE_URL={server.url}\nOPENROUTER_API_KEY=from-dotenv\n")
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        result = cli("run", "m.csv", "-o", "out", "-m", MODEL, key=None)
        assert result.returncode == 0, result.stderr
        assert server.stats()["requests"] >= 1
        explicit = cli("run", "m.csv", "-o", "out2", "-m", MODEL, "--dry-run", key="set",
                       BATCHTTS_BASE_URL="http://127.0.0.1:9/api/v1")
        assert "127.0.0.1:9/api/v1/models" in explicit.stdout + explicit.stderr
    finally:
        os.chdir(here)
    missing = cli("run", manifest, "-o", tmp_path / "o", "-m", MODEL, "--env-file", tmp_path / "nope.env")
    assert missing.returncode == 2 and "nope.env: no such file" in missing.stderr
    (tmp_path / "bad.env").write_text("GOOD=1\nsk-or-secret-key-pasted-alone\n")
    bad = cli("run", manifest, "-o", tmp_path / "o", "-m", MODEL, "--env-file", tmp_path / "bad.env")
    assert bad.returncode == 2 and "bad.env, line 2" in bad.stderr and "secret" not in bad.stderr
    # A .env found in the folder may be another tool's: a line it cannot take is skipped, said, not fatal.
    (tmp_path / ".env").write_text(f"DEBUG\nBATCHTTS_BASE_URL={server.url}\n")
    os.chdir(tmp_path)
    try:
        lenient = cli("run", "m.csv", "-o", "out3", "-m", MODEL, "--dry-run")
    finally:
        os.chdir(here)
    assert lenient.returncode == 0 and ".env, line 1: not KEY=VALUE (or a # comment); line skipped" in lenient.stderr
