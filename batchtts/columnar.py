"""Planning a whole Arrow batch of plain rows at once: the planner's fast lane.

A dataset manifest of millions of rows is mostly rows that need nothing the row-by-row planner
(`plan.py`) is there for: an id that names its file as it is, a text of letters with no voice markup
and within its model's limit, one voice, no lexicon, no pool, no budget, no --limit, no shard, and no
record in the ledger yet. For such a batch every row's decision is the same (work: one request, or a
copy of an earlier row's file with the same request), so the checks are made on the batch's columns
by Arrow, and what is left per row in Python is a few hashes: the id and file name (repeats), the
request (`dedup.Repeats`). A rerun's batch whose rows are all done (recorded done for the same
audio, their files listed as recorded) is counted done the same way, its fingerprints hashed from the
columns.

`Lane.claim` takes a batch only when it can answer for every row of it exactly as `Planner.decide`,
`manifest.make_row` and `names.OutputChecks.see` would, and otherwise leaves the whole batch to
them: declining is always safe, so every check here errs that way. Manifests of other formats,
columns or rows are planned row by row as before; tests hold both ways to the same plan.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from .chunking import limit_for
from .config import FORMATS, Job
from .dedup import Firsts, Repeats, request_hash
from .ledger import Entry
from .listing import Listing
from .manifest import Claimed, fingerprints
from .names import MAX_NAME
from .providers import is_local
from .speakers import voices_for

if TYPE_CHECKING:
    import pyarrow as pa

    from .names import OutputChecks
    from .plan import Plan, Planner

COLUMNS = frozenset({"id", "text", "voice", "model"})
# An id that names its file as it is (`names.safe_name` keeps it, `names.unsafe_reason` finds
# nothing): ASCII letters, digits, '.', '_' and '-', not starting with '.', at most MAX_NAME long.
_PLAIN_ID = rf"^[A-Za-z0-9_-][A-Za-z0-9._-]{{0,{MAX_NAME - 1}}}$"
# A voice or model written plainly: no list separator ('|'), no blank to strip, not empty.
_PLAIN_NAME = r"^[A-Za-z0-9][A-Za-z0-9._+/:-]*$"
# Text that is not blank: a letter or a digit is never whitespace to Python's str.strip.
_WORDS = r"[\p{L}\p{N}]"


class Lane:
    """Claims the batches of plain rows a plan can decide at once; None from `for_plan` when the job
    itself rules it out (a lexicon, --limit, a budget, a shard, --redo-flagged, a format the [output]
    refuses, or a plan that must know each copy as it goes: `dedup.Firsts`)."""

    def __init__(self, job: Job, planner: Planner, plan: Plan, checks: OutputChecks | None,
                 flush: Callable[[], None]) -> None:
        self.job, self.planner, self.plan, self.checks = job, planner, plan, checks
        self._flush = flush  # rows the planner holds back are decided first: decisions stay in manifest order
        self.format = job.defaults.format.strip().lower()
        self._plain_pairs: dict[tuple[str, str], bool] = {}
        self._limits: dict[str, int] = {}
        self._fingerprinters: dict[tuple[str, str], Callable[[str], str]] = {}

    @classmethod
    def for_plan(cls, job: Job, planner: Planner, plan: Plan, checks: OutputChecks | None,
                 flush: Callable[[], None]) -> Lane | None:
        fmt = job.defaults.format.strip().lower()
        if (job.lexicon or job.limit is not None or planner.spending is not None or planner.owns is not None
                or job.redo_flagged or isinstance(planner.firsts, Firsts)
                or fmt not in FORMATS or job.defaults.output.refused(fmt) is not None):
            return None
        return cls(job, planner, plan, checks, flush)

    def claim(self, before: int, batch: pa.RecordBatch) -> Claimed | None:
        """Plan the batch whose first row is number `before + 1`, or None to leave it to the rows."""
        columns = self._columns(batch)
        if columns is None:
            return None
        ids, text, models, voices, lengths, relpaths = columns
        folded = [relpath.lower() for relpath in relpaths]  # ASCII: as casefold
        if not self._names_fit(relpaths, folded):
            return None
        found = self.planner.ledger.lookup_many(ids) if self.planner.ledger is not None else {}
        if found:
            if not self._done(ids, relpaths, models, voices, _strings(text), found):
                return None
            self._flush()
            if self.checks is not None:
                self.checks.see_named(folded)
            return Claimed(ids, folded, self.plan.count_batch(models, voices, lengths, work=None))
        if self.planner._copyable:  # a row done before may answer a request: `Planner._source` asks the ledger
            return None

        self._flush()
        numbers = range(before + 1, before + 1 + batch.num_rows)
        if isinstance(self.planner.firsts, Repeats):  # a run's: which rows are copies is settled after the pass
            defaults = self.job.defaults
            hashes = [request_hash(model, voice, words, self.format, defaults.speed, None, defaults.output, ())
                      for model, voice, words in zip(models, voices, _strings(text), strict=True)]
            self.planner.firsts.take_many(hashes, numbers, ids, models, [1] * len(ids), lengths)
        self.planner.taken += batch.num_rows
        if self.checks is not None:
            self.checks.see_named(folded)
        return Claimed(ids, folded, self.plan.count_batch(models, voices, lengths, work=numbers))

    def done(self, batch: pa.RecordBatch) -> tuple[list[str], list[str], list[str], list[str]] | None:
        """The batch's ids, texts, models and voices when every row of it is done, as `claim` finds
        them (export's rows, then, need no planning); None to leave the batch to the rows."""
        columns = self._columns(batch)
        if columns is None or self.planner.ledger is None:
            return None
        ids, text, models, voices, _, relpaths = columns
        found = self.planner.ledger.lookup_many(ids)
        texts = _strings(text)
        if not self._done(ids, relpaths, models, voices, texts, found):
            return None
        return ids, texts, models, voices

    def _columns(self, batch: pa.RecordBatch) -> tuple[list[str], Any, list[str], list[str], list[int], list[str]] | None:
        """A batch of plain rows as columns: ids, the text column, models, voices, the texts' lengths
        and file names; None when any row is not plain."""
        import pyarrow as pa
        import pyarrow.compute as pc

        names = set(batch.schema.names)
        if "text" not in names or "id" not in names or not names <= COLUMNS or batch.num_rows == 0:
            return None
        if not all(pa.types.is_string(t) or pa.types.is_large_string(t) for t in batch.schema.types):
            return None
        if any(column.null_count for column in batch.columns):
            return None
        text = batch.column("text")
        if not _all(pc.match_substring_regex(batch.column("id"), _PLAIN_ID)):
            return None
        try:
            batch.validate(full=True)  # Arrow reads a string column's bytes unchecked: the rows name the fault
        except pa.ArrowInvalid:
            return None
        if not _all(pc.match_substring_regex(text, _WORDS)) or _any(pc.match_substring(text, "<")):
            return None
        named: dict[str, list[str]] = {}
        for name, default in (("model", self.job.defaults.model), ("voice", self.job.defaults.voice)):
            if name in names:
                given = _names(batch.column(name))
                if given is None:
                    return None
                named[name] = given
            elif default is None:
                return None
            else:
                named[name] = [default] * batch.num_rows
        models, voices = named["model"], named["voice"]
        lengths = cast("list[int]", pc.utf8_length(text).to_pylist())  # type: ignore[call-overload]
        if not self._plain(models, voices, lengths):
            return None
        ids = _strings(batch.column("id"))
        return ids, text, models, voices, lengths, [f"{row_id}.{self.format}" for row_id in ids]

    def _done(self, ids: list[str], relpaths: list[str], models: list[str], voices: list[str], texts: list[str],
              found: dict[str, Entry]) -> bool:
        """Every row is done: recorded (in `found`) done, for the same audio, under its own name, and
        its file is there as recorded (`plan.needs_work`), looked for in the folder's listing together."""
        files = self.planner.files
        if not isinstance(files, Listing) or len(found) < len(ids):
            return False
        entries = [found[row_id] for row_id in ids]
        if any(entry.status != "done" or entry.path != relpath for entry, relpath in zip(entries, relpaths, strict=True)):
            return False
        if len(set(models)) == 1 and len(set(voices)) == 1:  # as a dataset's batch mostly is: one hasher for all
            made = list(map(self._fingerprints(models[0], voices[0]), texts))
        else:
            made = [self._fingerprints(model, voice)(words) for model, voice, words in zip(models, voices, texts, strict=True)]
        if made != [entry.fingerprint for entry in entries]:
            return False
        return files.have_all(relpaths, [entry.bytes for entry in entries])

    def _fingerprints(self, model: str, voice: str) -> Callable[[str], str]:
        if (model, voice) not in self._fingerprinters:
            defaults = self.job.defaults
            self._fingerprinters[model, voice] = fingerprints(model, voice, self.format, defaults.speed, defaults.output)
        return self._fingerprinters[model, voice]

    def _plain(self, models: list[str], voices: list[str], lengths: list[int]) -> bool:
        """Every (model, voice) of the batch is one voice, narratable if local, and every text fits
        its model's limit in one request."""
        for pair in set(zip(models, voices, strict=True)):
            if pair not in self._plain_pairs:
                self._plain_pairs[pair] = self._plain_pair(*pair)
            if not self._plain_pairs[pair]:
                return False
        for model in set(models):
            if model not in self._limits:
                self._limits[model] = limit_for(model, self.job.limits, self.job.chunk_chars)
        if len(self._limits) == 1 or len(set(self._limits.values())) == 1:
            return max(lengths) <= next(iter(self._limits.values()))
        limits = self._limits
        return all(length <= limits[model] for model, length in zip(models, lengths, strict=True))

    def _plain_pair(self, model: str, voice: str) -> bool:
        if voices_for(voice, model, self.job.voices) != (voice,):
            return False
        if not is_local(model):
            return True
        from .local import local_problem  # the embedded engine, for a local model's voices only

        return local_problem(model, voice) is None

    def _names_fit(self, relpaths: list[str], folded: list[str]) -> bool:
        """No file name is one batchtts keeps, a folder on disk, or too long for the file system."""
        checks = self.checks
        if checks is None:
            return True
        if checks.owned and not checks.owned.keys().isdisjoint(folded):
            return False
        return checks.fits_plain(relpaths)


def _strings(column: Any) -> list[str]:
    """A column of strings without nulls as Python strings."""
    return cast("list[str]", column.to_pylist())


def _names(column: Any) -> list[str] | None:
    """A column of model or voice names as strings, None unless every one is plain: each name
    checked once, and a column of one name (as most are) made into strings without reading it."""
    import pyarrow.compute as pc

    distinct = pc.unique(column)
    if not _all(pc.match_substring_regex(distinct, _PLAIN_NAME)):
        return None
    return [distinct[0].as_py()] * len(column) if len(distinct) == 1 else _strings(column)


def _all(mask: Any) -> bool:
    import pyarrow.compute as pc

    return bool(pc.all(mask).as_py())


def _any(mask: Any) -> bool:
    import pyarrow.compute as pc

    return bool(pc.any(mask).as_py())
