"""NeMo's manifests: a JSON line per sample, `audio_filepath`, `duration` (seconds) and `text`, with
`normalized_text` and `speaker` (what its TTS datasets read) and the manifest's other columns; one
manifest a split.

    audio/NAME.wav                          every split's audio
    train_manifest.json                     audio_filepath relative to the manifest's folder,
    validation_manifest.json                which NeMo resolves against it

or, given a shard size, the tarred layout NeMo's `convert_to_tarred_audio_dataset.py` makes:

    train/audio_0.tar, audio_1.tar, ...     NAME.wav members, a shard's samples in manifest order
    train/tarred_audio_manifest.json        audio_filepath: the member's name; shard_id: its tar
    train/sharded_manifests/manifest_0.json the same lines, a file per tar

which a training config names as `tarred_audio_filepaths: train/audio__OP_0..N_CL_.tar` with
`manifest_filepath: train/tarred_audio_manifest.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

from .layout import Layout, Sample, ShardSize, TarShards
from .sink import Sink


def _line(entry: dict[str, Any]) -> str:
    return json.dumps(entry, ensure_ascii=False, default=str) + "\n"


class NeMo(Layout):
    def __init__(self, sink: Sink, shard_size: ShardSize | None, mtime: int) -> None:
        super().__init__(sink)
        self.shard_size, self.mtime = shard_size, mtime
        self._manifests: dict[str, tuple[Path, IO[str]]] = {}  # by split: the local file being written
        self._tars: dict[str, TarShards] = {}
        self._open_shard: dict[str, list[dict[str, Any]]] = {}  # by split: the lines of its tar being filled

    def add(self, sample: Sample) -> None:
        said = {name: value for name, value in sample.fields.items()
                if not (name == "normalized_text" and value is None)}  # NeMo reads a normalized_text it finds
        if self.shard_size is None:
            path = f"audio/{sample.filename}"
            self.sink.put_bytes(sample.audio.data, path)
            entry = {"audio_filepath": path, **said}
        else:
            shard = self._tar_of(sample.split).add([(sample.filename, sample.audio.data)])
            entry = {"audio_filepath": sample.filename, **said, "shard_id": shard}
            self._open_shard[sample.split].append(entry)
        self._manifest(sample.split).write(_line(entry))

    def close(self) -> list[str]:
        named: list[str] = []
        for split, tars in self._tars.items():
            count = tars.close()
            named.append(f"{split}/audio_{{0..{count - 1}}}.tar")
        for split, (local, f) in self._manifests.items():
            f.close()
            path = self._manifest_path(split)
            self.sink.put(local, path)
            named.append(path)
        return named

    def _manifest_path(self, split: str) -> str:
        return f"{split}_manifest.json" if self.shard_size is None else f"{split}/tarred_audio_manifest.json"

    def _manifest(self, split: str) -> IO[str]:
        if split not in self._manifests:
            local = self.sink.scratch(".json")
            self._manifests[split] = (local, open(local, "w", encoding="utf-8"))
        return self._manifests[split][1]

    def _tar_of(self, split: str) -> TarShards:
        if split not in self._tars:
            assert self.shard_size is not None
            self._open_shard[split] = []
            self._tars[split] = TarShards(self.sink, lambda i: f"{split}/audio_{i}.tar", self.shard_size, self.mtime,
                                          lambda i: self._shard_manifest(split, i))
        return self._tars[split]

    def _shard_manifest(self, split: str, shard: int) -> None:
        """The lines of a tar just put in place, in a manifest of its own."""
        lines, self._open_shard[split] = self._open_shard[split], []
        self.sink.put_bytes("".join(map(_line, lines)).encode(), f"{split}/sharded_manifests/manifest_{shard}.json")
