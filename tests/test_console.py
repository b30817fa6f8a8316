"""What a person sees on a terminal: the run in a pseudo-terminal, read as the screen shows it."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

from conftest import FAST_RETRY, cli, cli_env, write_csv

MODEL = "openai/gpt-4o-mini-tts"


def _read_until(fd: int, seen: bytearray, pattern: bytes, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(pattern, seen):
            return True
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                return bool(re.search(pattern, seen))
            if not chunk:
                return bool(re.search(pattern, seen))
            seen += chunk
    return False


def test_a_run_on_a_terminal_shows_one_start_line_the_bar_and_how_to_resume(serve, tmp_path):
    server = serve("--latency", "0.2")
    manifest = write_csv(tmp_path / "m.csv", [{"id": f"r{i}", "text": f"Row number {i}.",
                                               "voice": "zz-nope" if i == 5 else "alloy"} for i in range(40)])
    out = tmp_path / "out"
    run = ["run", str(manifest), "-o", str(out), "-m", MODEL, "--base-url", server.url, "-c", "2", *FAST_RETRY]
    assert cli(*run, "--limit", "4").returncode == 0
    args = [sys.executable, "-m", "batchtts", *run]
    master, slave = pty.openpty()
    env = {**cli_env(), "COLUMNS": "160", "TERM": "xterm"}
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
    os.close(slave)
    seen = bytearray()
    try:
        assert _read_until(master, seen, rb"rows \d+/40 \(4 before\), failed 1", 30), seen.decode(errors="replace")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
        _read_until(master, seen, rb"to resume, run the same command again: batchtts run [^\r\n]*\r?\n", 10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    screen = seen.decode(errors="replace")
    lines = [line for line in re.split(r"[\r\n]+", screen) if line.strip()]
    starts = [line for line in lines if "→" in line]
    assert len(starts) == 1 and re.search(r"40 rows, 4 done before, 36 to do, estimate \$", starts[0]), screen
    assert re.search(r"\d+%\|.*rows \d+/40 \(4 before\), failed 1, retries \d+, ≤\d+ at once", screen)
    assert "row 6 (r5) failed: HTTP 400: Invalid request parameters: " in screen  # what a person acts on
    assert "[rerun with --retry-failed to retry]" in screen
    assert re.search(r"stopped: interrupted by SIGINT; \d+ rows? left", screen)
    assert f"to resume, run the same command again: batchtts run {manifest}" in screen
    # Log records are for machines: no timestamps, levels in brackets or key=value dumps on a terminal.
    assert not re.search(r"\d{4}-\d\d-\d\dT|\[info|\w+=None|\"event\"", screen), screen
