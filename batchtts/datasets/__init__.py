"""Speech datasets from a finished run, in the layouts trainers read: NeMo, LJSpeech, Hugging Face
`datasets` and WebDataset (`export.py`; a module a layout), with the audio in the trainer's shape
(`shape.py`, in worker processes for a large export: `convert.py`), rows split by key (`splits.py`),
written to a folder or an object store (`sink.py`).

The names are loaded when first used: a worker process that converts audio loads no more than that.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .export import DATASET_FORMATS, DatasetExport, export_dataset
    from .shape import AUDIO_FORMATS

_WHERE = {"DATASET_FORMATS": "export", "DatasetExport": "export", "export_dataset": "export", "AUDIO_FORMATS": "shape"}
__all__ = ["AUDIO_FORMATS", "DATASET_FORMATS", "DatasetExport", "export_dataset"]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
