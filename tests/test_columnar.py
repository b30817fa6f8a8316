"""The planner's fast lane (columnar.py) against the row-by-row planner it stands in for: for any
Parquet manifest, plain rows or not, in batches of any size, both give the same plan, the same
refusal, the same names checked on disk and the same work for the feed."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import given, settings
from hypothesis import strategies as st

from batchtts import Defaults, Job, results
from batchtts import manifest as manifest_module
from batchtts.budget import Prices, Spending
from batchtts.config import Output
from batchtts.errors import ManifestError, SpeechError
from batchtts.ledger import Ledger, Stored
from batchtts.manifest import Row, fingerprint, fingerprints
from batchtts.plan import make_plan, pending_work
from batchtts.storage import OutputFolder
from batchtts.work import ChunkJob, Copy, WorkItem

MODEL = "openai/gpt-4o-mini-tts"
LOCAL = "local/espeak-ng"

ids = st.one_of(
    st.from_regex(r"[a-z][a-z0-9-]{0,6}", fullmatch=True),  # plain
    st.sampled_from(["Upper", "UPPER", "a b", ".hidden", "x/y", "ledger.sqlite", "dir", "ünï", "", "a" * 130]),
)
texts = st.one_of(
    st.sampled_from(["Hello there.", "Hello there.", "Another line.", "12", "   ", "...",
                     'Say <voice name="bob">hi</voice>.', "x" * 5000, "Line\nwith a break."]),
    st.text(min_size=0, max_size=12),
)
voices = st.sampled_from([None, "alloy", "nova", "alloy|nova", " alloy", "en-us", "nope"])
models = st.sampled_from([None, MODEL, LOCAL, "openai/tts-1"])
odd = st.fixed_dictionaries({"id": st.one_of(st.none(), ids), "text": st.one_of(st.none(), texts)},
                            optional={"voice": voices, "model": models})
plain = st.fixed_dictionaries({"id": st.from_regex(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,5}", fullmatch=True),
                               "text": st.sampled_from(["Hello there.", "Another line.", "Line 3.", "x" * 4097]),
                               "voice": st.sampled_from(["alloy", "nova", "en-us"]),
                               "model": st.sampled_from([MODEL, LOCAL])})
records = st.one_of(plain, plain, plain, plain, odd)  # mostly rows the lane takes, among others
LEDGERS = ["none", "fresh", "one failed", "all done", "half done", "one file gone", "one resized", "one stale"]


def _write(path: Path, rows: list[dict[str, str | None]], columns: list[str]) -> None:
    table = pa.table({name: pa.array([row.get(name) for row in rows], type=pa.string()) for name in columns})
    pq.write_table(table, path)


def _plan(job: Job, ledger: Ledger | None, columnar: bool, for_run: bool) -> tuple[object, ...]:
    """What a plan says, in full: its counts, the rows with work, the manifest's refusal, and for a
    run with a ledger, the work the feed hands out, in order."""
    folder = OutputFolder(job.out, job.ledger_path)
    try:
        plan = make_plan(job, ledger, folder, for_run=for_run, columnar=columnar)
    except ManifestError as exc:
        return "refused", exc.total, [(p.row, p.message, p.id) for p in exc.problems]
    try:
        counts = plan.as_dict(Prices({MODEL: 1e-6}))
        rows = [n for n in range(1, plan.with_work.last + 1) if n in plan.with_work]
        work: list[tuple[object, ...]] = []
        if ledger is not None and for_run:
            spending = Spending(job.budget, Prices({MODEL: 1e-6}))
            for batch in pending_work(job, plan, ledger, folder, spending):
                work.extend(_described(item) for item in batch)
        return "planned", counts, rows, work
    finally:
        plan.close()


def _described(item: WorkItem) -> tuple[object, ...]:
    row = item if isinstance(item, Row) else item.assembly.row if isinstance(item, ChunkJob) else item.row
    return type(item).__name__, row.number, row.key, row.relpath, item.source if isinstance(item, Copy) else None


@settings(max_examples=150, deadline=None)
@given(st.lists(records, min_size=1, max_size=30), st.integers(1, 8), st.booleans(), st.booleans(),
       st.sampled_from(LEDGERS),
       st.sampled_from([("alloy", MODEL), (None, None), ("nova", None)]), st.sampled_from(["wav", "mp3", "pcm"]))
def test_the_lane_plans_every_manifest_as_the_rows_do(rows, batch_rows, with_voice, with_model, ledger_state,
                                                       defaults, fmt):
    columns = ["id", "text"] + ["voice"] * with_voice + ["model"] * with_model
    if any(k not in columns for row in rows for k in row):  # a column some row has is written for all
        columns = sorted({*columns, *(k for row in rows for k in row)}, key=["id", "text", "voice", "model"].index)
    original = manifest_module.BATCH_ROWS
    manifest_module.BATCH_ROWS = batch_rows  # batches of plain rows and of others, side by side
    try:
        answers = _both_ways(rows, columns, ledger_state, defaults, fmt)
    finally:
        manifest_module.BATCH_ROWS = original
    assert answers[0] == answers[1]


@settings(max_examples=100, deadline=None)
@given(st.lists(plain, min_size=1, max_size=30), st.integers(1, 8), st.sampled_from(LEDGERS),
       st.sampled_from(["wav", "mp3"]), st.booleans())
def test_a_rerun_is_planned_by_the_lane_as_the_rows_do(rows, batch_rows, ledger_state, fmt, verify):
    """Manifests of plain rows only, against ledgers that have all, some or none of them done."""
    original = manifest_module.BATCH_ROWS
    manifest_module.BATCH_ROWS = batch_rows
    try:
        answers = _both_ways(rows, ["id", "text", "voice", "model"], ledger_state, ("alloy", MODEL), fmt, verify)
    finally:
        manifest_module.BATCH_ROWS = original
    assert answers[0] == answers[1]


def _both_ways(rows: list[dict[str, str | None]], columns: list[str], ledger_state: str,
               defaults: tuple[str | None, str | None], fmt: str, verify: bool = True) -> list[list[tuple[object, ...]]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        out.mkdir()
        (out / "dir.wav").mkdir()  # a folder where a row named "dir" would write its file
        _write(Path(tmp) / "m.parquet", rows, columns)
        voice, model = defaults
        job = Job(manifest=Path(tmp) / "m.parquet", out=out, defaults=Defaults(model=model, voice=voice, format=fmt),
                  verify_files=verify)
        answers = []
        for columnar in (True, False):
            ledger = None
            if ledger_state != "none":
                job.ledger_path.unlink(missing_ok=True)
                ledger = Ledger(job.ledger_path)
                if ledger_state == "one failed" and _plannable(job):  # that row's batch is left to the rows
                    ledger.record_failed(_rows(job)[0], SpeechError("no", 500), 1, retryable=True)
                elif ledger_state != "fresh" and _plannable(job):
                    _finish(job, ledger, ledger_state)
                ledger.commit()
            try:
                answers.append([_plan(job, ledger, columnar, for_run) for for_run in (False, True)])
            finally:
                if ledger is not None:
                    ledger.close()
        return answers


@settings(max_examples=80, deadline=None)
@given(st.lists(plain, min_size=1, max_size=30) | st.lists(records, min_size=1, max_size=30), st.integers(1, 8),
       st.sampled_from(["all done", *LEDGERS[1:]]), st.sampled_from(["wav", "mp3"]), st.booleans())
def test_export_reads_the_lane_s_batches_done_as_it_reads_each_row_planned(rows, batch_rows, ledger_state, fmt,
                                                                          checked):
    """`export` of a manifest of plain rows and others, against ledgers with all, some or none of
    them done (their files checked, or not): the same records whether batches all done are read as
    columns or every row is planned."""
    original = manifest_module.BATCH_ROWS
    manifest_module.BATCH_ROWS = batch_rows
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out"
            out.mkdir()
            _write(Path(tmp) / "m.parquet", rows, ["id", "text", "voice", "model"])
            job = Job(manifest=Path(tmp) / "m.parquet", out=out, defaults=Defaults(format=fmt))
            ledger = Ledger(job.ledger_path)
            if _plannable(job) and ledger_state != "fresh":
                _finish(job, ledger, ledger_state)
                for i, row in enumerate(_rows(job)[::2] if checked else []):
                    ledger.record_check(row, "0" * 64, {"flagged": i % 2, "flag_reasons": "too fast" * (i % 2)})
            ledger.commit()
            ledger.close()
            context = results.open_context([str(job.ledger_path)], job.manifest, job)
            try:
                both = [list(results.export_records(context, ("attempts", "sha256"), columnar=columnar))
                        for columnar in (True, False)]
            finally:
                context.ledger.close()
    finally:
        manifest_module.BATCH_ROWS = original
    assert both[0] == both[1]


def _plannable(job: Job) -> bool:
    try:
        manifest_module.validate(job.manifest, job.defaults)
    except ManifestError:
        return False
    return True


def _finish(job: Job, ledger: Ledger, how: str) -> None:
    """Record rows done, their files in place: all of them, or half, or all but one file gone, one of
    another size, or one recorded for another text."""
    made = _rows(job)
    for i, row in enumerate(made[:len(made) // 2] if how == "half done" else made):
        recorded = dataclasses.replace(row, text="Said before.") if how == "one stale" and i == 0 else row
        ledger.record_done(recorded, Stored(row.relpath, 4, "0" * 64, 24000, 1, 0.1), 1, 0.0, None)
        path = job.out / row.relpath
        if not (how == "one file gone" and i == len(made) - 1) and not path.is_dir():  # a row named "dir" finds a folder
            path.write_bytes(b"RIF" if how == "one resized" and i == 0 else b"RIFF")


def _rows(job: Job) -> list[Row]:
    """The manifest's rows, each as the planner narrates it (its key and file name)."""
    return [row for row in manifest_module.iter_rows(job.manifest, job.defaults) if isinstance(row, Row)]


def test_a_plain_manifest_is_planned_without_building_its_rows(tmp_path, monkeypatch):
    """The lane is taken: a manifest of plain rows plans with no row made, and copies are counted."""
    rows = [{"id": f"r-{i:04d}", "text": f"Line {i % 50}."} for i in range(300)]
    _write(tmp_path / "m.parquet", rows, ["id", "text"])
    job = Job(manifest=tmp_path / "m.parquet", out=tmp_path / "out", defaults=Defaults(model=MODEL, voice="alloy"))

    def refused(*args: object) -> None:
        raise AssertionError("a plain row was made into a Row")

    monkeypatch.setattr(manifest_module, "make_row", refused)
    plan = make_plan(job, None, OutputFolder(job.out, job.ledger_path), for_run=True)
    plan.close()
    total = plan.total
    assert (total.rows, total.pending, total.requests, total.copies) == (300, 300, 50, 250)


@settings(max_examples=200, deadline=None)
@given(st.text(), st.sampled_from([None, 0.75, 1.0]), st.sampled_from([None, Output(), Output(sample_rate=16000, channels=1)]),
       st.sampled_from(["wav", "mp3", "flac"]))
def test_a_batch_hashes_the_fingerprints_a_row_does(text, speed, shape, fmt):
    assert fingerprints(MODEL, "alloy", fmt, speed, shape)(text) == fingerprint(MODEL, "alloy", text, fmt, speed, None, shape)


def test_text_that_is_not_utf8_is_left_to_the_rows_which_name_it(tmp_path):
    valid = pa.array([b"fine words", b"caf\xe9 au lait"], pa.binary())
    text = pa.Array.from_buffers(pa.string(), 2, valid.buffers())
    pq.write_table(pa.table({"id": ["a", "b"], "text": text}), tmp_path / "m.parquet")
    job = Job(manifest=tmp_path / "m.parquet", out=tmp_path / "out", defaults=Defaults(model=MODEL, voice="alloy"))
    for for_run in (False, True):
        assert _plan(job, None, True, for_run) == _plan(job, None, False, for_run) == \
            ("refused", 1, [(2, "text is not valid UTF-8", None)])
