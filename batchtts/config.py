"""The typed job: what a TOML job file says, overridden by command-line flags.

A Python user builds a `Job` directly and calls `batchtts.run(job)`; the CLI builds the same object
from a job file plus flags, so both paths meet here and nowhere else, and `Job.validate` checks
every setting once for both: each field's type annotation says what it takes, its metadata the
range, the rule and the flag that sets it, so a setting added later is checked without more code.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from . import sharding
from .errors import MissingKeyError, UsageError
from .lexicon import Lexicon
from .markup import Cast
from .redact import redact_uri
from .sharding import Shard
from .suggest import did_you_mean

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

OutputFormat = Literal["mp3", "pcm", "wav", "flac"]
FORMATS: tuple[str, ...] = typing.get_args(OutputFormat)
DEFAULT_BASE_URL = "https://openrouter.ai/api/v1"
SPEEDS = (0.25, 4.0)  # the speech API's range of speed multipliers
DEFAULT_RETRY_STATUSES = (429, 502, 503, 524, 529)
MAX_CONCURRENCY = 4096

LEDGER_NAME = "ledger.sqlite"  # a job's ledger, in its output folder, unless --ledger names another


@dataclass(frozen=True)
class Bounds:
    """The range a number takes; with `above`, `low` itself is out of it."""

    low: float | None = None
    high: float | None = None
    above: bool = False

    def holds(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.above else value < self.low):
            return False
        return self.high is None or value <= self.high

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return f"from {self.low:g} to {self.high:g}"
        if self.low is not None:
            return f"more than {self.low:g}" if self.above else f"at least {self.low:g}"
        return f"at most {self.high:g}"


def _setting(default: Any = dataclasses.MISSING, *, flag: str | None = None, low: float | None = None,
             high: float | None = None, above: bool = False, rule: Callable[[Any], str | None] | None = None,
             default_factory: Any = dataclasses.MISSING) -> Any:
    """A field with what checking it takes beyond its type: the flag that sets it (named in messages),
    a range (for a list or table, of each item), a rule returning what is wrong or None."""
    bounds = Bounds(low, high, above) if low is not None or high is not None else None
    return field(default=default, default_factory=default_factory,
                 metadata={"flag": flag, "bounds": bounds, "rule": rule})


def _not_blank(value: str) -> str | None:
    return "must not be empty" if not value.strip() else None


def _header_text(value: str) -> str | None:
    """Values sent as HTTP headers: httpx encodes them as ASCII and refuses line breaks."""
    if all(" " <= c <= "~" for c in value):
        return None
    return f"is sent as an HTTP header: use printable ASCII characters only, not {_shown(value)}"


def _variable_name(value: str) -> str | None:
    # Never echoes the value: a key pasted here by mistake must not reach the logs.
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        return None
    return ("must be the name of the environment variable that holds the API key (letters, digits and _, "
            "such as OPENROUTER_API_KEY), not the key itself")


def _base_url(value: str) -> str | None:
    """http(s)://host[:port][/path], holding no credentials. A user:key@ part or a query string
    (?key=...) would be sent, logged, recorded in the ledger and named in the models cache; they are
    refused without being echoed. An API base URL has no query or fragment: paths are added to it."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - parsing the port is what raises ValueError for a bad one
    except ValueError:
        return "is not a URL: give http://host/path or https://host/path"
    if "@" in parts.netloc:
        return ("must not hold a user name or key (user:key@host): put the API key in its environment variable "
                "(OPENROUTER_API_KEY, or the one api_key_env names) and give the URL without it")
    if "?" in value or "#" in value:
        return ("must not hold a query string or fragment (?... or #...): an API base URL has neither, and a key "
                "there would be sent and recorded; put the API key in its environment variable (OPENROUTER_API_KEY, "
                "or the one api_key_env names) and give the URL without it")
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c <= " " for c in value):
        return (f"must be an http:// or https:// URL with a host, such as {DEFAULT_BASE_URL}, "
                f"not {_shown(redact_uri(value))}")
    return None


@dataclass(frozen=True)
class Output:
    """The job file's [output]: the rate and channels every row's file is made into as it lands, in
    its own format (16 kHz mono, as many trainers read). Unset, a file keeps the provider's."""

    sample_rate: int | None = _setting(None, flag="--sample-rate", low=1000, high=384_000)
    channels: int | None = _setting(None, flag="--channels", low=1, high=2)

    @property
    def shaped(self) -> bool:
        return self.sample_rate is not None or self.channels is not None

    def refused(self, fmt: str) -> str | None:
        """What the encoder of a row's format says to the rate (mp3's takes nine), or None."""
        if self.sample_rate is None:
            return None
        from .conform import refused  # the encoders: loaded by jobs that set a rate

        return refused(fmt, self.sample_rate)


@dataclass(frozen=True)
class Defaults:
    """Values for rows whose manifest leaves a column empty or absent, and the [output] shape of
    every row's file: what a row is, so what its fingerprint hashes."""

    model: str | None = _setting(None, flag="--model", rule=_not_blank)
    voice: str | None = _setting(None, flag="--voice", rule=_not_blank)
    format: OutputFormat = _setting("mp3", flag="--format")
    speed: float | None = _setting(None, flag="--speed", low=SPEEDS[0], high=SPEEDS[1])
    output: Output = field(default_factory=Output)  # the job file's [output] table


@dataclass(frozen=True)
class Timeouts:
    """Seconds; `read` bounds the wait between two chunks of a body, not the whole body."""

    connect: float = _setting(10.0, flag="--connect-timeout", low=0, above=True)
    read: float = _setting(120.0, flag="--timeout", low=0, above=True)


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try one row before recording it as failed."""

    statuses: tuple[int, ...] = _setting(DEFAULT_RETRY_STATUSES, low=100, high=599)
    max_attempts: int = _setting(6, flag="--max-attempts", low=1)
    backoff_initial: float = _setting(1.0, flag="--backoff-initial", low=0)
    backoff_max: float = _setting(60.0, flag="--backoff-max", low=0)
    max_row_seconds: float = _setting(900.0, flag="--max-row-seconds", low=0, above=True)
    # The longest wait a provider may ask for (a rate limit's reset, a spent quota) before the run
    # stops with exit 3 and leaves the rows for a later run, instead of sleeping through cron slots.
    max_wait: float = _setting(300.0, flag="--max-wait", low=0)


@dataclass(frozen=True)
class Stitching:
    """How the chunks of a long row are joined: seconds of silence at each kind of seam."""

    sentence_gap: float = _setting(0.35, low=0, high=60)
    paragraph_gap: float = _setting(0.8, low=0, high=60)


@dataclass(frozen=True)
class Provider:
    base_url: str = _setting(DEFAULT_BASE_URL, flag="--base-url, BATCHTTS_BASE_URL", rule=_base_url)
    api_key_env: str = _setting("OPENROUTER_API_KEY", flag="--api-key-env", rule=_variable_name)
    referer: str | None = _setting("https://github.com/batchtts/batchtts", rule=_header_text)
    title: str | None = _setting("batchtts", rule=_header_text)

    def api_key(self) -> str:
        key = os.environ.get(self.api_key_env, "").strip()
        if not key:
            raise MissingKeyError(self.api_key_env)
        if not all(" " < c <= "~" for c in key):
            raise UsageError(f"the {self.api_key_env} environment variable holds a space, a line break or a non-ASCII "
                             "character, which an HTTP header cannot carry: set it to the key alone")
        return key


@dataclass(frozen=True)
class Budget:
    """Caps on what one run may spend; the run stops taking rows before the estimate would pass one."""

    max_cost: float | None = _setting(None, flag="--max-cost", low=0)
    max_chars: int | None = _setting(None, flag="--max-chars", low=0)

    @property
    def capped(self) -> bool:
        return self.max_cost is not None or self.max_chars is not None


MasteringPreset = Literal["acx", "podcast", "none"]
MASTERING_PRESETS: tuple[str, ...] = typing.get_args(MasteringPreset)


@dataclass(frozen=True)
class Mastering:
    """The store spec each narrated file is mastered to, into OUT/mastered/ (none: no mastering)."""

    preset: MasteringPreset = _setting("none", flag="--master")


Verification = Literal["none", "asr"]
VERIFICATIONS: tuple[str, ...] = typing.get_args(Verification)


def _recogniser(value: str) -> str | None:
    """`asr` needs the recogniser: refused before anything is sent, not at the first file."""
    if value != "asr":
        return None
    from .asr import missing

    return missing()


@dataclass(frozen=True)
class Checks:
    """What each narrated file is held to as it lands (NeMo Curator's quality filters): a
    file outside a bound is kept, and its row done but flagged with why; `--redo-flagged` narrates
    flagged rows again, at most `max_redo` times each."""

    enabled: bool = _setting(True)
    min_chars_per_second: float = _setting(8.0, low=0)
    max_chars_per_second: float = _setting(25.0, low=0, above=True)
    max_inner_silence: float = _setting(2.0, low=0, above=True)  # seconds of silence inside the speech
    max_clipping: float = _setting(0.0, low=0, high=1)  # share of samples at full scale
    # Seconds. No bound unless the job sets one: a dataset job sets NeMo Curator's 1 and 30, an
    # audiobook's chapters run for minutes.
    min_duration: float | None = _setting(None, low=0)
    max_duration: float | None = _setting(None, low=0, above=True)
    max_redo: int = _setting(2, low=0)
    verify: Verification = _setting("none", flag="--verify", rule=_recogniser)  # asr: a word error rate per row
    max_wer: float = _setting(0.75, low=0)


@dataclass(frozen=True)
class Job:
    manifest: Path
    out: Path | str = _setting(flag="--out")
    ledger: Path | None = _setting(None, flag="--ledger")
    defaults: Defaults = field(default_factory=Defaults)
    provider: Provider = field(default_factory=Provider)
    timeouts: Timeouts = field(default_factory=Timeouts)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    stitching: Stitching = field(default_factory=Stitching)
    budget: Budget = field(default_factory=Budget)
    mastering: Mastering = field(default_factory=Mastering)
    checks: Checks = field(default_factory=Checks)
    chunk_chars: int | None = _setting(None, flag="--chunk-chars", low=1)
    limits: dict[str, int] = _setting(default_factory=dict, low=1)  # characters per request, by model or prefix
    prices: dict[str, float] = _setting(default_factory=dict, low=0)  # USD per million characters, by model
    concurrency: int = _setting(16, flag="--concurrency", low=1, high=MAX_CONCURRENCY)
    requests_per_minute: float | None = _setting(None, flag="--rpm", low=0, above=True)
    limit: int | None = _setting(None, flag="--limit", low=0)
    retry_failed: bool = _setting(False, flag="--retry-failed")
    verify_files: bool = _setting(False, flag="--verify-files")  # a rerun looks at every done file's size
    redo_flagged: bool = _setting(False, flag="--redo-flagged")  # narrate flagged rows again
    dry_run: bool = _setting(False, flag="--dry-run")
    grace_seconds: float = _setting(30.0, flag="--grace", low=0)
    max_runtime: float | None = _setting(None, flag="--max-runtime", low=0, above=True)
    shard: Shard | None = _setting(None, flag="--shard")
    progress_interval: float = _setting(10.0, flag="--progress-interval", low=0, above=True)
    log_format: Literal["auto", "console", "json"] = _setting("auto", flag="--log-format")
    strict: bool = _setting(False, flag="--strict")  # refuse, not just warn of, models the provider does not list
    lexicon: Lexicon = _setting(default_factory=Lexicon, flag="--lexicon")  # words rewritten before they are sent
    voices: Cast = _setting(default_factory=Cast)  # voice markup's names: the voice each speaks in, by model
    captions: Literal["srt", "vtt"] | None = _setting(None, flag="--captions")  # a caption file beside each audio file

    def __post_init__(self) -> None:
        # A path may be given as a string; one stays a string only as an object-store URI (s3://, gs://,
        # hdfs://), which only `out` takes: a local folder is a Path.
        for name in ("manifest", "out", "ledger"):
            value = getattr(self, name)
            if isinstance(value, str) and not is_uri(value):
                object.__setattr__(self, name, Path(value))
        # One shard is the whole manifest: the job's own ledger, as if unsharded (`--shard 0/1` opts
        # a run inside a Slurm array out of sharding).
        if isinstance(self.shard, Shard) and self.shard.count == 1:
            object.__setattr__(self, "shard", None)

    @property
    def named_ledger(self) -> Path:
        """The ledger the job names (default OUT/ledger.sqlite); shards keep theirs beside it."""
        if self.ledger is not None:
            return self.ledger
        if isinstance(self.out, str):
            raise UsageError(f"output to {redact_uri(self.out)} needs a local ledger: pass --ledger PATH")
        return self.out / LEDGER_NAME

    @property
    def ledger_path(self) -> Path:
        """This run's ledger file: the one named, or its shard's."""
        return sharding.ledger_for(self.named_ledger, self.shard)

    def validate(self) -> None:
        """Raise UsageError naming the first setting of the wrong type or out of range. Job files, flags
        and jobs built in Python all pass here before anything is read or sent."""
        check_settings(self)
        if (refused := self.defaults.output.refused(self.defaults.format)) is not None:
            raise UsageError(f"[output] sample_rate (--sample-rate): {refused}")
        if self.redo_flagged and not self.checks.enabled:
            raise UsageError("--redo-flagged narrates again the rows the audio checks flagged, keeping the better "
                             "take: it needs the checks on ([checks] enabled = true)")

    def redacted(self) -> dict[str, Any]:
        """The resolved configuration for the start event; holds no secret, only the key's variable name."""
        data = dataclasses.asdict(self)
        data["out"] = redact_uri(self.out) if isinstance(self.out, str) else self.out
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in data.items()}


_SECTIONS: dict[str, type[DataclassInstance]] = {
    "defaults": Defaults,
    "provider": Provider,
    "timeouts": Timeouts,
    "retry": RetryPolicy,
    "stitching": Stitching,
    "budget": Budget,
    "mastering": Mastering,
    "checks": Checks,
    "output": Output,  # held by Defaults: it shapes every row
}
_TABLES = ("limits", "prices")
_PATHS = ("manifest", "out", "ledger")
_RENAMED = {
    "max_chars": "max_chars is now chunk_chars (the longest text sent in one request); "
                 "a cap on characters per run is max_chars under [budget]",
}
_NOUNS: dict[Any, tuple[str, str]] = {  # a value of this type, in a message: one, several
    bool: ("true or false", "true or false"),
    int: ("a whole number", "whole numbers"),
    float: ("a number", "numbers"),
    str: ("text", "texts"),
    Path: ("a path", "paths"),
}


def check_settings(settings: DataclassInstance, section: str | None = None) -> None:
    """Check each field of a Job or of one of its sections against its type annotation, its range and
    its rule; raise UsageError naming the first one that fails."""
    hints = _hints(type(settings))
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if hints[f.name] is _SECTIONS.get(f.name):
            if not isinstance(value, _SECTIONS[f.name]):
                raise UsageError(f"{f.name} must be a {_SECTIONS[f.name].__name__}, not {_shown(value)}")
            check_settings(value, f.name)
            continue
        label = f"[{section}] {f.name}" if section else f"[{f.name}]" if f.name in _TABLES else f.name
        if f.metadata.get("flag"):
            label += f" ({f.metadata['flag']})"
        _check(label, value, hints[f.name], f.metadata)


def bounds_of(settings: type, name: str) -> tuple[type, Bounds]:
    """A number setting's type (int or float) and range, for the flag that sets it to refuse what
    the job file would."""
    hint = _hints(settings)[name]
    number = next(a for a in (*typing.get_args(hint), hint) if a in (int, float))
    bounds = next(f.metadata["bounds"] for f in dataclasses.fields(settings) if f.name == name)
    return number, bounds


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _keys(cls: type) -> dict[str, Any]:
    """The settings a table takes in a job file: its fields, but those that are tables of their own
    ([output], which Defaults holds)."""
    return {name: hint for name, hint in _hints(cls).items() if hint is not _SECTIONS.get(name)}


def _check(label: str, value: Any, hint: Any, meta: Any) -> None:
    bounds: Bounds | None = meta.get("bounds")
    if typing.get_origin(hint) is dict:
        if not isinstance(value, dict):
            raise UsageError(f"{label} must be a table of {_noun(typing.get_args(hint)[1], plural=True)}, "
                             f"not {_shown(value)}")
        for key, item in value.items():
            _check(f"{label} {_shown(key)}", item, typing.get_args(hint)[1], meta)
        return
    items = value if typing.get_origin(hint) is tuple and isinstance(value, tuple) else (value,)
    if not _fits(value, hint) or (bounds is not None and not all(v is None or bounds.holds(v) for v in items)):
        each = "each " if typing.get_origin(hint) is tuple else ""
        ranged = f", {each}{bounds}" if bounds is not None else ""
        raise UsageError(f"{label} must be {_noun(hint)}{ranged}, not {_shown(value)}")
    rule = meta.get("rule")
    if rule is not None and value is not None and (problem := rule(value)):
        raise UsageError(f"{label} {problem}")


def _fits(value: Any, hint: Any) -> bool:
    """Whether `value` is of the annotated type. A bool is not a number here, though Python says it
    is an int; a number is finite."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is Literal:
        return isinstance(value, str) and value in args
    if origin is tuple:
        return isinstance(value, tuple) and all(_fits(v, args[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return _number(value)
    if hint is Path:
        return isinstance(value, Path) and "\0" not in str(value)
    return isinstance(value, hint)


def _noun(hint: Any, plural: bool = False) -> str:
    """What a value of the annotated type is, in words: "a whole number", "one of "mp3", "pcm""."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_noun(a, plural) for a in args if a is not type(None))
    if origin is Literal:
        return f"one of {', '.join(_shown(a) for a in args)}"
    if origin is tuple:
        return f"a list of {_noun(args[0], plural=True)}"
    if hint in _NOUNS:
        return _NOUNS[hint][plural]
    return f"a {hint.__name__}"


def _shown(value: Any) -> str:
    """A value as the job file would write it, cut short, URIs without their credentials."""
    if isinstance(value, str) and is_uri(value):
        value = redact_uri(value)
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):  # a table with keys that are not text, a structure that holds itself
        text = type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _unknown(names: list[str], known: set[str]) -> str:
    """The unknown names, each with where it belongs if it is a setting out of place, else the
    closest known name."""
    return ", ".join(f"{name}{_home(name) or did_you_mean(name, known)}" for name in names)


def _home(name: str) -> str:
    for section, cls in _SECTIONS.items():
        if name in _keys(cls):
            return f" (it goes under [{section}])"
    if name in _hints(Job) and name not in _SECTIONS:
        return " (it goes at the top of the job file, before any [section])"
    return ""


_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")


def _number(value: object) -> bool:
    """A real, finite number: not a bool (TOML's true), not a string, not NaN or infinity, not an
    integer too large for a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def parse_duration(value: str | float) -> float:
    """Seconds from `90`, `45s`, `50m`, `2h` or `1h30m`."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise UsageError(f"not a duration: {value!r} (use seconds, or 45s, 50m, 2h, 1h30m)")
    if isinstance(value, (int, float)):
        if not _number(value):
            raise UsageError(f"not a duration: {value!r} (use seconds, or 45s, 50m, 2h, 1h30m)")
        return float(value)
    text = value.strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text)
    match = _DURATION.match(text)
    if not text or match is None:
        raise UsageError(f"not a duration: {value!r} (use seconds, or 45s, 50m, 2h, 1h30m)")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def is_uri(value: object) -> bool:
    return isinstance(value, str) and "://" in value


def load_job(path: Path | None, **overrides: Any) -> Job:
    """Read a job file (paths in it are relative to the file) and apply overrides that are not None.

    Overrides use dotted names for sections: `{"defaults.model": "m", "concurrency": 8}`.
    """
    raw: dict[str, Any] = {}
    base = Path.cwd()
    where = f"{path}: " if path is not None else ""
    if path is not None:
        raw = _read(path)
        base = path.resolve().parent

    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise UsageError(f"{where}[{key}] must be a table of settings, not {_shown(value)}")
            sections[key] = dict(value)
        else:
            top[key] = value
    for old, message in _RENAMED.items():
        if old in top:
            raise UsageError(f"{where}{message}")
    known_top = set(_hints(Job)) - set(_SECTIONS)
    unknown = sorted(set(top) - known_top)
    if unknown:
        raise UsageError(f"{where}unknown job setting{'s' if len(unknown) > 1 else ''}: "
                         f"{_unknown(unknown, known_top | set(_SECTIONS))}")
    for p in _PATHS:
        if p not in top:
            continue
        if not isinstance(top[p], str) or "\0" in top[p]:
            raise UsageError(f"{where}{p} must be a path (text), not {_shown(top[p])}")
        if not is_uri(top[p]):  # os.path's expanduser leaves ~nobody as it is, where pathlib's raises
            top[p] = Path(os.path.normpath(base / os.path.expanduser(top[p])))

    lexicon_file = overrides.pop("lexicon", None)  # --lexicon: in place of the job file's [lexicon] file
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, dot, name = dotted.rpartition(".")
        if dot:
            sections.setdefault(section, {})[name] = value
        else:
            top[name] = Path(value) if name in _PATHS and not is_uri(value) else value

    stray = sorted(sections.keys() - _SECTIONS.keys())
    if stray:
        raise UsageError(f"unknown section [{stray[0]}]{did_you_mean(stray[0], _SECTIONS)}")
    if isinstance(sections.get("retry", {}).get("max_wait"), str):
        try:
            sections["retry"]["max_wait"] = parse_duration(sections["retry"]["max_wait"])
        except UsageError as exc:
            raise UsageError(f"{where}[retry] max_wait: {exc}") from None
    built: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        values = sections.get(name, {})
        hints = _keys(cls)
        unknown = sorted(set(values) - set(hints))
        if unknown:
            raise UsageError(f"{where}unknown key{'s' if len(unknown) > 1 else ''} in [{name}]: "
                             f"{_unknown(unknown, set(hints))}; [{name}] takes {', '.join(hints)}")
        built[name] = cls(**{k: tuple(v) if typing.get_origin(hints[k]) is tuple and isinstance(v, list) else v
                             for k, v in values.items()})
    built["defaults"] = dataclasses.replace(built["defaults"], output=built.pop("output"))

    if top.get("max_runtime") is not None:
        try:
            top["max_runtime"] = parse_duration(top["max_runtime"])
        except UsageError as exc:
            raise UsageError(f"{where}max_runtime: {exc}") from None
    if isinstance(top.get("shard"), str):
        top["shard"] = sharding.parse(top["shard"], source=f"shard in {path}" if path else "--shard")
    elif top.get("shard") is not None and not isinstance(top["shard"], Shard):
        raise UsageError(f'{where}shard takes "I/N", for example shard = "0/8"')
    for required in ("manifest", "out"):
        if top.get(required) is None:
            raise UsageError(f"no {required}: give it in the job file or on the command line")
    top["lexicon"] = Lexicon.from_setting(top.get("lexicon"), base, where,
                                          file=None if lexicon_file is None else Path(lexicon_file))
    if not isinstance(top.get("voices", Cast()), Cast):
        top["voices"] = Cast(top["voices"], where=f"{where}[voices]")
    job = Job(**top, **built)
    job.validate()
    return job


def _read(path: Path) -> dict[str, Any]:
    import tomllib  # for job files alone: commands given none (status, --version) do not load it

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read job file {path}: {exc.strerror or exc}") from exc
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not a TOML job file: byte {exc.start} is not UTF-8 text") from None
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from None
