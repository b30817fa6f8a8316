"""Generated inputs through the real CLI: manifests of every format (well-formed, odd and plain
garbage), flags and job files with values of every type. Whatever comes in, a run ends with exit 0,
1 or 2 and a message, never a traceback or a hang; a refused input sends nothing; nothing is written
outside the output folder.

The CLI runs in-process (click's CliRunner, through conftest's `cli()`) against a real `batchtts serve`
on loopback, so each input takes a fraction of a second. How many inputs a test tries is the Hypothesis
profile's (conftest.py: HYPOTHESIS_PROFILE=thorough for the long run); the count tried is printed
(`pytest -s`).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import KEY, cli, http
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MODEL = "openai/gpt-4o-mini-tts"
TRIED: dict[str, int] = {}

_texts = st.one_of(
    st.text(min_size=0, max_size=80),
    st.sampled_from(["Hello there.", "  ", "", "[[bad]] row", "A" * 300, "Ünïcödé ✓ 你好.", "\ud800 lone"]),
    st.integers(), st.floats(allow_nan=True), st.none(), st.lists(st.integers(), max_size=2),
)
_names = st.one_of(
    st.text(alphabet="ab./\\_-:é \x00", min_size=0, max_size=12),
    st.sampled_from(["../x", "/abs", "C:\\x", "ledger.sqlite", "ledger.sqlite-wal", ".batchtts-x", "d.mp3",
                     "d.mp3/inner.mp3", "n" * 300, "sub/ok.wav", "a" * 120 + "é" * 80]),
)
_rows = st.lists(st.fixed_dictionaries({}, optional={
    "id": st.one_of(_names, st.integers(), st.none()),
    "text": _texts,
    "voice": st.sampled_from(["alloy", "nova", "allloy", "en-gb", "pt-br", "", "zz-nope", "21m00Tcm4TlvDq8ikWAM"]),
    "model": st.sampled_from([MODEL, "local/espeak-ng", "local/espeak", "", "missing/model"]),
    "response_format": st.sampled_from(["mp3", "wav", "pcm", "ogg", "", "MP3"]),
    "speed": st.sampled_from(["1", "0", "-1", "2.5", "fast", "", "4.5", "nan"]),
    "output": _names,
    "provider_options": st.sampled_from(['{"a": 1}', "[1]", "{bad", "", '{"x": {"y": [1, 2]}}']),
    "title": st.text(max_size=10),
}), min_size=0, max_size=6)


def _csv(rows: list[dict[str, Any]], delimiter: str) -> bytes:
    columns = list(dict.fromkeys(k for r in rows for k in r)) or ["text"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, delimiter=delimiter, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8", "surrogatepass")


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8", "surrogatepass")


def _parquet(rows: list[dict[str, Any]]) -> bytes:
    try:
        table = pa.Table.from_pylist(rows) if rows else pa.table({"text": pa.array([], pa.string())})
    except (pa.ArrowException, TypeError, ValueError):
        table = pa.Table.from_pylist([{k: None if v is None else str(v) for k, v in r.items()} for r in rows])
    buffer = io.BytesIO()
    try:
        pq.write_table(table, buffer)
    except (pa.ArrowException, UnicodeEncodeError):
        return b"PAR1 not really"
    return buffer.getvalue()


@st.composite
def manifests(draw: st.DrawFn) -> tuple[str, bytes]:
    """A manifest's name and bytes: rows encoded in a format, sometimes damaged, sometimes garbage."""
    kind = draw(st.sampled_from(["csv", "tsv", "jsonl", "parquet", "csv.gz", "jsonl.gz"]))
    rows = draw(_rows)
    base = kind.removesuffix(".gz")
    data = _csv(rows, "\t" if base == "tsv" else ",") if base in ("csv", "tsv") else \
        _jsonl(rows) if base == "jsonl" else _parquet(rows)
    damage = draw(st.sampled_from(["none", "none", "truncate", "insert", "garbage", "bom16"]))
    if damage == "truncate" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif damage == "insert":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
    elif damage == "garbage":
        data = draw(st.binary(max_size=200))
    elif damage == "bom16":
        data = data.decode("utf-8", "replace").encode("utf-16")
    if kind.endswith(".gz"):
        data = gzip.compress(data)
        if draw(st.booleans()):
            data = data[: max(1, len(data) // 2)]
    return f"manifest.{kind}", data


_flag_values: dict[str, st.SearchStrategy[str]] = {
    "--concurrency": st.sampled_from(["1", "4", "0", "-1", "many", "99999"]),
    "--speed": st.sampled_from(["1", "0", "-1", "0.25", "4", "9", "nan", "fast"]),
    "--timeout": st.sampled_from(["5", "0", "-1", "slow", "inf"]),
    "--connect-timeout": st.sampled_from(["5", "-3", "x"]),
    "--grace": st.sampled_from(["1", "-3", "x"]),
    "--limit": st.sampled_from(["0", "2", "-1", "x"]),
    "--max-attempts": st.sampled_from(["1", "3", "0", "x"]),
    "--format": st.sampled_from(["mp3", "wav", "pcm", "ogg"]),
    "--voice": st.sampled_from(["alloy", "allloy", "en-gb", "es-419", ""]),
    "--model": st.sampled_from([MODEL, "local/espeak-ng", "local/espeak", "openai/gpt-4o-mini-ts"]),
    "--chunk-chars": st.sampled_from(["1", "50", "0", "x"]),
    "--max-chars": st.sampled_from(["0", "100", "-5", "x"]),
    "--max-cost": st.sampled_from(["0", "0.01", "-1", "nan"]),
    "--shard": st.sampled_from(["0/2", "1/2", "2/2", "x", "0/0"]),
    "--rpm": st.sampled_from(["600", "0", "-1", "x"]),
    "--max-runtime": st.sampled_from(["1h", "30s", "x", "-5", "0"]),
    "--backoff-max": st.sampled_from(["0.01", "-1", "x"]),
    "--progress-interval": st.sampled_from(["1", "0", "-1", "x"]),
}


@st.composite
def flag_lists(draw: st.DrawFn) -> list[str]:
    names = draw(st.lists(st.sampled_from(sorted(_flag_values)), max_size=4, unique=True))
    flags = [part for name in names for part in (name, draw(_flag_values[name]))]
    if draw(st.booleans()):
        flags.append("--dry-run")
    return flags


_toml_values = st.one_of(
    st.integers(-5, 100), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
    st.text(max_size=8), st.lists(st.integers(0, 600), max_size=3), st.just({"k": 1}),
)
_toml_keys = st.sampled_from([
    "concurrency", "concurency", "limit", "requests_per_minute", "progress_interval", "grace_seconds",
    "max_runtime", "chunk_chars", "dry_run", "retry_failed", "log_format", "shard", "strict",
    "defaults.speed", "defaults.voice", "defaults.format", "retry.max_attempts", "retry.statuses",
    "retry.backoff_initial", "timeouts.read", "timeouts.connect", "budget.max_cost", "budget.max_chars",
    "stitching.sentence_gap", "provider.base_url", "limits", "prices", "nonsense.key",
])


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if value != value else ("inf" if value > 0 else "-inf") if value in (float("inf"), float("-inf")) \
            else repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return str(value)


@st.composite
def job_files(draw: st.DrawFn) -> str:
    """A job file naming a good manifest, with a few settings of any type."""
    settings_ = draw(st.dictionaries(_toml_keys, _toml_values, max_size=4))
    top = [f"{k} = {_toml(v)}" for k, v in settings_.items() if "." not in k]
    sections: dict[str, list[str]] = {}
    for key, value in settings_.items():
        if "." in key:
            section, name = key.split(".", 1)
            sections.setdefault(section, []).append(f"{name} = {_toml(value)}")
    text = 'manifest = "good.csv"\nout = "out"\n' + "\n".join(top) + "\n"
    for section, lines in sections.items():
        text += f"\n[{section}]\n" + "\n".join(lines) + "\n"
    if draw(st.integers(0, 9)) == 0:
        text = text.encode("utf-8")[: draw(st.integers(0, len(text)))].decode("utf-8", "ignore") + "\xff= ["
    return text


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _invoke(server, folder: Path, args: list[str], kind: str) -> None:
    """Run the CLI once in a fresh folder and check what a user (and the provider) would see."""
    TRIED[kind] = TRIED.get(kind, 0) + 1
    before = server.stats()["requests"]
    outside = _files(folder)
    cwd = os.getcwd()
    os.chdir(folder)
    try:  # an exception other than the exit fails the example, as would a run of more than 60 s
        result = cli(*args, key=KEY, timeout=60, BATCHTTS_BASE_URL=server.url, XDG_CACHE_HOME=str(folder / ".cache"))
    finally:
        os.chdir(cwd)
    shown = result.stdout + result.stderr
    assert result.returncode in (0, 1, 2), (args, result.returncode, shown[-2000:])
    assert "Traceback" not in shown, (args, shown[-2000:])
    if result.returncode == 2:
        assert server.stats()["requests"] == before, (args, "a refused run sent requests", shown[-2000:])
    written = {p for p in _files(folder) - outside if not p.startswith(("out", ".cache"))}
    assert not written, (args, f"files outside --out: {sorted(written)}")


@pytest.fixture(scope="module")
def fuzz_server():
    """One rehearsal server for every example (a fresh one each would cost more than the runs)."""
    import select
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "batchtts", "serve", "--port", "0", "--engine", "tone"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        line = proc.stdout.readline() if ready else ""
        assert "listening on" in line, line

        class _Server:
            url = line.rsplit(" ", 1)[1].strip()

            def stats(self) -> dict[str, Any]:
                return http.get(self.url.rsplit("/api/v1", 1)[0] + "/_batchtts/stats?log=0", timeout=5).json()

        yield _Server()
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def scratch() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="batchtts-fuzz-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


_SETTINGS = settings(deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@_SETTINGS
@given(manifest=manifests(), model=st.sampled_from([MODEL, "local/espeak-ng"]))
def test_any_manifest_ends_in_a_message_and_an_exit_code(fuzz_server, scratch, manifest, model):
    name, data = manifest
    folder = Path(tempfile.mkdtemp(dir=scratch))
    (folder / name).write_bytes(data)
    _invoke(fuzz_server, folder, ["run", name, "--out", "out", "--model", model, "--voice", "alloy",
                                  "--backoff-initial", "0.001", "--backoff-max", "0.01", "--log-format", "json"],
            "manifests")


@_SETTINGS
@given(flags=flag_lists())
def test_any_flags_end_in_a_message_and_an_exit_code(fuzz_server, scratch, flags):
    folder = Path(tempfile.mkdtemp(dir=scratch))
    (folder / "good.csv").write_text("id,text,voice\na,Hello there.,alloy\nb,Good night.,nova\n")
    _invoke(fuzz_server, folder, ["run", "good.csv", "--out", "out", "--model", MODEL, *flags,
                                  "--backoff-initial", "0.001", "--log-format", "json"], "flags")


@_SETTINGS
@given(job=job_files())
def test_any_job_file_ends_in_a_message_and_an_exit_code(fuzz_server, scratch, job):
    folder = Path(tempfile.mkdtemp(dir=scratch))
    (folder / "good.csv").write_text("id,text,voice,model\na,Hello there.,alloy,local/espeak-ng\n")
    (folder / "job.toml").write_bytes(job.encode("utf-8", "surrogatepass"))
    _invoke(fuzz_server, folder, ["run", "job.toml", "--log-format", "json"], "job files")


def teardown_module() -> None:
    print(f"\nfuzzed through the CLI: {', '.join(f'{n} {k}' for k, n in TRIED.items())}, every one exit 0/1/2 "
          "with no traceback")
