"""WebDataset's layout: tar shards of about 1 GB (or as many rows as asked), a split's samples in
manifest order,

    train-000000.tar, train-000001.tar, ...    NAME.flac and NAME.json, one after the other
    validation-000000.tar, ...

where a sample is the files that share a name up to the first '.' (names have none of their own):
the audio, and the JSON of what is said in it (id, text, normalized_text, speaker, duration,
sample_rate and the manifest's other columns). A shard is put in place whole, once full: a reader
given `train-{000000..000041}.tar` reads complete tars only.
"""

from __future__ import annotations

import json

from .layout import Layout, Sample, ShardSize, TarShards
from .sink import Sink


class WebDataset(Layout):
    def __init__(self, sink: Sink, shard_size: ShardSize, mtime: int) -> None:
        super().__init__(sink)
        self.shard_size, self.mtime = shard_size, mtime
        self._tars: dict[str, TarShards] = {}

    def add(self, sample: Sample) -> None:
        if sample.split not in self._tars:
            split = sample.split
            self._tars[split] = TarShards(self.sink, lambda i: f"{split}-{i:06d}.tar", self.shard_size, self.mtime)
        said = json.dumps(sample.fields, ensure_ascii=False, default=str).encode()
        self._tars[sample.split].add([(sample.filename, sample.audio.data), (f"{sample.name}.json", said)])

    def close(self) -> list[str]:
        named: list[str] = []
        for split, tars in self._tars.items():
            count = tars.close()
            named.append(f"{split}-{{000000..{count - 1:06d}}}.tar")
        return named
