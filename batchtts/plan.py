"""Planning: what each manifest row needs, decided in one place.

`Planner.decide` takes a row as it will be narrated (its voice chosen from its list or pool:
`speakers.py`; the job's lexicon applied, its voice markup read: `script.py`), looks it up in the
ledger and the output folder and says what it needs: nothing (done), nothing this run (failed for
good, another shard's row, past --limit or the budget), or work (the whole row, or the chunks of a
long or marked-up row not yet on disk, or for a run, a copy of the file of a row with the same
request: `dedup.py`), admitted by --limit and the budget in manifest order. The dry run and the
start event count the decisions (`make_plan`), the feed hands their work to the pool
(`pending_work`), and `status` counts them against a ledger. Batches of plain rows of a Parquet
manifest are decided a whole batch at a time (`columnar.py`), to the same decisions.

A run plans twice over one read of the manifest each: the first pass counts and notes which rows
have work, the second builds only those rows again and decides them again, with the run's own
budget. No other run writes the ledger meanwhile (the run holds its lock); a manifest edited in
between is met by the second decision, which checks each row afresh.
"""

from __future__ import annotations

import contextlib
import errno
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

from . import manifest
from .budget import Prices, Spending, Verdict
from .chunking import limit_for
from .columnar import Lane
from .config import Job
from .dedup import Firsts, Repeats
from .errors import UsageError
from .ledger import LOOKUP_BATCH, Entry, Ledger, LedgerSet
from .listing import Listing
from .manifest import Row
from .markup import MarkupError
from .names import OutputChecks, owned_files
from .rownumbers import RowNumbers
from .script import Script, prepare, split_script
from .speakers import assign
from .storage import OutputFolder
from .work import Assembly, ChunkJob, Copy, Part, PassedOver, Unreadable, WorkItem, characters


class PlanCancelled(Exception):
    """The run was cancelled while it planned."""


class State(Enum):
    DONE = "done"
    FAILED = "failed"  # failed for good: tried again only with --retry-failed
    ELSEWHERE = "elsewhere"  # another shard's row
    WORK = "work"  # taken on by this run
    OVER = "over"  # alone needs more than a budget cap allows: recorded as failed, with why
    DEFERRED = "deferred"  # work the budget leaves to the next run
    BEYOND_LIMIT = "beyond_limit"  # work past --limit: neither counted nor taken on


@dataclass(frozen=True, slots=True)
class Decision:
    row: Row
    state: State
    work: tuple[WorkItem, ...] = ()
    requests: int = 0  # one per row, or per missing chunk of a long row
    characters: int = 0  # what those requests send
    failed_before: bool = False  # its last attempt failed, at this text: a retry, not a first try
    saved: int = 0  # a copy of another row's file: the requests it would have needed


def needs_work(row: Row, entry: Entry | None, folder: OutputFolder | Listing, retry_failed: bool) -> bool:
    """The resume rule: skip a row only if its file is there as recorded, for the same audio."""
    if entry is None or entry.fingerprint != row.fingerprint:
        return True
    if entry.status == "done":
        return entry.path != row.relpath or not folder.has(entry.path, entry.bytes)
    return bool(entry.retryable) or retry_failed


class Planner:
    """Decides rows in manifest order; `--limit` and the budget count what it has taken on so far."""

    def __init__(self, job: Job, ledger: Ledger | LedgerSet | None, folder: OutputFolder,
                 owns: Callable[[str], bool] | None = None, spending: Spending | None = None,
                 firsts: Firsts | Repeats | None = None, listing: Listing | None = None) -> None:
        self.job = job
        self.ledger = ledger
        self.folder = folder
        self.owns = owns
        self.spending = spending
        self.firsts = firsts  # a run's: rows whose request a row before them makes are copies of its file
        # Rows done with a request recorded, to copy: looked for only when the ledger has any.
        self._copyable = firsts is not None and isinstance(ledger, Ledger) and ledger.copyable()
        self.taken = 0
        self._limits: dict[str, int] = {}
        # A local folder's files are checked against one listing of each folder (listing.py).
        self.files: OutputFolder | Listing = folder if isinstance(job.out, str) else \
            listing if listing is not None else Listing(folder.root, job.verify_files)
        self._entries: dict[str, Entry | None] = {}  # decide_many's records, looked up together

    def decide_many(self, rows: Sequence[Row]) -> list[Decision]:
        """`decide` for rows in manifest order, their records looked up in the ledger together and
        their files in the folder's listing together."""
        if self.ledger is not None:
            keys = [row.key for row in rows]  # the row as narrated has another key only when the lexicon or markup changes it
            found = self.ledger.lookup_many(keys)
            self._entries = {key: found.get(key) for key in keys}
            if isinstance(self.files, Listing):
                self.files.expect([(e.path, e.bytes) for e in found.values() if e.status == "done" and e.path])
        try:
            return [self.decide(row) for row in rows]
        finally:
            self._entries = {}

    def decide(self, row: Row) -> Decision:
        """What the row needs, as it will be narrated (its voice chosen, the lexicon applied, its
        voice markup read): the decision's row is that one."""
        script: Script | None = None
        problem = ""
        row = assign(row, self.job.voices)
        try:
            script = prepare(row, self.job.lexicon, self.job.voices)
            row = script.row
        except MarkupError as exc:
            problem = str(exc)
        if self.owns is not None and not self.owns(row.key):
            return Decision(row, State.ELSEWHERE)
        entry = self._lookup(row.key)
        redo = False
        if not needs_work(row, entry, self.files, self.job.retry_failed):
            if not (redo := self._redo(row, entry)):
                return Decision(row, State.FAILED if entry is not None and entry.status == "failed" else State.DONE)
        retry = entry is not None and entry.status == "failed" and entry.fingerprint == row.fingerprint
        if self.job.limit is not None and self.taken >= self.job.limit:
            return Decision(row, State.BEYOND_LIMIT)
        if script is None:  # nothing is sent: recorded as failed, with where the text is at fault
            self.taken += 1
            return Decision(row, State.WORK, (Unreadable(row, problem),), 0, 0, retry)
        work = self._work(script, fresh=redo)
        if len(work) == 1 and work[0] is row:  # the common case: one request for the whole row
            requests, sent = 1, len(row.spoken)
        else:
            requests = sum(1 for item in work if not isinstance(item, Assembly))
            sent = sum(map(characters, work))
        source = self._source(row, redo, requests, sent) if self.firsts is not None else None
        if source is not None:  # nothing is sent: free under any budget
            verdict = self.spending.admit(row, 0) if self.spending is not None else Verdict.TAKE
            self.taken += 1
            copy = Copy(row, *source, work=work)
            state = State.WORK if verdict is Verdict.TAKE else State.DEFERRED
            return Decision(row, state, (copy,), 0, 0, retry, saved=requests)
        verdict = self.spending.admit(row, sent) if self.spending is not None else Verdict.TAKE
        if verdict is Verdict.OVER:  # not taken on, so not counted against --limit
            assert self.spending is not None and self.spending.last_over is not None
            if isinstance(self.firsts, Firsts):  # Repeats serves plans with no budget, which pass nothing over
                self.firsts.drop(row)
            return Decision(row, State.OVER, (PassedOver(row, self.spending.last_over),), requests, sent, retry)
        self.taken += 1
        return Decision(row, State.WORK if verdict is Verdict.TAKE else State.DEFERRED, work, requests, sent, retry)

    def _lookup(self, key: str) -> Entry | None:
        if key in self._entries:
            return self._entries[key]
        return self.ledger.lookup(key) if self.ledger is not None else None

    def _source(self, row: Row, redo: bool, requests: int, sent: int) -> tuple[str, bool] | None:
        """The row whose file answers this row's request, and whether this run narrates it: a row
        the ledger has done with it (its file there as recorded; not for a row narrated again, whose
        file is to be replaced), else the first row this run takes on with it (this one, when none is)."""
        if self._copyable and not redo:
            assert isinstance(self.ledger, Ledger)
            for key, path, size in self.ledger.done_with(row.request, row.key):
                if self.folder.has(path, size):
                    return key, False
        assert self.firsts is not None
        earlier = self.firsts.take(row, requests, sent) if isinstance(self.firsts, Repeats) else self.firsts.take(row)
        return None if earlier is None else (earlier, True)

    def _redo(self, row: Row, entry: Entry | None) -> bool:
        """With --redo-flagged, whether a row done is narrated again: its file is flagged by the audio
        checks, and it was narrated again fewer than [checks] max_redo times."""
        if not self.job.redo_flagged or self.ledger is None or entry is None or entry.status != "done":
            return False
        verdict = self.ledger.checked(row.key)
        return verdict is not None and bool(verdict["flagged"]) and verdict["redos"] < self.job.checks.max_redo

    def _work(self, script: Script, fresh: bool = False) -> tuple[WorkItem, ...]:
        """The whole row; or, over its model's limit or with voice markup, the chunks not yet on disk
        (or the stitching alone); `fresh`: every chunk, a flagged row's chunks asked for again."""
        row = script.row
        if row.model not in self._limits:
            self._limits[row.model] = limit_for(row.model, self.job.limits, self.job.chunk_chars)
        if not script.marked and len(row.spoken) <= self._limits[row.model]:
            return (row,)
        chunks = split_script(script, self._limits[row.model])
        if len(chunks) == 1 and not script.marked:
            return (row,)
        parts: list[Part | None] = []
        for chunk in chunks:
            fingerprint = row.chunk_fingerprint(chunk.text, chunk.voice)
            done = self.ledger.chunk(fingerprint) if self.ledger is not None and not fresh else None
            have = done is not None and done["status"] == "done" and self.folder.has(done["path"], done["bytes"])
            parts.append(Part(self.folder.path_of(done["path"]), chunk.paragraph_before, done["sample_rate"],
                              done["channels"], chunk.pause) if have and done is not None else None)
        missing = [i for i, part in enumerate(parts) if part is None]
        assembly = Assembly(row, chunks, parts, remaining=len(missing))
        return tuple(ChunkJob(assembly, i) for i in missing) if missing else (assembly,)


@dataclass
class ModelPlan:
    rows: int = 0
    characters: int = 0
    done: int = 0
    failed: int = 0
    pending: int = 0
    requests: int = 0  # requests the pending rows need: one per row, or per missing chunk of a long row
    pending_characters: int = 0  # characters those requests send
    retrying: int = 0  # of the pending rows, those whose last attempt failed
    copies: int = 0  # of the pending rows, those that copy the file of a row with the same request
    requests_saved: int = 0  # the requests those would have needed, not in `requests`


@dataclass
class Plan:
    """What the manifest asks for against what the ledger already has, per model; with a budget, also
    what one run under it would take on."""

    models: dict[str, ModelPlan] = field(default_factory=dict)
    budget: Spending | None = None
    with_work: RowNumbers = field(default_factory=RowNumbers)
    speakers: Counter[str] = field(default_factory=Counter)  # rows by the voice they take: the voice mix
    pooled: int = 0  # rows whose voice was chosen from a list or a pool
    firsts: Firsts | Repeats | None = None  # a run's: for the feed to find the same copies
    keyed_by_content: int = 0  # rows without an id: identical ones share one ledger record

    def count(self, decision: Decision) -> None:
        if decision.state is State.ELSEWHERE:
            return
        row = decision.row
        model = self.models.get(row.model)
        if model is None:
            model = self.models[row.model] = ModelPlan()
        model.rows += 1
        model.characters += len(row.text)
        self.keyed_by_content += row.id is None
        self.speakers[row.voice] += 1
        self.pooled += row.pool is not None
        if decision.state is State.DONE:
            model.done += 1
        elif decision.state is State.FAILED:
            model.failed += 1
        elif decision.state is not State.BEYOND_LIMIT:
            model.pending += 1
            model.retrying += decision.failed_before
            model.requests += decision.requests
            model.pending_characters += decision.characters
            model.copies += bool(decision.work) and isinstance(decision.work[0], Copy)
            model.requests_saved += decision.saved
            self.with_work.add(row.number)

    def count_batch(self, models: list[str], voices: list[str], lengths: list[int], work: range | None) -> int:
        """`count` of a batch of rows with ids the lane decided (columnar.py): all done, or all work
        (rows `work`), one request each, copies being told by `settle`; the characters of their texts."""
        for name, length in zip(models, lengths, strict=True):
            plan = self.models.get(name)
            if plan is None:
                plan = self.models[name] = ModelPlan()
            plan.rows += 1
            plan.characters += length
            if work is None:
                plan.done += 1
            else:
                plan.pending += 1
                plan.requests += 1
                plan.pending_characters += length
        self.speakers.update(voices)
        if work is not None:
            self.with_work.add_range(work)
        return sum(lengths)

    def settle(self) -> None:
        """Once every row is counted: rows a plan without a budget counted as narrated that copy an
        earlier row's file are counted as copies (`dedup.Repeats`)."""
        if not isinstance(self.firsts, Repeats):
            return
        for name, (copies, saved, unsent) in self.firsts.settle().items():
            model = self.models[name]
            model.copies += copies
            model.requests_saved += saved
            model.requests -= saved
            model.pending_characters -= unsent

    def close(self) -> None:
        """Let go of what the feed needed of the plan: a run's record of requests."""
        if self.firsts is not None:
            self.firsts.close()
            self.firsts = None

    @property
    def total(self) -> ModelPlan:
        return ModelPlan(*(sum(getattr(m, f.name) for m in self.models.values()) for f in fields(ModelPlan)))

    def estimates(self, prices: Prices) -> dict[str, float | None]:
        """Estimated cost of what is left, per model; None where the price is unknown."""
        return {name: prices.cost(name, m.pending_characters) for name, m in sorted(self.models.items())}

    def estimate(self, prices: Prices) -> float | None:
        """Estimated cost of everything left, or None if a model with work left has no known price."""
        costs = self.estimates(prices).values()
        return None if None in costs else round(sum(c for c in costs if c is not None), 6)

    def as_dict(self, prices: Prices) -> dict[str, Any]:
        """The plan for a program to read (`run --dry-run --json`): counts per model and in total,
        prices in USD per million characters, estimates in USD (None where a price is unknown)."""
        estimates = self.estimates(prices)

        def counts(m: ModelPlan) -> dict[str, int]:
            return {f.name: getattr(m, f.name) for f in fields(ModelPlan)}

        def per_million(name: str) -> float | None:
            price = prices.of(name)
            return None if price is None else round(price * 1e6, 6)

        budget = self.budget
        return {
            "models": {name: {**counts(m), "usd_per_million_chars": per_million(name), "estimate_usd": estimates[name]}
                       for name, m in sorted(self.models.items())},
            "total": {**counts(self.total), "estimate_usd": self.estimate(prices)},
            "prices": prices.source,
            "speakers": dict(sorted(self.speakers.items())), "pooled": self.pooled,
            "budget": None if budget is None else {
                "rows": budget.rows, "characters": budget.characters, "cost_usd": round(budget.cost, 6),
                "unpriced_characters": budget.unpriced_characters, "refused": budget.refused,
                "passed_over": budget.passed_over},
        }


def make_plan(job: Job, ledger: Ledger | LedgerSet | None, folder: OutputFolder,
              owns: Callable[[str], bool] | None = None, budget: Spending | None = None,
              for_run: bool = False, cancelled: Callable[[], bool] | None = None, columnar: bool = True,
              listing: Listing | None = None) -> Plan:
    """Validate the manifest (raises ManifestError) and count what is done and what is left, for the
    rows `owns` accepts (default: the job's shard, or every row); `budget` is played through as the
    feed plays it. For a run, every row's file name is checked against the others and the disk, and
    local rows no run could narrate are refused. Once `cancelled()` says so, PlanCancelled.
    `columnar`: batches of plain rows are decided at once (columnar.py); False decides every row alone.
    `listing`: the local output folder's, when the caller listed it already."""
    if owns is None and job.shard is not None:
        owns = job.shard.owns
    # Without a budget no decision waits on which rows are copies: they are found once, after the pass.
    plan = Plan(budget=budget, firsts=(Repeats() if columnar and budget is None else Firsts()) if for_run else None)
    planner = Planner(job, ledger, folder, owns, budget, plan.firsts, listing)
    checks = _output_checks(job, folder, planner.files) if for_run else None

    waiting: list[Row] = []

    def count(row: Row | None = None) -> None:
        """Rows are decided LOOKUP_BATCH at a time (their ledger records in one query); None: the rest."""
        if row is not None:
            waiting.append(row)
            if len(waiting) < LOOKUP_BATCH:
                return
        if cancelled is not None and cancelled():
            raise PlanCancelled
        for decision in planner.decide_many(waiting):
            plan.count(decision)
            if checks is not None:  # rows with work are checked on disk too; another shard's are its own
                checks.see(decision.row, pending=decision.state not in (State.DONE, State.FAILED, State.ELSEWHERE))
        waiting.clear()

    lane = Lane.for_plan(job, planner, plan, checks, flush=count) if columnar else None
    on_batch = lane.claim if lane is not None else None
    if checks is None:  # counting what a ledger holds (status): rows are counted as they are
        with _scratch_room():
            manifest.validate(job.manifest, job.defaults, on_row=count, on_batch=on_batch)
        count()
        return plan
    from .local import validate_manifest  # the embedded engine, to check local voices: a run's check only

    try:
        with _scratch_room():
            validate_manifest(job.manifest, job.defaults, on_row=count, cast=job.voices, on_batch=on_batch)
            count()
            checks.raise_problems(job.manifest)
            plan.settle()
    except BaseException:
        plan.close()
        raise
    return plan


@contextlib.contextmanager
def _scratch_room() -> Iterator[None]:
    """Planning millions of rows spills its hashes and notes to temporary files: a disk too full for
    them is the user's to free, not a fault of ours."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise UsageError(f"planning needs room for its temporary files in {tempfile.gettempdir()}: {exc.strerror}; "
                         "free some space there, or point TMPDIR at a disk that has it") from exc


def _output_checks(job: Job, folder: OutputFolder, files: OutputFolder | Listing) -> OutputChecks:
    if isinstance(job.out, str):
        return OutputChecks(None, {})  # an object store: names are checked as text alone
    listing = files if isinstance(files, Listing) else None  # one pass over a folder of millions of files
    return OutputChecks(job.out, owned_files(job.out, job.ledger_path, folder.lock_path), listing)


def pending_work(job: Job, plan: Plan, ledger: Ledger, folder: OutputFolder, spending: Spending,
                 batch_size: int = 512) -> Iterator[list[WorkItem]]:
    """The work left, in manifest order, in batches: rows the plan found work for are built and
    decided again, and the manifest is read up to the last of them. Ends early at the first row the
    budget leaves to the next run."""
    planner = Planner(job, ledger, folder, job.shard.owns if job.shard is not None else None, spending, plan.firsts)
    batch: list[WorkItem] = []
    rows = manifest.iter_rows(job.manifest, job.defaults, only=plan.with_work.__contains__,
                              last=plan.with_work.last)
    for row in rows:
        if not isinstance(row, Row):
            continue  # the manifest changed since it was checked: its rows are checked by the next run
        decision = planner.decide(row)
        if decision.state in (State.DEFERRED, State.BEYOND_LIMIT):
            break
        batch.extend(decision.work)
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch
