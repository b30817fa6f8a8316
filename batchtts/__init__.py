"""batchtts: narrate a manifest of texts into audio files, resumably.

    import batchtts
    result = batchtts.run(batchtts.load_job(Path("jobs/audiobook.toml")))
    result = batchtts.run(batchtts.Job(manifest=Path("m.csv"), out=Path("out"),
                                       defaults=batchtts.Defaults(model="openai/gpt-4o-mini-tts", voice="alloy")))
"""

__version__ = "0.1.0"

from .config import Defaults, Job, Provider, RetryPolicy, Timeouts, load_job
from .runner import RunResult, run

__all__ = ["Defaults", "Job", "Provider", "RetryPolicy", "RunResult", "Timeouts", "load_job", "run"]
