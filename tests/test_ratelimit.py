"""Rate limits of every common kind, as `batchtts serve` enforces them, met by the real CLI: the run
finishes, every file is whole, and the 429s stay under the bound each test states. Waits the
provider asks for that are longer than the run should sleep, and a provider that cannot be reached
at all, stop the run with exit 3 and leave the rows for the next one."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time

import pytest
from conftest import FAST_RETRY, cli, cli_env, ledger_rows, write_csv
from test_faults import done_files

from batchtts.errors import EXIT_PROVIDER_STOP

MODEL = "openai/gpt-4o-mini-tts"


def rows(n: int) -> list[dict[str, str]]:
    return [{"id": f"r{i:04d}", "text": f"Sentence {i}.", "voice": "alloy"} for i in range(n)]


def summary(stderr: str) -> dict:
    return next(json.loads(line) for line in stderr.splitlines() if '"event": "summary"' in line)


# The bound on 429s: in a run this short the cold start weighs heavily. A window lets a burst
# through and then refuses every request already on its way, so the windows' bound is looser;
# bench/ratelimit.py measures the shares over longer runs.
@pytest.mark.parametrize(("limiter", "headers", "bound"), [
    (["--limiter", "bucket", "--rate-limit", "40", "--burst", "2"], "retry-after", 0.15),
    (["--limiter", "fixed", "--rate-limit", "20", "--window", "0.5"], "reset", 0.3),
    (["--limiter", "sliding", "--rate-limit", "20", "--window", "0.5"], "none", 0.3),
    (["--max-in-flight", "4", "--latency", "0.1"], "both", 0.15),
], ids=["bucket-retry-after", "fixed-reset", "sliding-bare-429", "in-flight-both"])
def test_each_kind_of_limiter_is_met_without_a_storm_of_429s(serve, tmp_path, limiter, headers, bound):
    server = serve(*limiter, "--rate-limit-headers", headers)
    out = tmp_path / "out"
    result = cli("run", write_csv(tmp_path / "m.csv", rows(150)), "--out", out, "--model", MODEL,
                      "--base-url", server.url, "--concurrency", "64", "--log-format", "json", *FAST_RETRY, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(ledger_rows(out / "ledger.sqlite")) == 150
    done_files(out)
    stats = server.stats()
    assert stats["successes"] == 150
    assert stats["by_status"].get("429", 0) <= bound * stats["requests"], stats["by_status"]


def test_a_spent_quota_stops_the_run_and_a_rerun_after_the_reset_goes_on(serve, tmp_path):
    server = serve("--quota", "20", "--quota-reset", "3600", "--rate-limit-headers", "reset")
    manifest = write_csv(tmp_path / "m.csv", rows(40))
    out = tmp_path / "out"
    args = ["run", manifest, "--out", out, "--model", MODEL, "--base-url", server.url, "--max-wait", "0.5",
            "--log-format", "json", *FAST_RETRY]
    started = time.monotonic()
    first = cli(*args)
    assert first.returncode == EXIT_PROVIDER_STOP, first.stderr
    assert time.monotonic() - started < 20
    assert "Traceback" not in first.stderr
    assert "free-models-per-day" in first.stdout and "resets in 60 min" in first.stdout
    assert "run the same command again after" in first.stdout
    entries = ledger_rows(out / "ledger.sqlite")
    assert sum(e["status"] == "done" for e in entries.values()) == 20
    assert not any(e["status"] == "failed" for e in entries.values())  # the rest are pending, not failed
    server.faults(quota=100)  # a new period: the quota is fresh again
    again = cli(*args)
    assert again.returncode == 0, again.stderr
    assert "20 already done" in again.stdout
    assert len(ledger_rows(out / "ledger.sqlite")) == 40


def test_nothing_listening_stops_the_run_with_exit_3_and_says_where_it_looked(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound but never listening: every connection is refused
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/api/v1"
        started = time.monotonic()
        result = cli("run", write_csv(tmp_path / "m.csv", rows(200)), "--out", tmp_path / "out", "--model", MODEL,
                          "--base-url", url, "--backoff-initial", "0.2", "--backoff-max", "1", timeout=60)
    seconds = time.monotonic() - started
    assert result.returncode == EXIT_PROVIDER_STOP, result.stderr
    assert seconds < 20
    assert "cannot reach the provider" in result.stdout and url in result.stdout
    assert "check the base URL" in result.stdout
    assert summary(result.stderr)["requests"] < 200 * 6 // 2  # far from every row's six attempts


def test_a_host_that_does_not_resolve_stops_the_run_with_exit_3(tmp_path):
    """In a network namespace of its own, with no network at all: no name resolves, and no query
    leaves the machine."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode:
        pytest.skip("this machine allows no private network namespace")
    manifest = write_csv(tmp_path / "m.csv", rows(50))
    result = subprocess.run(
        ["unshare", "-rn", sys.executable, "-m", "batchtts", "run", str(manifest), "--out", str(tmp_path / "out"),
         "--model", MODEL, "--base-url", "http://speech.example.invalid/api/v1", "--backoff-initial", "0.2",
         "--backoff-max", "1"],
        capture_output=True, text=True, timeout=60, env=cli_env(),
    )
    assert result.returncode == EXIT_PROVIDER_STOP, result.stderr
    assert "cannot reach the provider" in result.stdout and "speech.example.invalid" in result.stdout
