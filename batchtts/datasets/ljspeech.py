"""LJSpeech's layout, which most TTS recipes read as it is (Coqui's `ljspeech` formatter, ESPnet's
and NeMo's LJSpeech scripts, piper's preprocessing):

    wavs/NAME.wav         16-bit PCM, 22,050 Hz mono unless asked otherwise
    metadata.csv          NAME|text|normalized_text, no header, every split
    metadata_train.csv    the same, a file per split, when there are several

The format has no quoting: a `|` in a text becomes a space, and so does a line break, so every line
has three fields. Without a normalized_text column in the manifest the text is given twice, as
LJSpeech's readers expect a third field.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import IO, Any

from .layout import Layout, Sample
from .sink import Sink


def plain(text: str) -> str:
    """The text on one line with no `|`: the field as LJSpeech's unquoted format can hold it."""
    return " ".join(text.replace("|", " ").split())


class LJSpeech(Layout):
    def __init__(self, sink: Sink) -> None:
        super().__init__(sink)
        self._files: dict[str, tuple[Path, IO[str], Any]] = {}  # by name: the local file and its csv writer

    def add(self, sample: Sample) -> None:
        self.sink.put_bytes(sample.audio.data, f"wavs/{sample.filename}")
        line = [sample.name, plain(sample.text), plain(sample.fields.get("normalized_text") or sample.text)]
        for name in ("metadata.csv", f"metadata_{sample.split}.csv"):
            self._writer(name).writerow(line)

    def close(self) -> list[str]:
        splits = [name for name in self._files if name != "metadata.csv"]
        for name, (local, f, _) in self._files.items():
            f.close()
            if name == "metadata.csv" or len(splits) > 1:  # one split's file would repeat metadata.csv
                self.sink.put(local, name)
        return list(self._files) if len(splits) > 1 else ["metadata.csv"]

    def _writer(self, name: str) -> Any:
        if name not in self._files:
            local = self.sink.scratch(".csv")
            f = open(local, "w", encoding="utf-8", newline="")
            self._files[name] = (local, f, csv.writer(f, delimiter="|", quoting=csv.QUOTE_NONE, quotechar=None,
                                                      lineterminator="\n"))
        return self._files[name][2]
