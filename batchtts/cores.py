"""The CPUs this process may run on: mastering, QC, the word error rate's recognisers and a
dataset's conversions each work on that many files at once."""

from __future__ import annotations

import os


def cpus() -> int:
    """The CPUs of this process's affinity (a container or `taskset` may give it fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
