"""Model discovery: the provider's speech models with their prices and input limits.

`GET {base_url}/models?output_modalities=speech` answers in OpenRouter's model-list shape; a speech
model's `pricing.prompt` is USD per input character and `context_length` its input limit. The
list is cached for a day under the user's cache folder, one file per base URL, so a nightly job or
a dry run does not ask every time, and a dry run on a machine that cannot reach the provider
still prices from the last answer. A run checks its remote model names against the same list: a
typo would otherwise fail every row that names it, each at the price of a request.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import platformdirs

from . import tls
from .config import Job, Provider, Timeouts, check_settings
from .errors import UsageError
from .log import log
from .providers import is_local
from .suggest import did_you_mean

CACHE_SECONDS = 24 * 3600
UNREACHABLE_SECONDS = 60  # a provider that could not be asked is not asked again in the same minute
_unreachable: dict[str, tuple[float, UsageError]] = {}


@dataclass(frozen=True)
class ModelInfo:
    id: str
    name: str
    usd_per_char: float | None
    max_input_chars: int | None

    @property
    def usd_per_million(self) -> float | None:
        return None if self.usd_per_char is None else self.usd_per_char * 1_000_000


@dataclass(frozen=True)
class ModelList:
    base_url: str
    fetched_at: float
    models: tuple[ModelInfo, ...]
    from_cache: bool = False

    def get(self, model_id: str) -> ModelInfo | None:
        return next((m for m in self.models if m.id == model_id), None)


def parse(body: Any) -> tuple[ModelInfo, ...]:
    """The `data` array of a model list; entries without an id are skipped, odd prices read as unknown."""
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        raise ValueError("expected a JSON object with a 'data' list")
    models = []
    for item in body["data"]:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            continue
        pricing = item.get("pricing")
        if not isinstance(pricing, dict):
            pricing = {}
        limit = item.get("context_length")
        models.append(ModelInfo(
            id=item["id"],
            name=str(item.get("name") or item["id"]),
            usd_per_char=_number(pricing.get("prompt")),
            max_input_chars=limit if isinstance(limit, int) and limit > 0 else None,
        ))
    return tuple(sorted(models, key=lambda m: m.id))


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number >= 0 else None


def cache_file(base_url: str) -> Path:
    digest = hashlib.sha256(base_url.rstrip("/").encode()).hexdigest()[:16]
    return Path(platformdirs.user_cache_dir("batchtts")) / f"models-{digest}.json"


def _read_cache(base_url: str) -> ModelList | None:
    try:
        data = json.loads(cache_file(base_url).read_text(encoding="utf-8"))
        return ModelList(data["base_url"], float(data["fetched_at"]),
                         tuple(ModelInfo(**m) for m in data["models"]), from_cache=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(models: ModelList) -> None:
    path = cache_file(models.base_url)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"base_url": models.base_url, "fetched_at": models.fetched_at,
                                         "models": [asdict(m) for m in models.models]}), encoding="utf-8")
        os.replace(temporary, path)
    except OSError as exc:
        log.warning("models_cache_unwritable", path=str(path), error=str(exc))


def fetch(provider: Provider, timeouts: Timeouts) -> ModelList:
    """Ask the provider now. Raises UsageError when it cannot be reached or answers oddly, and again
    at once if asked within a minute, so a run's checks and prices wait out one timeout, not one each."""
    base_url = provider.base_url.rstrip("/")
    failed = _unreachable.get(base_url)
    if failed is not None and time.monotonic() - failed[0] < UNREACHABLE_SECONDS:
        raise failed[1]
    try:
        listing = _ask(provider, timeouts)
    except UsageError as exc:
        _unreachable[base_url] = (time.monotonic(), exc)
        raise
    _unreachable.pop(base_url, None)
    _write_cache(listing)
    return listing


def _ask(provider: Provider, timeouts: Timeouts) -> ModelList:
    import httpx  # loaded to ask: a local run, or one the cache answers, starts without it

    url = provider.base_url.rstrip("/") + "/models"
    try:
        response = httpx.get(url, params={"output_modalities": "speech"}, verify=tls.context(),
                             timeout=httpx.Timeout(timeouts.read, connect=timeouts.connect))
        response.raise_for_status()
        models = parse(response.json())
    except httpx.HTTPStatusError as exc:
        hint = ": check the base URL (it ends in /api/v1 for OpenRouter)" if exc.response.status_code == 404 else ""
        raise UsageError(f"{url}: HTTP {exc.response.status_code}{hint}") from exc
    except httpx.HTTPError as exc:
        raise UsageError(f"cannot reach {url}: {exc}") from exc
    except ValueError as exc:
        raise UsageError(f"{url}: not a model list: {exc}") from exc
    return ModelList(provider.base_url.rstrip("/"), time.time(), models)


def speech_models(provider: Provider, timeouts: Timeouts, refresh: bool = False) -> ModelList:
    """The cached list when under a day old, else a fresh one; a stale cache beats no answer."""
    check_settings(provider, "provider")
    cached = None if refresh else _read_cache(provider.base_url.rstrip("/"))
    if cached is not None and time.time() - cached.fetched_at < CACHE_SECONDS:
        return cached
    try:
        return fetch(provider, timeouts)
    except UsageError as exc:
        if cached is None:
            raise
        log.warning("models_stale", error=str(exc), cached_at=time.strftime("%Y-%m-%d %H:%M", time.localtime(cached.fetched_at)))
        return cached


def check_models(job: Job, models: Iterable[str]) -> None:
    """Warn of each remote model the provider does not list, with the closest names it does; with
    `job.strict`, refuse them (UsageError). A list that cannot be had, or an empty one (a provider
    that does not filter by speech), skips the check: it is a hint, never a reason to stop a run."""
    remote = sorted({m for m in models if not is_local(m)})
    if not remote:
        return
    try:
        listing = speech_models(job.provider, job.timeouts)
    except UsageError as exc:
        log.info("models_unchecked", error=str(exc), message="model names not checked: no model list")
        return
    known = [m.id for m in listing.models]
    unknown = [m for m in remote if listing.get(m) is None]
    if not known or not unknown:
        return
    where = listing.base_url
    problems = [f"{m!r} is not one of the speech models {where} lists{did_you_mean(m, known)}" for m in unknown]
    if job.strict:
        raise UsageError(f"{'; '.join(problems)}: fix the name, or drop --strict (strict = true in a job file) "
                         "to send it anyway")
    for model, problem in zip(unknown, problems, strict=True):
        log.warning("unknown_model", model=model, message=f"{problem}; its rows are sent anyway "
                    "(--strict refuses to start instead); `batchtts models` lists them")
