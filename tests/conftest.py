"""Fixtures: a real `batchtts serve` on loopback and the real CLI in a subprocess."""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

KEY = "sk-or-test-0123456789abcdef-SECRET"
FAST_RETRY = ["--backoff-initial", "0.01", "--backoff-max", "0.05"]
ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_manifests"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Server:
    process: subprocess.Popen[str]
    url: str
    key: str | None = None  # the server's --api-key, which its admin endpoints take too

    @property
    def admin(self) -> str:
        return self.url.rsplit("/api/v1", 1)[0] + "/_batchtts"

    @property
    def admin_headers(self) -> dict[str, str]:
        return {} if self.key is None else {"Authorization": f"Bearer {self.key}"}

    def stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.admin}/stats", headers=self.admin_headers, timeout=5).json()

    def faults(self, **changes: Any) -> dict[str, Any]:
        return httpx.post(f"{self.admin}/faults", json=changes, headers=self.admin_headers, timeout=5).json()

    def requests_for(self, text: str) -> int:
        return self.stats()["by_input"].get(sha(text), 0)

    def successes_by_input(self) -> Counter[str]:
        return Counter(e["input_sha256"] for e in self.stats()["log"] if e["outcome"] == "ok")


@pytest.fixture
def serve():
    """Start `batchtts serve --port 0 ARGS...` (the tone engine unless ARGS name one); every server
    is stopped when the test ends."""
    started: list[subprocess.Popen[str]] = []

    def start(*args: str) -> Server:
        engine = [] if "--engine" in args else ["--engine", "tone"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "batchtts", "serve", "--port", "0", *engine, *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        started.append(proc)
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        line = proc.stdout.readline() if ready else ""
        if "listening on" not in line:
            proc.kill()
            raise RuntimeError(f"batchtts serve did not start: {line!r} {proc.stderr.read()}")
        key = args[args.index("--api-key") + 1] if "--api-key" in args else None
        return Server(proc, line.rsplit(" ", 1)[1].strip(), key)

    yield start
    for proc in started:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


SCHEDULER_VARS = ("JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN")


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """The model-list cache of every CLI the tests start lives in a folder of the session's own."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))


def cli_env(key: str | None = KEY, **extra: str) -> dict[str, str]:
    """The test process's environment without what would change a run: a key, a base URL, a
    scheduler's array index (when the tests themselves run as a Slurm or Kubernetes job)."""
    dropped = ("OPENROUTER_API_KEY", "BATCHTTS_BASE_URL", *SCHEDULER_VARS)
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    if key is not None:
        env["OPENROUTER_API_KEY"] = key
    env.update(extra)
    return env


def batchtts(*args: str | Path, key: str | None = KEY, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the real CLI to completion."""
    return subprocess.run(
        [sys.executable, "-m", "batchtts", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=cli_env(key, **env),
    )


def start_batchtts(*args: str | Path, key: str | None = KEY) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "batchtts", *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(key),
    )


def error_message(result: subprocess.CompletedProcess[str]) -> str:
    """What the CLI said of an expected fault: off a terminal it is the `error` JSON event's message."""
    for line in result.stderr.splitlines():
        if line.startswith("{") and (event := json.loads(line)).get("event") == "error":
            assert event["exit_code"] == result.returncode
            return event["message"]
    return result.stderr


def ledger_rows(path: Path) -> dict[str, dict[str, Any]]:
    """The ledger's rows by key; none before a starting run has created it. Read-only: a reader
    never creates or changes the file a run is about to open."""
    if not path.exists():
        return {}
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'rows'").fetchone() is None:
            return {}
        return {r["key"]: dict(r) for r in db.execute("SELECT * FROM rows")}
    finally:
        db.close()


def wait_for(predicate, timeout: float = 20, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(every)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGKILL) -> None:
    proc.send_signal(sig)
    proc.wait(20)
