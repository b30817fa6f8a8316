"""Fixtures: a real `batchtts serve` on loopback, and the real CLI, in a process of its own (`batchtts()`,
`start_batchtts()`) or in this process (`cli()`, for commands that need no process of their own).
Servers and processes of the CLI are forked from a fork server (forkserver.py, one for all the
workers), which has imported the package once: each starts without the second a new interpreter and
its imports take."""

from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import itertools
import json
import logging
import os
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import forkserver
import httpx
import hypothesis
import pytest

# The tests' temporary files (theirs, pytest's folders, the CLI's own) are made in memory where the
# machine has a tmpfs with room, unless TMPDIR says where: a run syncs every file and ledger it
# writes, which on a disk busy with other work takes longer than the tests themselves.
MEMORY = "/dev/shm"
MEMORY_NEEDED = 2 << 30  # bytes free; a run of the suite has a hundred MB or so in use at a time


def _room_in(folder: str) -> int:
    """Bytes free in a folder this process may write to; 0 if it may not, or there is none."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return 0
    stat = os.statvfs(folder)
    return stat.f_bavail * stat.f_frsize


if "TMPDIR" not in os.environ and _room_in(MEMORY) >= MEMORY_NEEDED:
    os.environ["TMPDIR"] = MEMORY  # for the processes the tests start, and the workers
    tempfile.tempdir = None  # chosen again, from TMPDIR, by this process

# pytest rewrites the asserts of each test module as a worker collects it, some seconds a worker:
# cached as bytecode beside the module (tests/__pycache__, as Python caches any module it imports),
# made once a change, not by each worker on every run, even where PYTHONDONTWRITEBYTECODE is set
# (cli_env drops it for the CLI's processes too).
sys.dont_write_bytecode = False

# Hypothesis profiles: how many examples each property test tries (the tests set no count of their own).
# "quick", the default, tries 50: enough to find what the properties are for on every run, cheap enough
# for the whole suite to take two minutes. For the long run, before a release or after changing a
# parser, the CLI's options or the job file's settings:
#     HYPOTHESIS_PROFILE=thorough python -m pytest
# which tries 500 a test (several minutes more).
hypothesis.settings.register_profile("quick", max_examples=50, deadline=None)
hypothesis.settings.register_profile("thorough", max_examples=500, deadline=None)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "quick"))

KEY = "sk-or-test-0123456789abcdef-SECRET"
FAST_RETRY = ["--backoff-initial", "0.01", "--backoff-max", "0.05"]
ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_manifests"

# The longest tests, with the seconds each took in a run of the whole suite on two cores (95.5 s in
# all, the machine otherwise quiet; measured again when tests change much): each worker starts with
# its share of them (pytest_collection_modifyitems), so that none is left to start near the end of
# the run while the other workers run out of tests.
LONGEST = {
    "tests/test_docs.py::test_examples_run[docs/long-form.md]": 31,
    "tests/test_docs.py::test_examples_run[README.md]": 16,
    "tests/test_columnar.py::test_a_rerun_is_planned_by_the_lane_as_the_rows_do": 11,
    "tests/test_unattended.py::test_an_interrupted_upload_leaves_no_object_under_the_final_key": 10,
    "tests/test_columnar.py::test_the_lane_plans_every_manifest_as_the_rows_do": 10,
    "tests/test_docs.py::test_examples_run[docs/datasets.md]": 8,
    "tests/test_faults.py::test_a_full_disk_halts_the_run_cleanly_and_a_rerun_with_room_finishes": 7,
    "tests/test_ratelimit.py::test_each_kind_of_limiter_is_met_without_a_storm_of_429s[bucket-retry-after]": 7,
    "tests/test_report.py::test_the_attempts_match_what_the_server_saw_and_the_report_draws_them": 6,
    "tests/test_manifest_strict.py::test_a_field_of_ten_megabytes_reads": 5,
    "tests/test_unattended.py::test_the_cron_and_systemd_recipes_run_the_nightly_job": 5,
    "tests/test_ratelimit.py::test_each_kind_of_limiter_is_met_without_a_storm_of_429s[in-flight-both]": 5,
    "tests/test_faults.py::test_kill_9_pays_again_only_for_rows_in_flight": 5,
    "tests/test_docs.py::test_examples_run[docs/manifests.md]": 5,
    "tests/test_ratelimit.py::test_each_kind_of_limiter_is_met_without_a_storm_of_429s[sliding-bare-429]": 5,
    "tests/test_ratelimit.py::test_a_host_that_does_not_resolve_stops_the_run_with_exit_3": 4,
    "tests/test_docs.py::test_docs_build_with_warnings_as_errors": 4,
    "tests/test_unattended.py::test_four_shards_cover_every_row_once_and_merge_like_one_run": 4,
}


# One HTTP client for the tests' own requests to `batchtts serve`: each httpx.get() makes a client
# of its own, and its TLS context loads the CA bundle (some 80 ms, for plain-HTTP loopback requests).
# No connection is kept between requests: a server stopped, or closing an idle one, fails none.
http = httpx.Client(timeout=30, limits=httpx.Limits(max_keepalive_connections=0))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Start each worker with its share of the longest tests. xdist's worksteal scheduler cuts the
    collection into one run of tests a worker, each run from its head, and a worker that runs out
    takes from the tail of the longest: LONGEST is shared out, longest first, to the worker with
    the least so far, and put at the head of its run. Every worker orders the same collection alike,
    as xdist requires; one process (-n 0) keeps the order as collected."""
    workers = getattr(config, "workerinput", {}).get("workercount")
    if not workers:
        return
    heads: list[list[pytest.Item]] = [[] for _ in range(workers)]
    loads = [0] * workers
    for item in sorted((i for i in items if i.nodeid in LONGEST), key=lambda i: -LONGEST[i.nodeid]):
        lightest = loads.index(min(loads))
        heads[lightest].append(item)
        loads[lightest] += LONGEST[item.nodeid]
    rest = iter([i for i in items if i.nodeid not in LONGEST])
    ordered: list[pytest.Item] = []
    for worker, head in enumerate(heads):
        size = (len(items) - len(ordered)) // (workers - worker)  # as worksteal cuts its runs
        ordered += head + list(itertools.islice(rest, max(0, size - len(head))))
    items[:] = ordered + list(rest)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Server:
    process: forkserver.Forked
    url: str
    key: str | None = None  # the server's --api-key, which its admin endpoints take too
    initial: dict[str, Any] | None = None  # the settings a reusable server started with

    @property
    def admin(self) -> str:
        return self.url.rsplit("/api/v1", 1)[0] + "/_batchtts"

    @property
    def admin_headers(self) -> dict[str, str]:
        return {} if self.key is None else {"Authorization": f"Bearer {self.key}"}

    def stats(self) -> dict[str, Any]:
        return http.get(f"{self.admin}/stats", headers=self.admin_headers, timeout=5).json()

    def faults(self, **changes: Any) -> dict[str, Any]:
        return http.post(f"{self.admin}/faults", json=changes, headers=self.admin_headers, timeout=5).json()

    def requests_for(self, text: str) -> int:
        return self.stats()["by_input"].get(sha(text), 0)

    def successes_by_input(self) -> Counter[str]:
        return Counter(e["input_sha256"] for e in self.stats()["log"] if e["outcome"] == "ok")


# Servers that hold no state but their counts and the attempts per input (no limiter, quota, credits,
# faults, seed or key), which /_batchtts/reset clears: kept between the tests of a worker, so a test
# gets a server that answers as a new one would without the second a start costs.
REUSABLE = (("--engine", "tone"), ("--engine", "espeak"))


def _die_with_parent() -> None:
    """In the child before exec (Linux): the fork server dies with the test process that started it
    (and the servers and commands it forked with it), even one ended without its teardown (a per-test
    timeout ends a worker with os._exit)."""
    if _prctl is not None:
        _prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None
except (OSError, AttributeError):
    _prctl = None


@functools.cache
def warm() -> forkserver.ForkServer:
    """The fork server: the one the controller of the workers started for them all (its address in
    their environment), or else one of this process's, started for the first server or process of
    the CLI a test needs. Stopped as the process that started it ends (and killed with it, and its
    children with it, if it does not)."""
    if forkserver.ADDRESS in os.environ:
        return forkserver.ForkServer(os.environ[forkserver.ADDRESS])
    server = forkserver.ForkServer.start(cli_env(key=None), _die_with_parent)
    atexit.register(server.stop)
    os.environ[forkserver.ADDRESS] = server.address  # for the shells the tests start, as for the workers
    return server


def pytest_sessionstart(session: pytest.Session) -> None:
    """The controller of several workers starts one fork server for them all, which makes its
    imports while they start: once, not once a worker."""
    if session.config.pluginmanager.hasplugin("dsession"):
        warm()


def _start_server(argv: tuple[str, ...]) -> Server:
    proc = warm().spawn(["serve", "--port", "0", *argv], dict(os.environ))
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        line = proc.stdout.readline() if ready else ""
        if "listening on" not in line:
            proc.kill()
            raise RuntimeError(f"batchtts serve did not start: {line!r} {proc.stderr.read()}")
        key = argv[argv.index("--api-key") + 1] if "--api-key" in argv else None
        server = Server(proc, line.rsplit(" ", 1)[1].strip(), key)
        # The URL is printed once the socket is bound, a moment before uvicorn listens on it: a client
        # as quick as an in-process run would be refused.
        address = httpx.URL(server.url)
        wait_for(lambda: _accepts(address.host, address.port) or proc.poll() is not None, timeout=20, every=0.005)
        if proc.poll() is not None:
            raise RuntimeError(f"batchtts serve stopped at once: {proc.stderr.read()}")
        if argv in REUSABLE:
            server.initial = server.faults()  # the settings it must have again to be handed to another test
        return server
    except BaseException:
        _stop_server(proc)  # no server left behind, whatever failed
        raise


def _accepts(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True


def _stop_server(proc: forkserver.Forked) -> None:
    """Stop a server at once: it has nothing to save, and a graceful shutdown would wait out any
    answer still held back (a --latency of 30 s, a stalled body) for a client long gone."""
    proc.kill()
    proc.wait(10)
    for pipe in (proc.stdout, proc.stderr):
        pipe.close()


def _reset_for_reuse(server: Server) -> bool:
    """Make a server as a new one, or say it cannot be: it is stopped, it wrote to stderr (a test may
    read that), a request is still running, or its settings were changed."""
    proc = server.process
    if proc.poll() is not None or select.select([proc.stderr], [], [], 0)[0]:
        return False
    try:
        if http.get(f"{server.admin}/stats?log=0", timeout=5).json()["in_flight"] != 0:
            return False
        if server.faults() != server.initial:
            return False
        http.post(f"{server.admin}/reset", timeout=5).raise_for_status()
        fresh = http.get(f"{server.admin}/stats", timeout=5).json()
    except (httpx.HTTPError, ValueError, KeyError):
        return False
    return fresh["requests"] == 0 and not fresh["log"] and not fresh["by_input"]


@pytest.fixture(scope="session")
def _idle_servers():
    idle: dict[tuple[str, ...], list[Server]] = {}
    yield idle
    for servers in idle.values():
        for server in servers:
            _stop_server(server.process)


@pytest.fixture
def serve(_idle_servers):
    """Start `batchtts serve --port 0 ARGS...` (the tone engine unless ARGS name one); every server
    is stopped when the test ends, but a plain one (REUSABLE), reset, waits for the next test."""
    started: list[tuple[tuple[str, ...], Server]] = []

    def start(*args: str) -> Server:
        argv = (*([] if "--engine" in args else ["--engine", "tone"]), *args)
        idle = _idle_servers.get(argv)
        server = idle.pop() if idle else _start_server(argv)
        started.append((argv, server))
        return server

    yield start
    for argv, server in started:
        if argv in REUSABLE and _reset_for_reuse(server):
            _idle_servers.setdefault(argv, []).append(server)
        else:
            _stop_server(server.process)


SCHEDULER_VARS = ("JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN",
                  "SLURM_ARRAY_TASK_STEP")


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """The model-list cache of every CLI the tests start lives in a folder of the session's own."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True)
def private_test_cache(private_cache, tmp_path_factory, monkeypatch):
    """... and of the test's own: a server reused from an earlier test (the same URL) is asked for its
    model list afresh, as a new one would be."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(autouse=True)
def logging_as_found():
    """What a test sets up for the whole process when it runs the CLI or the library in-process is
    put back after it, so the next test in this worker starts as in a new process."""
    with _logging_restored():
        yield


@contextmanager
def _logging_restored() -> Iterator[None]:
    """Put back what the CLI or the library sets up for the whole process: structlog's configuration
    (or its absence: the library logs through the standard "batchtts" logger then), the CLI's log
    format, and the handlers of the root and "batchtts" loggers."""
    import structlog

    from batchtts import log as logs

    configured, config, chosen = structlog.is_configured(), structlog.get_config(), logs.chosen()
    loggers = [logging.getLogger(), logging.getLogger("batchtts")]
    saved = [(list(lg.handlers), lg.level, lg.propagate) for lg in loggers]
    try:
        yield
    finally:
        structlog.reset_defaults()
        if configured:
            structlog.configure(**config)
        logs._chosen = chosen
        for lg, (handlers, level, propagate) in zip(loggers, saved, strict=True):
            lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate


def cli_env(key: str | None = KEY, **extra: str) -> dict[str, str]:
    """The test process's environment without what would change a run: a key, a base URL, a
    scheduler's array index (when the tests themselves run as a Slurm or Kubernetes job)."""
    # PYTHONDONTWRITEBYTECODE too: a user's install caches the package's bytecode, and without the
    # cache each process compiles it again, a third of a second a command.
    dropped = ("OPENROUTER_API_KEY", "BATCHTTS_BASE_URL", "PYTHONDONTWRITEBYTECODE", *SCHEDULER_VARS)
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    if key is not None:
        env["OPENROUTER_API_KEY"] = key
    env.update(extra)
    return env


def batchtts(*args: str | Path, key: str | None = KEY, timeout: float = 60, cwd: Path | None = None,
             **env: str) -> subprocess.CompletedProcess[str]:
    """Run the real CLI to completion, in a process of its own (in the folder `cwd`, if given)."""
    proc = start_batchtts(*args, key=key, cwd=cwd, **env)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@dataclass
class CliResult:
    """What `cli()` returns: the attributes tests read from `batchtts()`'s CompletedProcess."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str


@contextmanager
def _deadline(seconds: float, what: str) -> Iterator[None]:
    """Fail (TimeoutError) instead of hanging: the in-process CLI cannot be killed as a subprocess is."""
    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"{what} took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def cli(*args: str | Path, key: str | None = KEY, timeout: float = 60, **env: str) -> CliResult:
    """Run the CLI to completion in this process (click's CliRunner): the same command, environment
    and exit code as `batchtts()`, without the half second a new interpreter costs. For commands
    that need no process of their own: no signal, no kill, no second run at the same time, no
    terminal, no namespace. Whatever the command sets up for the whole process (structlog, the
    log format, a cache of unreachable model lists) is put back as it was."""
    from click.testing import CliRunner

    from batchtts import models
    from batchtts.cli import main

    argv = list(map(str, args))
    # As cli_env(): the test process's environment less what would change a run (None drops a
    # variable for the call; CliRunner puts os.environ back afterwards).
    overrides: dict[str, str | None] = {name: None for name in ("OPENROUTER_API_KEY", "BATCHTTS_BASE_URL", *SCHEDULER_VARS)}
    if key is not None:
        overrides["OPENROUTER_API_KEY"] = key
    overrides.update(env)
    environ, cwd = dict(os.environ), os.getcwd()
    models._unreachable.clear()  # a fresh process remembers no unreachable model list
    try:
        with _logging_restored(), _deadline(timeout, f"batchtts {' '.join(argv)}"):
            result = CliRunner().invoke(main, argv, env=overrides, prog_name="batchtts")
    finally:
        models._unreachable.clear()
        os.chdir(cwd)
    assert dict(os.environ) == environ, "the CLI left the environment changed"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        # A subprocess would have printed a traceback and exited 1: fail here, with the traceback.
        raise result.exception.with_traceback(result.exc_info[2] if result.exc_info else None)
    return CliResult(argv, result.exit_code, result.stdout, result.stderr)


def start_batchtts(*args: str | Path, key: str | None = KEY, cwd: Path | None = None, **env: str) -> forkserver.Forked:
    """Start the real CLI in a process of its own: signals sent to it reach the CLI itself."""
    return warm().spawn(list(map(str, args)), cli_env(key, **env), cwd=None if cwd is None else str(cwd))


def batchtts_command() -> str:
    """The path of a `batchtts` for a shell to run (the fork server's: forkserver.command)."""
    return str(warm().bindir / "batchtts")


def error_message(result: subprocess.CompletedProcess[str]) -> str:
    """What the CLI said of an expected fault: off a terminal it is the `error` JSON event's message."""
    for line in result.stderr.splitlines():
        if line.startswith("{") and (event := json.loads(line)).get("event") == "error":
            assert event["exit_code"] == result.returncode
            return event["message"]
    return result.stderr


def ledger_rows(path: Path, table: str = "rows") -> dict[str, dict[str, Any]]:
    """A ledger table's records by key (`rows` by default); none before a starting run has created
    it. Read-only: a reader never creates or changes the file a run is about to open."""
    if not path.exists():
        return {}
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        if db.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (table,)).fetchone() is None:
            return {}
        return {r["key"]: dict(r) for r in db.execute(f"SELECT * FROM {table}")}
    finally:
        db.close()


def ledger_count(path: Path, table: str = "rows") -> int:
    """How many records a ledger table holds (none before a starting run has created it): what a
    test polling a run's progress needs, without reading every record as `ledger_rows` does."""
    if not path.exists():
        return 0
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        if db.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (table,)).fetchone() is None:
            return 0
        return int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
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
