"""batchtts: narrate a manifest of texts into audio files, resumably.

    import batchtts
    result = batchtts.run(batchtts.load_job(Path("jobs/audiobook.toml")))
    result = batchtts.run(batchtts.Job(manifest=Path("m.csv"), out=Path("out"),
                                       defaults=batchtts.Defaults(model="openai/gpt-4o-mini-tts", voice="alloy"),
                                       budget=batchtts.Budget(max_cost=5.0), shard=batchtts.Shard(0, 4)))
    result = await batchtts.arun(job)           # inside a running event loop
    report = batchtts.status(["out"])           # done, failed, pending
    batchtts.export(["out"], to="results.csv")  # one row per manifest row, with its file

The names are loaded when first used: `batchtts --version` and `batchtts status` load no HTTP stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .config import Budget, Defaults, Job, Provider, RetryPolicy, Timeouts, load_job
    from .providers import AudioStream, SpeechProvider, SpeechRequest
    from .results import export, status
    from .runner import RunResult, arun, run
    from .sharding import Shard

_WHERE = {
    "Budget": "config", "Defaults": "config", "Job": "config", "Provider": "config", "RetryPolicy": "config",
    "Timeouts": "config", "load_job": "config", "AudioStream": "providers", "SpeechProvider": "providers",
    "SpeechRequest": "providers", "export": "results", "status": "results", "RunResult": "runner", "arun": "runner",
    "run": "runner", "Shard": "sharding",
}
__all__ = [
    "AudioStream", "Budget", "Defaults", "Job", "Provider", "RetryPolicy", "RunResult", "Shard", "SpeechProvider",
    "SpeechRequest", "Timeouts", "arun", "export", "load_job", "run", "status",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'batchtts' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value
