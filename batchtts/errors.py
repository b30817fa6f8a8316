"""Every error batchtts raises, and the exit code each one means.

    BatchTTSError
    ├── UsageError                  exit 2: bad flags, job file or environment, nothing sent
    │   ├── MissingKeyError         the API key variable is unset
    │   └── ManifestError           the manifest is unreadable or has bad rows (carries the problems)
    │   └── LedgerError             the ledger cannot be used: not a ledger, damaged, read-only,
    │                               or unwritable mid-run (then the run halts, exit 6)
    ├── FolderLockedError           exit 75: another run holds the output folder
    ├── HaltError                   exit 6: the machine cannot go on (disk full, ledger unwritable):
    │                               rows in flight settle, what finished is recorded, rerun resumes
    └── SpeechError                 one attempt at one row went wrong (carries status and message)
        ├── TransportError          no usable answer: connection refused, dropped or timed out,
        │   │                       a body cut short, a 200 that is not audio
        │   ├── NoAnswerError       not even a status line: refused, no such host, timed out
        │   └── UnreachableError    no answer at all, again and again across rows (refused, no
        │                           such host, every request timing out): exit 3, check the URL
        ├── RejectedError           the row can never succeed as asked, though no HTTP status
        │                           said so: an unknown local voice, audio of the wrong kind
        ├── StorageError            the audio was made but could not be stored (an object store
        │                           upload failed, a folder stands where the file goes): not
        │                           retried at once, so the audio is not bought twice in a row;
        │                           the next run tries the row again
        ├── UnexpectedError         any other exception in one row's work: recorded against the
        │                           row with its type, the run goes on, the next run retries it
        └── HTTPStatusError         the provider answered with an error status (and maybe a wait)
            └── ProviderStopError   401, 402, or a 404 from no API at all (a wrong base URL): no row
                │                   can succeed until the user acts, exit 3
                └── RateLimitStopError  a 429 whose wait is longer than --max-wait, or a spent
                                    quota: the rows are left for a run after the reset, exit 3

Whether a SpeechError is worth another attempt is the retry policy's call (`retry.py`), not the
error's. Budget caps and `--max-runtime` are not errors: they end a run early with their own exit
codes (4 and 5), and the next run continues. Row-level errors never escape the runner as tracebacks:
any exception in one row's work, expected or not, is recorded against that row and the run goes on.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

EXIT_OK = 0
EXIT_FAILED_ROWS = 1
EXIT_USAGE = 2
EXIT_PROVIDER_STOP = 3
EXIT_BUDGET = 4
EXIT_MAX_RUNTIME = 5
EXIT_HALTED = 6
EXIT_INTERNAL = 70  # a fault in batchtts itself (sysexits EX_SOFTWARE)
EXIT_LOCKED = 75
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class BatchTTSError(Exception):
    exit_code = EXIT_USAGE


class UsageError(BatchTTSError):
    exit_code = EXIT_USAGE


class MissingKeyError(UsageError):
    def __init__(self, env_var: str) -> None:
        super().__init__(
            f"no API key: set the {env_var} environment variable "
            f"(or name another variable with api_key_env in the job file)"
        )
        self.env_var = env_var


@dataclass(frozen=True)
class ManifestProblem:
    row: int | None
    message: str
    id: str | None = None

    def __str__(self) -> str:
        where = "manifest" if self.row is None else f"row {self.row}"
        if self.id:
            where += f" (id {self.id!r})"
        return f"{where}: {self.message}"


class ManifestError(UsageError):
    """Raised before anything is sent, so a bad manifest never costs a request."""

    shown = 20

    def __init__(self, path: str, problems: list[ManifestProblem], total: int | None = None) -> None:
        self.path = path
        self.problems = problems[: self.shown]
        self.total = len(problems) if total is None else total
        lines = [f"{path}: {self.total} problem{'s' if self.total != 1 else ''} in the manifest"]
        lines += [f"  {p}" for p in self.problems]
        if self.total > len(self.problems):
            lines.append(f"  ... and {self.total - len(self.problems)} more")
        super().__init__("\n".join(lines))


class LedgerError(UsageError):
    pass


class FolderLockedError(BatchTTSError):
    exit_code = EXIT_LOCKED


class HaltError(BatchTTSError):
    """A fault of this machine, not of one row: every row would meet it, so the run stops."""

    exit_code = EXIT_HALTED


class SpeechError(BatchTTSError):
    """One attempt at one row failed; `status` is None for transport faults."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return self.message if self.status is None else f"HTTP {self.status}: {self.message}"


class TransportError(SpeechError):
    pass


class NoAnswerError(TransportError):
    pass


class RejectedError(SpeechError):
    pass


class StorageError(SpeechError):
    pass


class UnexpectedError(SpeechError):
    pass


@dataclass(frozen=True)
class RateHint:
    """What a rate-limited answer said of when to come back. `exact` when the wait came from
    X-RateLimit-Reset (epoch milliseconds) rather than a Retry-After rounded up to whole seconds."""

    wait: float | None = None
    exact: bool = False
    limit: int | None = None
    remaining: int | None = None


class HTTPStatusError(SpeechError):
    """`retry_after` is the wait in seconds the provider asked for, if it named one; `hint`, all it
    said of its rate limit."""

    def __init__(self, message: str, status: int, retry_after: float | None = None,
                 hint: RateHint | None = None) -> None:
        super().__init__(message, status)
        self.hint = hint if hint is not None else RateHint(wait=retry_after)
        self.retry_after = self.hint.wait


class RunStop:
    """A fault that no row can get past until the user acts, or time passes: the run stops taking
    rows, keeps what it has, and exits 3 with `advice`."""

    @property
    def advice(self) -> str:
        """What the user should do; each kind of stop says."""
        raise NotImplementedError


class ProviderStopError(HTTPStatusError, RunStop):
    exit_code = EXIT_PROVIDER_STOP

    @property
    def advice(self) -> str:
        if self.status == 402:
            return "the account is out of credits: add credits, then run the same command again to resume"
        if self.status == 404:
            return ("check the base URL (--base-url, or base_url under [provider]): it ends in /api/v1 for "
                    "OpenRouter; then run the same command again to resume")
        return "the provider refused the API key: check the key, then run the same command again to resume"


class RateLimitStopError(ProviderStopError):
    """`resets_at` is when the provider said the limit resets (epoch seconds), if it said."""

    def __init__(self, message: str, resets_at: float | None) -> None:
        super().__init__(message, 429)
        self.resets_at = resets_at

    @property
    def advice(self) -> str:
        if self.resets_at is None:
            return "the rows left are pending: run the same command again once the provider's limit resets"
        when = datetime.fromtimestamp(self.resets_at).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
        return f"the rows left are pending: run the same command again after {when}, when the limit resets"


class UnreachableError(TransportError, RunStop):
    exit_code = EXIT_PROVIDER_STOP

    @property
    def advice(self) -> str:
        return ("check the base URL (--base-url, or base_url under [provider]) and the network, then run the same "
                "command again to resume")
