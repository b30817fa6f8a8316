"""The typed job: what a TOML job file says, overridden by command-line flags.

A Python user builds a `Job` directly and calls `batchtts.run(job)`; the CLI builds the same object
from a job file plus flags, so both paths meet here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode

from . import sharding
from .errors import MissingKeyError, UsageError
from .sharding import Shard

OutputFormat = Literal["mp3", "pcm", "wav"]
FORMATS: tuple[str, ...] = ("mp3", "pcm", "wav")
DEFAULT_BASE_URL = "https://openrouter.ai/api/v1"
DEFAULT_RETRY_STATUSES = (429, 502, 503, 524, 529)


@dataclass(frozen=True)
class Defaults:
    """Values for rows whose manifest leaves a column empty or absent."""

    model: str | None = None
    voice: str | None = None
    format: OutputFormat = "mp3"
    speed: float | None = None


@dataclass(frozen=True)
class Timeouts:
    """Seconds; `read` bounds the wait between two chunks of a body, not the whole body."""

    connect: float = 10.0
    read: float = 120.0


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try one row before recording it as failed."""

    statuses: tuple[int, ...] = DEFAULT_RETRY_STATUSES
    max_attempts: int = 6
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    max_row_seconds: float = 900.0


@dataclass(frozen=True)
class Stitching:
    """How the chunks of a long row are joined: seconds of silence at each kind of seam."""

    sentence_gap: float = 0.35
    paragraph_gap: float = 0.8


@dataclass(frozen=True)
class Provider:
    base_url: str = DEFAULT_BASE_URL
    api_key_env: str = "OPENROUTER_API_KEY"
    referer: str | None = "https://github.com/batchtts/batchtts"
    title: str | None = "batchtts"

    def api_key(self) -> str:
        key = os.environ.get(self.api_key_env, "").strip()
        if not key:
            raise MissingKeyError(self.api_key_env)
        return key


@dataclass(frozen=True)
class Budget:
    """Caps on what one run may spend; the run stops taking rows before the estimate would pass one."""

    max_cost: float | None = None
    max_chars: int | None = None

    @property
    def capped(self) -> bool:
        return self.max_cost is not None or self.max_chars is not None


@dataclass(frozen=True)
class Job:
    manifest: Path
    out: Path | str
    ledger: Path | None = None
    defaults: Defaults = field(default_factory=Defaults)
    provider: Provider = field(default_factory=Provider)
    timeouts: Timeouts = field(default_factory=Timeouts)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    stitching: Stitching = field(default_factory=Stitching)
    budget: Budget = field(default_factory=Budget)
    chunk_chars: int | None = None
    limits: dict[str, int] = field(default_factory=dict)
    prices: dict[str, float] = field(default_factory=dict)
    concurrency: int = 16
    requests_per_minute: float | None = None
    limit: int | None = None
    retry_failed: bool = False
    dry_run: bool = False
    grace_seconds: float = 30.0
    max_runtime: float | None = None
    shard: Shard | None = None
    progress_interval: float = 10.0
    log_format: Literal["auto", "console", "json"] = "auto"

    def __post_init__(self) -> None:
        # `out` stays a string only for object-store URIs (s3://, gs://, hdfs://); a local folder is a Path.
        if isinstance(self.out, str) and not is_uri(self.out):
            object.__setattr__(self, "out", Path(self.out))
        # One shard is the whole manifest: the job's own ledger, as if unsharded (`--shard 0/1` opts
        # a run inside a Slurm array out of sharding).
        if self.shard is not None and self.shard.count == 1:
            object.__setattr__(self, "shard", None)

    @property
    def named_ledger(self) -> Path:
        """The ledger the job names (default OUT/ledger.sqlite); shards keep theirs beside it."""
        if isinstance(self.out, str) and self.ledger is None:
            raise UsageError(f"output to {redact_uri(self.out)} needs a local ledger: pass --ledger PATH")
        return self.ledger if self.ledger is not None else self.out / "ledger.sqlite"

    @property
    def ledger_path(self) -> Path:
        """This run's ledger file: the one named, or its shard's."""
        return sharding.ledger_for(self.named_ledger, self.shard)

    def validate(self) -> None:
        if self.defaults.format not in FORMATS:
            raise UsageError(f"unknown format {self.defaults.format!r}: use one of {', '.join(FORMATS)}")
        if self.concurrency < 1:
            raise UsageError("concurrency must be at least 1")
        if self.requests_per_minute is not None and self.requests_per_minute <= 0:
            raise UsageError("requests_per_minute must be positive")
        if self.retry.max_attempts < 1:
            raise UsageError("max_attempts must be at least 1")
        if self.limit is not None and self.limit < 0:
            raise UsageError("limit must not be negative")
        if self.chunk_chars is not None and self.chunk_chars < 1:
            raise UsageError("chunk_chars must be at least 1")
        if not all(isinstance(v, int) and v > 0 for v in self.limits.values()):
            raise UsageError("[limits] maps model names (or prefixes) to positive character counts")
        if not all(_number(v) and v >= 0 for v in self.prices.values()):
            raise UsageError("[prices] maps model names to USD per million characters (numbers, 0 or more)")
        if self.budget.max_cost is not None and not (_number(self.budget.max_cost) and self.budget.max_cost >= 0):
            raise UsageError(f"max_cost is a number of USD, 0 or more, not {self.budget.max_cost!r}")
        if self.budget.max_chars is not None and not (
                isinstance(self.budget.max_chars, int) and not isinstance(self.budget.max_chars, bool)
                and self.budget.max_chars >= 0):
            raise UsageError(f"max_chars is a whole number of characters, 0 or more, not {self.budget.max_chars!r}")
        if self.max_runtime is not None and not (_number(self.max_runtime) and self.max_runtime > 0):
            raise UsageError(f"max_runtime must be a positive duration, not {self.max_runtime!r}")
        if self.log_format not in ("auto", "console", "json"):
            raise UsageError("log_format must be auto, console or json")

    def redacted(self) -> dict[str, Any]:
        """The resolved configuration for the start event; holds no secret, only the key's variable name."""
        data = dataclasses.asdict(self)
        data["out"] = redact_uri(self.out) if isinstance(self.out, str) else self.out
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in data.items()}


_SECTIONS: dict[str, type] = {
    "defaults": Defaults,
    "provider": Provider,
    "timeouts": Timeouts,
    "retry": RetryPolicy,
    "stitching": Stitching,
    "budget": Budget,
}
_TABLES = ("limits", "prices")
_PATHS = ("manifest", "out", "ledger")
_RENAMED = {
    "max_chars": "max_chars is now chunk_chars (the longest text sent in one request); "
                 "a cap on characters per run is max_chars under [budget]",
}


_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")


def _number(value: object) -> bool:
    """A real, finite number: not a bool (TOML's true), not a string, not NaN or infinity."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_duration(value: str | float) -> float:
    """Seconds from `90`, `45s`, `50m`, `2h` or `1h30m`."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise UsageError(f"not a duration: {value!r} (use seconds, or 45s, 50m, 2h, 1h30m)")
    if isinstance(value, (int, float)):
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


_SECRET_OPTION = re.compile(r"key|secret|token|password|credential", re.IGNORECASE)


def redact_uri(uri: str) -> str:
    """An object-store URI fit for logs and the ledger: credentials in it (`s3://KEY:SECRET@bucket`,
    `access_key`, `secret_key`, `session_token`, ... options) are dropped; a user name alone
    (`gs://anonymous@bucket`) and the other options (region, endpoint) are kept."""
    base, _, query = uri.partition("?")
    scheme, sep, rest = base.partition("://")
    authority, slash, path = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    if at and ":" in userinfo:
        base = f"{scheme}{sep}{host}{slash}{path}"
    kept = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if not _SECRET_OPTION.search(k)]
    return f"{base}?{urlencode(kept)}" if kept else base


def load_job(path: Path | None, **overrides: Any) -> Job:
    """Read a job file (paths in it are relative to the file) and apply overrides that are not None.

    Overrides use dotted names for sections: `{"defaults.model": "m", "concurrency": 8}`.
    """
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise UsageError(f"cannot read job file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"{path}: not valid TOML: {exc}") from exc
        base = path.resolve().parent

    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise UsageError(f"{path}: [{key}] must be a table")
            sections[key] = dict(value)
        else:
            top[key] = value
    for old, message in _RENAMED.items():
        if old in top:
            raise UsageError(f"{path}: {message}")
    for p in _PATHS:
        if p in top and top[p] is not None and not is_uri(top[p]):
            top[p] = Path(os.path.normpath(base / Path(top[p]).expanduser()))

    for dotted, value in overrides.items():
        if value is None:
            continue
        if "." in dotted:
            section, name = dotted.split(".", 1)
            sections.setdefault(section, {})[name] = value
        else:
            top[dotted] = Path(value) if dotted in _PATHS and not is_uri(value) else value

    built: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        values = sections.get(name, {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise UsageError(f"unknown key{'s' if len(unknown) > 1 else ''} in [{name}]: {', '.join(sorted(unknown))}")
        if "statuses" in values:
            values["statuses"] = tuple(int(s) for s in values["statuses"])
        built[name] = cls(**values)

    known_top = {f.name for f in dataclasses.fields(Job)} - set(_SECTIONS)
    unknown = set(top) - known_top
    if unknown:
        raise UsageError(f"unknown job setting{'s' if len(unknown) > 1 else ''}: {', '.join(sorted(unknown))}")
    if top.get("max_runtime") is not None:
        top["max_runtime"] = parse_duration(top["max_runtime"])
    if isinstance(top.get("shard"), str):
        top["shard"] = sharding.parse(top["shard"], source=f"shard in {path}" if path else "--shard")
    elif top.get("shard") is not None and not isinstance(top["shard"], Shard):
        raise UsageError(f'{path}: shard takes "I/N", for example shard = "0/8"')
    for table in _TABLES:
        if table in top and not isinstance(top[table], dict):
            raise UsageError(f"{path}: [{table}] must be a table")
    for required in ("manifest", "out"):
        if top.get(required) is None:
            raise UsageError(f"no {required}: give it in the job file or on the command line")
    try:
        job = Job(**top, **built)
    except TypeError as exc:
        raise UsageError(f"bad job setting: {exc}") from exc
    job.validate()
    return job
