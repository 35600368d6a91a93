"""Arrow IPC shards: one schema shared by writer, reader and verify.

A shard is an Arrow IPC file (zstd-compressed buffers), one row per sample. Teacher
targets and attention summaries are codec blobs (see docs/FORMAT.md); token ids and
target positions are plain Arrow lists. A shard is written under a temporary name
and renamed when complete, so a reader never sees half a shard.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

FORMAT_VERSION = 1
TMP_SUFFIX = ".tmp"

SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # the model that produced the targets
        pa.field("domain", pa.string(), nullable=True),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),  # [T]
        pa.field("target_positions", pa.list_(pa.int32()), nullable=False),  # [P]
        pa.field("targets", pa.binary(), nullable=False),  # codec block: top-k or sampled
        pa.field("attention", pa.list_(pa.binary()), nullable=True),  # one top-k block per layer
    ]
)


class ShardError(ValueError):
    """A shard that does not match what the manifest and schema promise."""


def shard_name(worker: int, index: int) -> str:
    """The one place shard file names are made."""
    return f"shard-w{worker:05d}-{index:06d}.arrow"


@dataclass(frozen=True)
class ShardInfo:
    name: str
    rows: int
    bytes: int
    sha256: str
    tokens: int
    target_positions: int
    truncated: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Row:
    sample_id: str
    source: str
    domain: str | None
    input_ids: np.ndarray  # int64 [T]
    target_positions: np.ndarray  # int64 [P]
    targets: bytes
    attention: list[bytes] | None
    truncated: bool = False


class ShardWriter:
    """Buffers rows, writes one shard atomically; `finalize()` returns its ShardInfo."""

    def __init__(self, directory: Path, name: str, metadata: dict, batch_rows: int = 64) -> None:
        self.path = directory / name
        self.tmp = directory / (name + TMP_SUFFIX)
        self.batch_rows = batch_rows
        self.schema = SCHEMA.with_metadata({"teacher_cache": json.dumps(metadata, sort_keys=True)})
        self._sink = pa.OSFile(str(self.tmp), "wb")
        options = pa.ipc.IpcWriteOptions(compression="zstd")
        self._writer = pa.ipc.new_file(self._sink, self.schema, options=options)
        self._rows: list[Row] = []
        self.rows = self.tokens = self.targets = self.truncated = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def write(self, row: Row) -> None:
        self._rows.append(row)
        self.rows += 1
        self.tokens += len(row.input_ids)
        self.targets += len(row.target_positions)
        self.truncated += int(row.truncated)
        if len(self._rows) >= self.batch_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        rows, self._rows = self._rows, []
        columns = {
            "sample_id": [r.sample_id for r in rows],
            "source": [r.source for r in rows],
            "domain": [r.domain for r in rows],
            "input_ids": [r.input_ids.astype(np.int32) for r in rows],
            "target_positions": [r.target_positions.astype(np.int32) for r in rows],
            "targets": [r.targets for r in rows],
            "attention": [r.attention for r in rows],
        }
        self._writer.write_batch(pa.record_batch(columns, schema=self.schema))

    def finalize(self) -> ShardInfo:
        """Flush, fsync, rename into place; the shard is durable when this returns."""
        self._flush()
        self._writer.close()
        self._sink.close()
        with open(self.tmp, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)
        _fsync_dir(self.path.parent)
        return ShardInfo(
            name=self.path.name,
            rows=self.rows,
            bytes=self.path.stat().st_size,
            sha256="sha256:" + digest,
            tokens=self.tokens,
            target_positions=self.targets,
            truncated=self.truncated,
        )

    def abort(self) -> None:
        try:
            self._writer.close()
            self._sink.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_shard_table(data: bytes, name: str) -> pa.Table:
    """Open a shard's bytes and check its schema; ShardError names the shard otherwise."""
    try:
        reader = pa.ipc.open_file(pa.BufferReader(data))
        schema = reader.schema
        if not schema.remove_metadata().equals(SCHEMA):
            raise ShardError(f"{name}: schema differs from format v{FORMAT_VERSION}: {schema.remove_metadata()}")
        return reader.read_all()
    except pa.ArrowException as e:
        raise ShardError(f"{name}: not a readable Arrow shard ({e})") from None


def shard_metadata(table: pa.Table, name: str) -> dict:
    raw = (table.schema.metadata or {}).get(b"teacher_cache")
    if raw is None:
        raise ShardError(f"{name}: no teacher_cache metadata in the schema")
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        raise ShardError(f"{name}: unreadable teacher_cache metadata") from None


def sha256_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
