"""`batchtts report`: the ledger's attempts against what a real `batchtts serve` saw, and the HTML page
drawn from them (offline, one plot per figure), for a ledger of today's schema and of an earlier one."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

from conftest import FAST_RETRY, cli, cli_env, write_csv

from batchtts.report import FIGURES, INSTALL, reason

MODEL = "openai/gpt-4o-mini-tts"
FIXTURES = Path(__file__).parent / "fixtures"


def figures(page: str) -> list[str]:
    return re.findall(r'<svg id="plot-([a-z]+)"', page)


def assert_offline(page: str) -> None:
    """Nothing in the page reaches out: no address at all, no script, no external reference."""
    assert not re.search(r"https?:|//[a-z]", page, re.IGNORECASE)
    assert "<script" not in page and "<link" not in page and "@import" not in page and "<img" not in page
    assert all(ref.startswith("#") for ref in re.findall(r'(?:href|src)="([^"]*)"', page))
    assert all(ref.startswith("#") for ref in re.findall(r"url\(([^)]*)\)", page))


def test_the_attempts_match_what_the_server_saw_and_the_report_draws_them(serve, tmp_path):
    # 5xx by chance, 429s from a token bucket the first burst of requests overruns.
    server = serve("--fail-rate", "0.15", "--limiter", "bucket", "--rate-limit", "60", "--burst", "3", "--seed", "11")
    texts = {f"r{i:03d}": f"Sentence number {i} of the report test." for i in range(100)}
    texts["long"] = " ".join(f"Sentence {i} of a row long enough to be split into chunks." for i in range(12))
    manifest = write_csv(tmp_path / "m.csv", [{"id": k, "text": t, "voice": "alloy"} for k, t in texts.items()])
    out = tmp_path / "out"
    ran = cli("run", manifest, "--out", out, "--model", MODEL, "--base-url", server.url, "--chunk-chars", "200",
              "--max-attempts", "8", "--concurrency", "16", *FAST_RETRY)
    assert ran.returncode == 0, ran.stderr

    stats = server.stats()
    db = sqlite3.connect(out / "ledger.sqlite")
    try:
        (run_id, summary), = db.execute("SELECT id, summary FROM runs")
        attempts = db.execute("SELECT run_id, status, bytes, characters, retry_after, cost, concurrency, chunk_index, "
                              "row_key, latency_s FROM attempts").fetchall()
    finally:
        db.close()
    assert len(attempts) == stats["requests"]
    assert Counter(str(a[1]) for a in attempts) == Counter(stats["by_status"])  # status for status
    assert {"200", "429"} <= stats["by_status"].keys() and any(s.startswith("5") for s in stats["by_status"])
    assert {a[0] for a in attempts} == {run_id}
    ok = [a for a in attempts if a[1] == 200]
    assert len(ok) == stats["successes"] and all(a[2] > 0 and a[5] > 0 for a in ok)
    assert abs(sum(a[5] for a in ok) - json.loads(summary)["cost_usd"]) < 1e-6
    assert sum(a[3] for a in ok if a[8] != "long") == sum(len(t) for k, t in texts.items() if k != "long")
    assert len(texts["long"]) - 12 <= sum(a[3] for a in ok if a[8] == "long") <= len(texts["long"])  # less the seams
    assert all(a[2] is None and a[5] is None for a in attempts if a[1] != 200)
    assert all(a[4] is not None for a in attempts if a[1] == 429)  # the wait the 429 asked for
    assert all(1 <= a[6] <= 16 and a[9] >= 0 for a in attempts)
    chunks = {a[7] for a in attempts if a[8] == "long"}
    assert len(chunks) > 1 and None not in chunks and {a[7] for a in attempts if a[8] != "long"} == {None}

    reported = cli("report", out, "--to", tmp_path / "logs" / "report.html")
    assert reported.returncode == 0, reported.stderr
    assert "wrote the report to" in reported.stdout
    page = (tmp_path / "logs" / "report.html").read_text()
    assert_offline(page)
    assert figures(page) == list(FIGURES) and page.count("<svg") == len(FIGURES)
    for name, title in FIGURES.items():
        assert f'<section id="{name}">' in page and f"<h2>{title}</h2>" in page
    assert f"{stats['requests']:,} requests, {stats['successes']:,} answered with audio" in page
    assert len(set(re.findall(r'\bid="([^"]+)"', page))) == len(re.findall(r'\bid="([^"]+)"', page))  # ids unique


def test_a_ledger_of_an_earlier_schema_gets_a_report_of_its_rows(tmp_path):
    out = tmp_path / "out"
    shutil.copytree(FIXTURES / "ledgers" / "v2", out)
    written = (out / "ledger.sqlite").read_bytes()
    reported = cli("report", out / "ledger.sqlite")
    assert reported.returncode == 0, reported.stderr
    page = (out / "report.html").read_text()
    assert_offline(page)
    assert figures(page) == list(FIGURES)
    assert "kept no attempts table" in page and "not recorded by this ledger" in page
    assert "2 rows recorded, 2 done" in page
    assert (out / "ledger.sqlite").read_bytes() == written  # read as it is, never upgraded


def test_without_matplotlib_the_report_says_what_to_install(tmp_path):
    out = tmp_path / "out"
    shutil.copytree(FIXTURES / "ledgers" / "v2", out)
    # None in sys.modules is how Python itself says a module cannot be imported.
    program = ("import sys; sys.modules['matplotlib'] = None; from batchtts.cli import main; "
               "main(['report', sys.argv[1]])")
    missing = subprocess.run([sys.executable, "-c", program, str(out)], capture_output=True, text=True, timeout=60,
                             env=cli_env(None))
    assert missing.returncode == 2 and INSTALL in missing.stderr and "Traceback" not in missing.stderr
    assert not (out / "report.html").exists()
    version = subprocess.run([sys.executable, "-c", "import sys; from batchtts.cli import main\ntry: main(['--version'])"
                              "\nexcept SystemExit: print(sorted(m for m in sys.modules if m.startswith('matplotlib')))"],
                             capture_output=True, text=True, timeout=60, env=cli_env(None))
    assert version.stdout.strip().endswith("[]"), version.stdout + version.stderr


def test_failures_group_by_what_went_wrong():
    assert reason(503, "upstream unavailable") == reason(503, "chunk 2 of 9: upstream busy") == "HTTP 503"
    assert reason(None, "body cut short: 100 of 2048 bytes") == reason(None, "body cut short: 7 of 9 bytes")
    assert reason(None, "chunk 4 of 15: read timed out: x") == "read timed out"
    assert reason(None, None) == "unknown"


def test_a_ledger_it_cannot_read_or_a_page_it_cannot_write_is_a_message(tmp_path):
    (tmp_path / "tiny.sqlite").write_bytes(b"x")  # SQLite reads it as an empty database: no tables
    unreadable = cli("report", tmp_path / "tiny.sqlite")
    assert unreadable.returncode == 2 and "no such table: runs" in unreadable.stderr
    out = tmp_path / "out"
    manifest = write_csv(tmp_path / "m.csv", [{"id": "a", "text": "Hello.", "voice": "en-us"}])
    assert cli("run", manifest, "-o", out, "-m", "local/espeak-ng").returncode == 0
    (tmp_path / "file").write_text("a file, not a folder")
    unwritable = cli("report", out, "--to", tmp_path / "file" / "report.html")
    assert unwritable.returncode == 2 and "cannot write the report to" in unwritable.stderr
    assert "unexpected" not in unreadable.stderr + unwritable.stderr
