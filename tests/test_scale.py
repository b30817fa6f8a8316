"""Big jobs: a rerun checks files against one listing of each folder and looks records up in batches,
status counts the ledger when the manifest is as the last run planned it, and the manifest's repeats
are found on disk past a million rows, all deciding as the row-by-row way does. Speed is
bench/scale.py's."""

from __future__ import annotations

import array
import os
import sqlite3
import tempfile
from pathlib import Path

import pytest
from conftest import FAST_RETRY, cli, ledger_rows, write_csv
from hypothesis import given, settings
from hypothesis import strategies as st

import batchtts
from batchtts import Defaults, Job, results
from batchtts import ledger as ledger_module
from batchtts.errors import EXIT_OK, SpeechError, UsageError
from batchtts.ledger import Ledger, Stored
from batchtts.listing import Listing
from batchtts.manifest import Row, _duplicates
from batchtts.plan import Planner, needs_work
from batchtts.repeats import Hashes
from batchtts.sharding import named_ledger
from batchtts.storage import OutputFolder

MODEL = "openai/gpt-4o-mini-tts"


def rows(n: int, edited: int | None = None) -> list[dict[str, str]]:
    return [{"id": f"r{i:03d}", "text": f"Line {i} of the scale test{' (edited)' if i == edited else ''}.",
             "voice": "alloy"} for i in range(n)]


def run_args(manifest: Path, out: Path, server, *extra: str) -> list[str | Path]:
    return ["run", manifest, "--out", out, "--model", MODEL, "--base-url", server.url, *FAST_RETRY, *extra]


def test_a_rerun_finds_a_deleted_file_one_of_another_size_and_one_replaced_by_a_folder(serve, tmp_path):
    server = serve()
    out = tmp_path / "out"
    manifest = write_csv(tmp_path / "m.csv", rows(8))
    assert cli(*run_args(manifest, out, server)).returncode == 0
    files = {key: out / entry["path"] for key, entry in ledger_rows(out / "ledger.sqlite").items()}
    sent = server.stats()["requests"]

    files["r001"].unlink()
    assert cli(*run_args(manifest, out, server)).returncode == 0  # names alone: the listing lacks it
    assert server.stats()["requests"] == sent + 1 and files["r001"].is_file()

    with files["r002"].open("r+b") as f:  # cut short behind the ledger's back: --verify-files looks at sizes
        f.truncate(10)
    files["r003"].unlink()
    assert cli(*run_args(manifest, out, server, "--verify-files")).returncode == 0
    assert server.stats()["requests"] == sent + 3
    entries = ledger_rows(out / "ledger.sqlite")
    assert all(files[key].stat().st_size == entries[key]["bytes"] for key in ("r002", "r003"))

    files["r004"].unlink()
    files["r004"].mkdir()  # not a file: the row has work, and its file cannot take the folder's place
    result = cli(*run_args(manifest, out, server))
    assert result.returncode != 0 and "is a folder on disk" in result.stdout + result.stderr
    assert server.stats()["requests"] == sent + 3


def test_the_listing_says_what_a_stat_says(tmp_path):
    (tmp_path / "sub").mkdir()
    for name, size in (("a.wav", 10), ("b.wav", 20), ("sub/c.wav", 30)):
        (tmp_path / name).write_bytes(bytes(size))
    (tmp_path / "d.wav").mkdir()  # a folder of a file's name
    (tmp_path / "e.wav").symlink_to(tmp_path / "a.wav")
    asked = [("a.wav", 10), ("b.wav", 21), ("sub/c.wav", 30), ("d.wav", (tmp_path / "d.wav").stat().st_size),
             ("gone.wav", 1), ("e.wav", 10), ("nowhere/f.wav", 1), ("a.wav", None)]
    assert Listing(tmp_path, verify=True).have(asked) == [True, False, True, False, False, True, False, False]
    by_names = Listing(tmp_path)  # sizes taken as recorded, but for one file in SAMPLE_EVERY
    assert by_names.have(asked) == [True, True, True, False, False, True, False, False]
    assert [by_names.has(*file) for file in asked] == by_names.have(asked)


_RUN_EDGES = [0, 1, 0x7FFF, 0xFFFE, 0xFFFF]  # the first 16 bits: which run a hash is in
_KEPT_EDGES = [0, 1, 2, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFE, 0xFFFF_FFFF]  # the 32 bits a run keeps


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_RUN_EDGES), st.sampled_from(_KEPT_EDGES), st.integers(0, 0xFFFF)),
                max_size=40, unique=True),
       st.lists(st.tuples(st.sampled_from(_RUN_EDGES), st.sampled_from(_KEPT_EDGES), st.integers(0, 0xFFFF)),
                max_size=40))
def test_the_listing_finds_a_name_when_a_listed_name_has_its_first_48_bits(listed, asked):
    """Names whose hashes share runs and kept bits, at the edges of both: each is found exactly when
    a name listed has the same run and kept bits (the last 16 bits are not kept)."""
    def value(run: int, kept: int, rest: int) -> int:
        return run << 48 | kept << 16 | rest

    with pytest.MonkeyPatch.context() as patch, tempfile.TemporaryDirectory() as tmp:
        patch.setattr("batchtts.listing.hash64", lambda name: int(name, 16))
        for parts in listed:
            (Path(tmp) / f"{value(*parts):016x}").touch()
        names = [f"{value(*parts):016x}" for parts in asked]
        kept = {(run, bits) for run, bits, _ in listed}
        assert Listing(tmp)._find("", names).tolist() == [(run, bits) in kept for run, bits, _ in asked]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from(["there", "resized", "gone", "folder", "unrecorded"]), min_size=1, max_size=150),
       st.booleans())
def test_a_batch_asked_at_once_is_all_there_when_each_file_asked_alone_is(files, verify):
    """`have_all` (a rerun's batch of rows done) says what `have` says of its files, sizes sampled alike."""
    with tempfile.TemporaryDirectory() as tmp:
        names, sizes = [], []
        for i, state in enumerate(files):
            name = f"r{i}.wav"
            if state in ("there", "resized", "unrecorded"):
                (Path(tmp) / name).write_bytes(bytes(10))
            elif state == "folder":
                (Path(tmp) / name).mkdir()
            names.append(name)
            sizes.append(None if state == "unrecorded" else 11 if state == "resized" else 10)
        asked = list(zip(names, sizes, strict=True))
        assert Listing(tmp, verify).have_all(names, sizes) == all(Listing(tmp, verify).have(asked))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["none", "done", "stale", "failed", "retryable"]),
                          st.sampled_from(["there", "gone", "resized", "folder"])), min_size=1, max_size=25),
       st.booleans(), st.integers(1, 7))
def test_batched_lookups_decide_as_one_lookup_a_row_does(cases, verify, batch):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        job = Job(manifest=out / "m.csv", out=out, defaults=Defaults(model=MODEL, voice="alloy", format="wav"),
                  verify_files=verify)
        ledger = Ledger(job.ledger_path)
        made = []
        for i, (record, file) in enumerate(cases):
            row = Row(i + 1, f"r{i}", f"Line {i}.", MODEL, "alloy", "wav", None, None, None, {})
            made.append(row)
            recorded = Row(i + 1, f"r{i}", f"Line {i} before.", MODEL, "alloy", "wav", None, None, None, {}) \
                if record == "stale" else row
            if record in ("done", "stale"):
                ledger.record_done(recorded, Stored(row.relpath, 100, "0" * 64, 24000, 1, 0.1), 1, 0.0, None)
            elif record != "none":
                ledger.record_failed(recorded, SpeechError("no", 400), 1, retryable=record == "retryable")
            if file == "there" or (file == "resized" and not verify):  # sampled sizes: only --verify-files is sure
                (out / row.relpath).write_bytes(bytes(100))
            elif file == "resized":
                (out / row.relpath).write_bytes(bytes(99))
            elif file == "folder":
                (out / row.relpath).mkdir()
        ledger.commit()
        folder = OutputFolder(out, job.ledger_path)
        expected = [needs_work(row, ledger.lookup(row.key), folder, False) for row in made]
        original = ledger_module.LOOKUP_BATCH
        ledger_module.LOOKUP_BATCH = batch  # several queries for one batch of rows
        try:
            one_by_one = [Planner(job, ledger, folder).decide(row) for row in made]
            together = Planner(job, ledger, folder).decide_many(made)
        finally:
            ledger_module.LOOKUP_BATCH = original
            ledger.close()
        assert together == one_by_one
        assert [d.state.value == "work" for d in together] == expected


def test_batched_reads_find_rows_by_their_key_not_by_reading_every_row_done(tmp_path):
    """Each query of a batched read, explained by SQLite, searches the rows by key: with a thousand
    keys in a list, SQLite may prefer the status index and read every row done for each batch,
    which makes an export of millions of rows quadratic."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    keys = [f"r{i}" for i in range(2 * ledger_module.LOOKUP_BATCH)]
    for i, key in enumerate(keys):
        row = Row(i + 1, key, f"Line {i}.", MODEL, "alloy", "wav", None, None, None, {})
        ledger.record_done(row, Stored(row.relpath, 100, f"{i:064d}", 24000, 1, 0.1), 1, 0.0, None)
    ledger.commit()
    keys = keys[::2]  # a batch of them, as a ledger holds many more rows than one batch asks for
    asked: list[str] = []
    ledger.db.set_trace_callback(asked.append)
    try:
        ledger.lookup_many(keys), ledger.get_many(keys), ledger.mastered_many(keys), ledger.checked_many(keys)
    finally:
        ledger.db.set_trace_callback(None)
    queries = [q for q in asked if q.lstrip().upper().startswith("SELECT") and (" IN (" in q or "BETWEEN" in q)]
    assert len(queries) >= 4 and any("BETWEEN" in q for q in queries)
    for query in queries:
        steps = [step[3] for step in ledger.db.execute(f"EXPLAIN QUERY PLAN {query}")]
        first = steps[0]
        assert ("(key=?)" in first or "(key>? AND key<?)" in first) and "status" not in first, (query[:80], steps)
    ledger.close()


@given(st.lists(st.sampled_from(["ledger-shard-0-of-2.sqlite", "ledger-shard-1-of-2.sqlite", "ledger.sqlite",
                                  "a[1]-shard-0-of-2.sqlite", "ledger-shard-x-of-y.sqlite", ".ledger-shard-0-of-2.sqlite",
                                  "Ledger-shard-0-of-2.sqlite", "r-00001.wav"]), unique=True),
       st.sampled_from(["ledger.sqlite", "a[1].sqlite"]))
def test_the_shards_beside_a_ledger_are_found_as_glob_finds_them(names, named):
    """One pass over the folder's entries (a folder of millions of audio files is not held in memory)
    finds the shard ledgers Path.glob finds."""
    import glob

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in names:
            (folder / name).touch()
        stem, suffix = Path(named).stem, Path(named).suffix
        globbed = folder.glob(f"{glob.escape(stem)}-shard-*-of-*{glob.escape(suffix)}")
        found = ledger_module._beside(folder, f"{stem}-shard-", suffix)
        assert {p for p in found if named_ledger(p)[1] is not None} == \
            {p for p in globbed if named_ledger(p)[1] is not None}


def status(out: Path, *extra: str | Path) -> dict:
    import json

    result = cli("status", out, "--json", *extra)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def planned_everything(out: Path, monkeypatch) -> dict:
    """Status as a full plan of every row says it."""
    with monkeypatch.context() as m:
        m.setattr(results, "_counted", lambda ctx: None)
        return status(out)


def test_status_counts_the_ledger_while_the_manifest_is_as_planned_and_plans_rows_once_it_is_not(
        serve, tmp_path, monkeypatch):
    server = serve()
    out = tmp_path / "out"
    manifest = write_csv(tmp_path / "m.csv", rows(6))
    assert cli(*run_args(manifest, out, server, "--limit", "4")).returncode == 0
    recorded = sqlite3.connect(out / "ledger.sqlite").execute(
        "SELECT manifest_rows FROM runs ORDER BY id DESC LIMIT 1").fetchone()
    assert recorded == (6,)
    calls = []
    counted = results._counted
    monkeypatch.setattr(results, "_counted", lambda ctx: calls.append(found := counted(ctx)) or found)
    fast = status(out)
    assert calls[-1] is not None  # the ledger was counted, not the manifest planned
    assert (fast["total"], fast["done"], fast["pending"]) == (6, 4, 2)
    assert fast == planned_everything(out, monkeypatch)

    os.utime(manifest, ns=(1, 1))  # the same rows, but status cannot know it: it plans them
    assert status(out) == fast and calls[-1] is None

    write_csv(manifest, rows(6, edited=0))  # a row done is edited: it is pending again
    edited = status(out)
    assert calls[-1] is None and (edited["done"], edited["pending"]) == (3, 3)
    assert edited == planned_everything(out, monkeypatch)

    # The run found a record of a row as it was before: it records no plan, and status plans rows.
    assert cli(*run_args(manifest, out, server)).returncode == 0
    finished = status(out)
    assert calls[-1] is None and (finished["total"], finished["done"], finished["pending"]) == (6, 6, 0)
    assert cli(*run_args(manifest, out, server)).returncode == 0  # the ledger holds only the rows as they are
    assert status(out) == finished and calls[-1] is not None
    assert finished == planned_everything(out, monkeypatch)


@given(st.lists(st.integers(min_value=0, max_value=2**64 - 1) | st.integers(0, 30), max_size=400),
       st.integers(1, 50))
def test_spilled_hashes_find_the_repeats_memory_finds(values, spill_at):
    hashes = Hashes(spill_at=spill_at)
    for value in values:
        hashes.append(value)
    try:
        assert len(hashes) == len(values)
        assert hashes.repeats(_duplicates) == _duplicates(array.array("Q", values))
        assert hashes.among([*values[:3], 31]) == ({*values[:3], 31} & set(values))
    finally:
        hashes.close()


def test_a_rerun_lists_its_folder_once_and_status_finds_the_job_without_listing_it(tmp_path, monkeypatch):
    """A folder of ten million files costs seconds to list: a rerun lists it once, for its files and
    the shards' ledgers beside its own alike, and status, given the folder, reads its ledger.sqlite."""
    manifest = write_csv(tmp_path / "m.csv", rows(6))
    out = tmp_path / "out"
    job = Job(manifest=manifest, out=out, defaults=Defaults(model="local/espeak-ng", voice="alloy", format="wav"))
    assert batchtts.run(job).counters.done == 6
    (out / "ledger-shard-0000-of-0002.sqlite").write_bytes((out / "ledger.sqlite").read_bytes())
    listed: list[str] = []
    scandir = os.scandir

    def counted(path: str | os.PathLike[str] = ".") -> os.ScandirIterator[str]:
        listed.append(os.path.realpath(path))
        return scandir(path)

    with monkeypatch.context() as patched:  # undone before the test's folder is removed, by scandir too
        patched.setattr(os, "scandir", counted)
        with pytest.raises(UsageError, match="holds ledgers of this job run with 2 shards"):  # found in the listing
            batchtts.run(job)
        assert listed.count(os.path.realpath(out)) == 1
        (out / "ledger-shard-0000-of-0002.sqlite").unlink()
        listed.clear()
        again = batchtts.run(job)
        assert again.exit_code == EXIT_OK and again.counters.done == 0 and again.plan.total.done == 6
        assert listed.count(os.path.realpath(out)) == 1
        listed.clear()
        assert results.status([out])["done"] == 6
        assert os.path.realpath(out) not in listed
