"""batchtts: narrate a manifest of texts into audio files, resumably.

    import batchtts
    result = batchtts.run(batchtts.load_job(Path("jobs/audiobook.toml")))
    result = batchtts.run(batchtts.Job(manifest=Path("m.csv"), out=Path("out"),
                                       defaults=batchtts.Defaults(model="openai/gpt-4o-mini-tts", voice="alloy"),
                                       budget=batchtts.Budget(max_cost=5.0), shard=batchtts.Shard(0, 4)))
"""

__version__ = "0.1.0"

from .config import Budget, Defaults, Job, Provider, RetryPolicy, Timeouts, load_job
from .runner import RunResult, run
from .sharding import Shard

__all__ = ["Budget", "Defaults", "Job", "Provider", "RetryPolicy", "RunResult", "Shard", "Timeouts", "load_job", "run"]
