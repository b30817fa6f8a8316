"""Hugging Face `datasets`' layout, as `push_to_hub` writes it: Parquet shards of about 500 MB,

    data/train-00000-of-00004.parquet ... data/validation-00000-of-00001.parquet

whose `audio` column is a struct of the file's `bytes` and its `path` (a name: the bytes are the
file), with `datasets`' features in the schema's metadata (the `huggingface` key, as `datasets`
writes it): `audio` is an `Audio` feature, so `load_dataset("parquet", data_files=...)` (or
`load_dataset(FOLDER)`, which finds the splits by the file names) decodes it on access, with no cast.

Rows are written in row groups of 100, as `datasets` writes audio (a reader holds one group at a
time), so an export holds at most a group a split in memory. A shard's name says how many shards its
split has, which is known at the end: shards are kept under a staging name until then.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import UsageError
from .layout import Layout, Sample, ShardSize
from .shape import Shape
from .sink import Sink

_GROUP_ROWS = 100
_GROUP_BYTES = 64 * 1024 * 1024
_AUDIO = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_OWN: dict[str, pa.DataType] = {"id": pa.string(), "text": pa.string(), "normalized_text": pa.string(), "speaker": pa.string(),
        "duration": pa.float64(), "sample_rate": pa.int64()}
_FLOATS = {"halffloat": "float16", "float": "float32", "double": "float64"}


def _dtype(kind: pa.DataType) -> str | None:
    """The name `datasets`' Value feature gives an Arrow type; None for one it would need more than a Value for."""
    if pa.types.is_integer(kind) or pa.types.is_boolean(kind) or pa.types.is_string(kind) \
            or pa.types.is_large_string(kind):
        return str(kind)
    return _FLOATS.get(str(kind)) if pa.types.is_floating(kind) else None


@dataclass
class _Split:
    """A split's rows waiting for their row group, the shard being filled, and the shards done."""

    waiting: list[dict[str, Any]] = field(default_factory=list)
    waiting_bytes: int = 0
    writer: pq.ParquetWriter | None = None
    local: Path | None = None
    rows: int = 0
    bytes: int = 0
    staged: list[str] = field(default_factory=list)


class HuggingFace(Layout):
    def __init__(self, sink: Sink, shard_size: ShardSize, shape: Shape) -> None:
        super().__init__(sink)
        self.shard_size, self.shape = shard_size, shape
        self._schema: pa.Schema | None = None
        self._splits: dict[str, _Split] = {}

    def add(self, sample: Sample) -> None:
        split = self._splits.setdefault(sample.split, _Split())
        split.waiting.append({"audio": {"bytes": sample.audio.data, "path": sample.filename}, **sample.fields})
        split.waiting_bytes += len(sample.audio.data)
        if self.shard_size.full(split.rows + len(split.waiting), split.bytes + split.waiting_bytes):
            self._write(split)
            self._finish(split)
        elif len(split.waiting) >= _GROUP_ROWS or split.waiting_bytes >= _GROUP_BYTES:
            self._write(split)

    def close(self) -> list[str]:
        named: list[str] = []
        for name, split in self._splits.items():
            self._write(split)
            self._finish(split)
            for number, staged in enumerate(split.staged):
                self.sink.publish(staged, f"data/{name}-{number:05d}-of-{len(split.staged):05d}.parquet")
            named.append(f"data/{name}-*.parquet")
        return named

    def _write(self, split: _Split) -> None:
        """The waiting rows as one row group of the split's open shard."""
        if not split.waiting:
            return
        if self._schema is None:
            self._schema = self._schema_of(split.waiting)
        rows = [{name: _cell(row.get(name), kind) for name, kind in zip(self._schema.names, self._schema.types,
                                                                       strict=True)} for row in split.waiting]
        try:
            table = pa.Table.from_pylist(rows, schema=self._schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise UsageError(f"a manifest column changes type down the manifest ({exc}): the Parquet shards take "
                             "one type a column") from exc
        if split.writer is None:
            split.local = self.sink.scratch(".parquet")
            others = [name for name in self._schema.names if name != "audio"]  # no dictionary or min/max of audio
            split.writer = pq.ParquetWriter(split.local, self._schema, write_statistics=others,
                                            use_dictionary=others)  # type: ignore[arg-type]  # the stubs say bool: it takes names too
        split.writer.write_table(table, row_group_size=len(rows))
        split.rows += len(rows)
        split.bytes += split.waiting_bytes
        split.waiting, split.waiting_bytes = [], 0

    def _finish(self, split: _Split) -> None:
        """Close the split's open shard and keep it under its staging name."""
        if split.writer is None:
            return
        assert split.local is not None
        split.writer.close()
        split.staged.append(self.sink.stage(split.local))
        split.writer, split.local, split.rows, split.bytes = None, None, 0, 0

    def _schema_of(self, rows: list[dict[str, Any]]) -> pa.Schema:
        """Our columns' types, and the manifest's columns' as the first rows have them (a column
        `datasets` could not type as a Value, or of no value yet, is text; a list or a mapping is
        kept as its JSON); with the features in the metadata."""
        inferred = pa.Table.from_pylist([{k: v for k, v in row.items() if k != "audio"} for row in rows]).schema
        fields: list[pa.Field[Any]] = [pa.field("audio", _AUDIO)]
        features: dict[str, Any] = {"audio": self._audio_feature()}
        for column in map(inferred.field, range(len(inferred))):
            kind = _OWN.get(column.name) or (column.type if _dtype(column.type) else pa.string())
            fields.append(pa.field(column.name, kind))
            features[column.name] = {"dtype": _dtype(kind), "_type": "Value"}
        metadata: dict[bytes | str, bytes | str] = {"huggingface": json.dumps({"info": {"features": features}})}
        return pa.schema(fields, metadata=metadata)

    def _audio_feature(self) -> dict[str, Any]:
        """Decoded as the files are: they are in the shape asked for already (`mono` would have
        `datasets` mix down what was exported in stereo, with librosa, on every read)."""
        feature: dict[str, Any] = {"_type": "Audio", "mono": False}
        if self.shape.rate is not None:
            feature["sampling_rate"] = self.shape.rate
        return feature


def _cell(value: Any, kind: pa.DataType) -> Any:
    """A value as its column holds it: text columns take lists, mappings and numbers as JSON."""
    if value is None or not pa.types.is_string(kind) or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)
