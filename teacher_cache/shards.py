"""Arrow IPC shards: one schema shared by writer, reader and verify.

A shard is an Arrow IPC file (zstd-compressed buffers), one row per sample. Teacher
targets and attention summaries are codec blobs (see docs/FORMAT.md); token ids and
target positions are plain Arrow lists. A shard is written to a spool file (a temporary name beside it
locally, a temporary local file for object stores) and published whole when
complete, so a reader never sees half a shard. The writer records the shard's
sha256 and a sha256 per CHUNK_BYTES of it, so a reader can check bytes as they
stream in instead of downloading a whole shard first.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from teacher_cache.errors import one_line, parse_json
from teacher_cache.storage import Location, StorageError

FORMAT_VERSION = 1
TMP_SUFFIX = ".tmp"
MAX_SHARD_BYTES = 4 << 30  # readers refuse a bigger shard; the writer stops before it
CHUNK_BYTES = 1 << 20  # a reader checks (and can use) a shard one chunk of this many bytes at a time
MAX_SCHEMA_BYTES = 1 << 20  # a shard's schema message (its metadata included; ours take ~1 KB)
MAX_BATCH_BYTES = 1 << 30  # a record batch declaring more bytes once decompressed is refused unread

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


SHARD_RE = re.compile(r"shard-w[0-9]{5}-[0-9]{6}\.arrow\Z")  # what shard_name makes; manifests may name nothing else
SHARD_GLOB = "shard-*.arrow"


def shard_name(worker: int, index: int) -> str:
    """The one place shard file names are made."""
    return f"shard-w{worker:05d}-{index:06d}.arrow"


def worker_glob(worker: int) -> str:
    """The finished shards of one worker (shard_name's pattern)."""
    return f"shard-w{worker:05d}-*.arrow"


def spool_glob(worker: int) -> str:
    """Half-written shards of one worker (shard_name + TMP_SUFFIX), as a killed run leaves them."""
    return f"shard-w{worker:05d}-*{TMP_SUFFIX}"


def is_cache_file(name: str) -> bool:
    """A name a cache folder may hold: parts/, manifest.json, shards, and what a killed writer
    leaves (half-written *.tmp files, dot-files)."""
    return name in ("parts", "manifest.json") or name.startswith(("shard-", ".")) or name.endswith(".tmp")


@dataclass(frozen=True)
class ShardInfo:
    """What finalize() returns for the manifest: a shard's name, counts, size and checksums."""

    name: str
    rows: int
    bytes: int
    sha256: str  # "sha256:<hex>" of the whole file
    tokens: int
    target_positions: int
    truncated: int
    chunks: dict  # {"size": bytes per chunk, "sha256": [hex of each chunk_bytes piece, in order]}

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Row:
    """One sample as a shard stores it: ids, target positions and the codec blobs."""

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

    def __init__(
        self, where: Location, name: str, metadata: dict, batch_rows: int = 64, chunk_bytes: int = CHUNK_BYTES
    ) -> None:
        self.where, self.name = where, name
        self.tmp = where.spool_path(name, TMP_SUFFIX)
        self.batch_rows, self.chunk_bytes = batch_rows, chunk_bytes
        self.schema = SCHEMA.with_metadata({"teacher_cache": json.dumps(metadata, sort_keys=True)})
        self._sink = pa.OSFile(str(self.tmp), "wb")
        options = pa.ipc.IpcWriteOptions(compression="zstd")
        self._writer = pa.ipc.new_file(self._sink, self.schema, options=options)
        self._rows: list[Row] = []
        self._buffered = 0  # approximate bytes of the rows not yet written
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
        self._buffered += 4 * (len(row.input_ids) + len(row.target_positions)) + len(row.targets)
        self._buffered += sum(len(a) for a in row.attention or ())
        # a record batch is what a streaming reader decodes at once: keep it near one chunk
        if len(self._rows) >= self.batch_rows or self._buffered >= self.chunk_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        rows, self._rows, self._buffered = self._rows, [], 0
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
        if self._sink.tell() > MAX_SHARD_BYTES:  # raised inside `with`: the temp file is removed
            raise ShardError(
                f"{self.name}: over {MAX_SHARD_BYTES} bytes, more than a reader accepts: use a smaller --shard-size"
            )

    def finalize(self) -> ShardInfo:
        """Flush, checksum, publish; the shard is durable (or uploaded) when this returns."""
        self._flush()
        self._writer.close()
        self._sink.close()
        with open(self.tmp, "rb") as f:
            digests = checksums(iter(lambda: f.read(self.chunk_bytes), b""), self.chunk_bytes)
        self.where.publish(self.tmp, self.name)
        return ShardInfo(
            name=self.name,
            rows=self.rows,
            tokens=self.tokens,
            target_positions=self.targets,
            truncated=self.truncated,
            **digests,
        )

    def abort(self) -> None:
        try:
            self._writer.close()
            self._sink.close()
        except (pa.ArrowException, OSError):
            pass  # already closed, or the disk that failed the write fails the close too
        finally:
            self.tmp.unlink(missing_ok=True)


ARROW_MAGIC = b"ARROW1\x00\x00"  # an Arrow IPC file: this, the IPC stream, the footer, "ARROW1"
MAX_CHUNK_BYTES = 64 << 20  # a manifest declaring bigger chunks is refused
MIN_CHUNK_BYTES = 4096  # or smaller ones: one read and one sha256 per chunk


class _CheckedReader:
    """File-like over a shard's chunks that hands out only bytes whose sha256 matched."""

    def __init__(self, chunks: Iterator[bytes], sizes: list[int], hashes: list[str], name: str) -> None:
        self._chunks, self._sizes, self._hashes, self.name = chunks, sizes, hashes, name
        self._buf, self._pos, self._index = b"", 0, 0
        self.whole = hashlib.sha256()
        self.closed = False

    def _next_chunk(self) -> bool:
        i = self._index
        if i == len(self._hashes):
            return False
        data = next(self._chunks)  # a failed fetch raises StorageError (Location.read_ranges)
        if len(data) != self._sizes[i] or hashlib.sha256(data).hexdigest() != self._hashes[i]:
            where = f" in chunk {i} of {len(self._hashes)}" if len(self._hashes) > 1 else ""
            raise ShardError(f"{self.name}: sha256 mismatch{where} (corrupted, truncated or replaced shard)")
        self.whole.update(data)
        self._buf, self._pos, self._index = data, 0, i + 1
        return True

    def read(self, n: int = -1) -> bytes:
        out = []
        want = n if n is not None and n >= 0 else float("inf")
        while want > 0:
            if self._pos == len(self._buf) and not self._next_chunk():
                break
            take = self._buf[self._pos : self._pos + int(min(want, len(self._buf) - self._pos))]
            self._pos += len(take)
            want -= len(take)
            out.append(take)
        return b"".join(out)

    def unread(self, data: bytes) -> None:
        """Put bytes just read back in front (already checked: they came from read)."""
        self._buf, self._pos = data + self._buf[self._pos :], 0

    def drain(self) -> None:
        while self._next_chunk():
            pass

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True


def chunk_plan(entry: dict, name: str) -> tuple[list[tuple[int, int]], list[str]]:
    """Byte ranges and sha256 (hex) of a shard's chunks, from its manifest entry.

    An entry without "chunks" (older writers) is one chunk: the whole shard, checked
    against its sha256 before any of it is used.
    """
    size = entry["bytes"]
    chunks = entry.get("chunks")
    if not chunks:
        return [(0, size)], [entry["sha256"].removeprefix("sha256:")]
    step = chunks["size"]
    ranges = [(start, min(start + step, size)) for start in range(0, size, step)] or [(0, 0)]
    if len(ranges) != len(chunks["sha256"]):
        raise ShardError(f"{name}: manifest lists {len(chunks['sha256'])} chunk hashes for {len(ranges)} chunks")
    return ranges, list(chunks["sha256"])


class ShardStream:
    """A shard's record batches, decoded as its verified chunks arrive (no whole-shard download).

    `schema` is read (and checked) on construction; iterate for record batches; when the
    iteration ends the whole shard's sha256 and size have been checked too.
    """

    def __init__(self, where: Location, entry: dict, row_bytes: int | None = None) -> None:
        """`row_bytes`: the most bytes one row may take decompressed (from the manifest's settings);
        a record batch declaring more for its rows is refused before it is decompressed."""
        # errors name the shard with its cache's location: every cache has a shard-w00000-000000.arrow
        self.name = name = where.describe(entry["name"])
        self._row_bytes = row_bytes
        ranges, hashes = chunk_plan(entry, name)
        self._src = _CheckedReader(where.read_ranges(entry["name"], ranges), [e - s for s, e in ranges], hashes, name)
        self._entry = entry
        try:
            if self._src.read(len(ARROW_MAGIC)) != ARROW_MAGIC:
                raise ShardError(f"{name}: not an Arrow IPC file (bad magic)")
            self._check_schema_size(name)
            # message by message, so each batch's declared sizes are checked before Arrow decompresses it
            self._messages = pa.ipc.MessageReader.open_stream(self._src)
            first = self._messages.read_next_message()
            if first.type != "schema":
                raise ShardError(f"{name}: starts with a {first.type} message, not its schema")
            schema = pa.ipc.read_schema(first)
        except StorageError:
            raise
        except StopIteration:
            raise ShardError(f"{name}: no schema (empty Arrow stream)") from None
        except (pa.ArrowException, OSError) as e:  # pyarrow reports corrupt IPC data as OSError
            raise _unreadable(name, e) from None
        check_schema(schema, name)
        self.schema = schema

    def _check_schema_size(self, name: str) -> None:
        """Refuse a schema message whose declared length is past MAX_SCHEMA_BYTES before it is
        read: its metadata is free-form, and tens of MB of it expanded ~15x in memory."""
        prefix = self._src.read(8)  # [0xFFFFFFFF continuation] int32 metadata length (older streams: no marker)
        head = prefix[4:8] if prefix[:4] == b"\xff\xff\xff\xff" else prefix[:4]
        length = struct.unpack("<i", head)[0] if len(head) == 4 else 0
        if length > MAX_SCHEMA_BYTES:
            raise ShardError(f"{name}: a schema of {length} bytes, over the reader's limit of {MAX_SCHEMA_BYTES}")
        self._src.unread(prefix)

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        try:
            for message in self._messages:
                if message.type != "record batch":  # the format has no dictionaries
                    raise ShardError(f"{self.name}: unexpected {message.type} message")
                rows, size = batch_size(message, self.name)
                # a batch's own buffers (one offset per list column, even at 0 rows) on top of its rows'
                limit = (
                    MAX_BATCH_BYTES if self._row_bytes is None else min(MAX_BATCH_BYTES, rows * self._row_bytes + 4096)
                )
                if size > limit:
                    raise ShardError(
                        f"{self.name}: a record batch of {rows} rows declares {size} bytes decompressed, more "
                        f"than its rows can hold ({limit}); refused before decompressing"
                    )
                batch = pa.ipc.read_record_batch(message, self.schema)
                batch.validate(full=True)  # offsets in bounds, valid UTF-8: before any value is read
                _check_nulls(batch, self.name)
                yield batch
        except GeneratorExit:  # closed unfinished, maybe at interpreter exit when this module's names are gone
            raise
        except StorageError:
            raise
        except (pa.ArrowException, OSError) as e:
            raise _unreadable(self.name, e) from None
        self._src.drain()  # the footer: every byte is checked, not only the ones decoded
        if "sha256:" + self._src.whole.hexdigest() != self._entry["sha256"]:
            raise ShardError(f"{self.name}: sha256 mismatch (corrupted or replaced shard)")

    def read_all(self) -> pa.Table:
        return pa.Table.from_batches(list(self), schema=self.schema)


def batch_size(message: pa.ipc.Message, name: str) -> tuple[int, int]:
    """(rows, bytes once decompressed) a record batch message declares, read from its flatbuffer
    metadata (RecordBatch: length, buffers) and the 8-byte length that starts each compressed
    buffer of its body; ShardError if either is malformed."""
    meta, body = message.metadata.to_pybytes(), message.body
    try:
        header = _fb_field(meta, _fb_deref(meta, 0), 2)  # Message.header, the RecordBatch table
        batch = _fb_deref(meta, header)
        length = _fb_field(meta, batch, 0, optional=True)  # RecordBatch.length; absent = its default, 0
        rows = 0 if length is None else _fb_read(meta, "<q", length)
        buffers = _fb_deref(meta, _fb_field(meta, batch, 2))  # RecordBatch.buffers: [Buffer{offset, length}]
        compressed = _fb_field(meta, batch, 3, optional=True) is not None  # RecordBatch.compression
        size = 0
        for i in range(_fb_read(meta, "<I", buffers)):
            offset, length = struct.unpack_from("<qq", meta, _fb_check(meta, buffers + 4 + 16 * i, 16))
            if min(offset, length) < 0 or offset + length > body.size:
                raise ValueError("a buffer outside the message body")
            if compressed and length >= 8:
                declared = struct.unpack("<q", body.slice(offset, 8).to_pybytes())[0]  # -1: stored as is
                size += length - 8 if declared == -1 else declared
            else:
                size += length
        if rows < 0 or size < 0:
            raise ValueError("negative sizes")
    except (ValueError, struct.error) as e:
        raise ShardError(f"{name}: malformed record batch message ({e})") from None
    return rows, size


def _fb_check(buf: bytes, pos: int, size: int) -> int:
    if not 0 <= pos <= len(buf) - size:
        raise ValueError(f"offset {pos} outside the {len(buf)}-byte metadata")
    return pos


def _fb_read(buf: bytes, fmt: str, pos: int) -> int:
    return struct.unpack_from(fmt, buf, _fb_check(buf, pos, struct.calcsize(fmt)))[0]


def _fb_deref(buf: bytes, pos: int) -> int:
    """The position an offset field at `pos` points to (flatbuffers: uoffset relative to itself)."""
    return pos + _fb_read(buf, "<I", pos)


def _fb_field(buf: bytes, table: int, i: int, *, optional: bool = False) -> int | None:
    """Position of field i of the flatbuffer table at `table`; absent: None if optional, else an error."""
    vtable = table - _fb_read(buf, "<i", table)
    slot = 4 + 2 * i
    offset = _fb_read(buf, "<H", vtable + slot) if slot + 2 <= _fb_read(buf, "<H", vtable) else 0
    if offset:
        return table + offset
    if optional:
        return None
    raise ValueError(f"field {i} missing")


def _check_nulls(batch: pa.RecordBatch, name: str) -> None:
    """Arrow does not enforce a field's nullable=False: a null where the schema has none (a whole
    value, or an element of a list of ids or blocks) is refused here, naming the column."""
    for i, field in enumerate(SCHEMA):
        col = batch.column(i)
        if (not field.nullable and col.null_count) or (pa.types.is_list(field.type) and col.values.null_count):
            raise ShardError(f"{name}: column {field.name} holds nulls, which the format has none of")


def _unreadable(name: str, e: BaseException) -> ShardError:
    """Undecodable bytes that passed the checksums (a writer bug, or a crafted shard)."""
    return ShardError(f"{name}: not a readable Arrow shard ({one_line(e, 200)})")


def check_schema(schema: pa.Schema, name: str) -> None:
    """Raise ShardError unless `schema` (metadata aside) is the one shard schema."""
    got = schema.remove_metadata()
    if got.equals(SCHEMA):
        return
    for i, want in enumerate(SCHEMA):
        if i >= len(got) or not got.field(i).equals(want):
            seen = repr(str(got.field(i)))[:80] if i < len(got) else "missing"
            raise ShardError(
                f"{name}: schema differs from format v{FORMAT_VERSION}: column {i} is {seen}, expected {str(want)!r}"
            )
    raise ShardError(f"{name}: schema differs from format v{FORMAT_VERSION}: {len(got)} columns, not {len(SCHEMA)}")


def shard_metadata(schema: pa.Schema, name: str) -> dict:
    """The shard's teacher_cache metadata object (format version, config hash); ShardError if absent."""
    raw = (schema.metadata or {}).get(b"teacher_cache")
    if raw is None:
        raise ShardError(f"{name}: no teacher_cache metadata in the schema")
    try:
        meta = parse_json(raw)
    except ValueError:  # not JSON, not UTF-8, or nested too deeply
        meta = None
    if not isinstance(meta, dict):
        raise ShardError(f"{name}: unreadable teacher_cache metadata")
    return meta


def checksums(chunks: Iterable[bytes], chunk_bytes: int) -> dict:
    """Manifest fields for a file given as consecutive chunk_bytes-sized pieces: bytes, sha256, chunks."""
    whole, hashes, size = hashlib.sha256(), [], 0
    for chunk in chunks:
        whole.update(chunk)
        hashes.append(hashlib.sha256(chunk).hexdigest())
        size += len(chunk)
    return {"bytes": size, "sha256": "sha256:" + whole.hexdigest(), "chunks": {"size": chunk_bytes, "sha256": hashes}}


def checksums_of(data: bytes, chunk_bytes: int = CHUNK_BYTES) -> dict:
    return checksums((data[i : i + chunk_bytes] for i in range(0, len(data), chunk_bytes)), chunk_bytes)
