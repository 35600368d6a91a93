"""Shard writer and checked streaming reader: real Arrow IPC files in tmp_path.

Rows carry real codec blocks where their content matters and plain bytes of a chosen size where
only the size does (the shard layer stores blocks as opaque binary)."""

from __future__ import annotations

import fnmatch
import hashlib

import numpy as np
import pyarrow as pa
import pytest

from teacher_cache import codec
from teacher_cache.shards import (
    CHUNK_BYTES,
    SCHEMA,
    SHARD_RE,
    TMP_SUFFIX,
    Row,
    ShardError,
    ShardStream,
    ShardWriter,
    check_schema,
    checksums_of,
    is_cache_file,
    shard_metadata,
    shard_name,
    spool_glob,
)
from teacher_cache.storage import as_location

NAME = shard_name(0, 0)
META = {"format_version": 1, "config_hash": "sha256:" + "ab" * 32, "shard": NAME}


def topk_row(i: int, T: int = 24, truncated: bool = False) -> Row:
    """A sample of T tokens with top-4 targets at its last T // 2 positions."""
    rng = np.random.default_rng(i)
    positions = np.arange(T - 1 - T // 2, T - 1)  # [P]
    P = len(positions)
    ids = np.stack([rng.choice(32000, 4, replace=False) for _ in range(P)])  # [P, 4]
    lps = np.sort(-rng.exponential(2.0, (P, 4)), axis=1)[:, ::-1].astype(np.float32)  # [P, 4]
    blob = codec.encode_topk(ids, np.ascontiguousarray(lps), np.full(P, -2.0, np.float32), vocab_size=32000)
    domain = "math" if i % 2 else None
    return Row(f"s{i}", "tiny", domain, rng.integers(0, 32000, T), positions, blob, None, truncated)


def sized_row(i: int, targets: int = 16, attention: int | None = None) -> Row:
    """A row whose targets (and attention) blobs are incompressible bytes of the given sizes."""
    rng = np.random.default_rng(i)
    att = None if attention is None else [rng.bytes(attention)]
    return Row(f"s{i}", "tiny", None, np.arange(8), np.arange(4), rng.bytes(targets), att)


def write(tmp_path, rows: list[Row], **kw):
    with ShardWriter(as_location(tmp_path), NAME, META, **kw) as w:
        for r in rows:
            w.write(r)
        return w.finalize()


def batch_rows(tmp_path) -> list[int]:
    f = pa.ipc.open_file(pa.BufferReader((tmp_path / NAME).read_bytes()))
    return [f.get_batch(i).num_rows for i in range(f.num_record_batches)]


def entry(tmp_path, info) -> dict:
    return {"name": NAME, **info.to_dict()}


def test_finalize_describes_the_published_file(tmp_path):
    """finalize() returns the manifest entry: counts over the rows and the sha256 of the file and
    of each chunk_bytes piece of it; the shard is under its name, no spool is left."""
    rows = [topk_row(i, T=20 + i, truncated=i % 3 == 0) for i in range(40)]
    info = write(tmp_path, rows, chunk_bytes=4096)
    data = (tmp_path / NAME).read_bytes()
    assert len(data) > 3 * 4096  # several chunks
    assert info.to_dict() == {
        "name": NAME,
        "rows": 40,
        "tokens": sum(len(r.input_ids) for r in rows),
        "target_positions": sum(len(r.target_positions) for r in rows),
        "truncated": 14,
        **checksums_of(data, 4096),
    }
    assert info.chunks["size"] == 4096 and len(info.chunks["sha256"]) == -(-len(data) // 4096)
    assert [p.name for p in tmp_path.iterdir()] == [NAME]
    schema = pa.ipc.open_file(pa.BufferReader(data)).schema
    check_schema(schema, NAME)
    assert shard_metadata(schema, NAME) == META


def test_checksums_hash_each_chunk_and_count_every_byte():
    data = bytes(range(256)) * 10  # 2560 bytes: two full chunks of 1000 and a last one of 560
    want = [hashlib.sha256(data[s : s + 1000]).hexdigest() for s in (0, 1000, 2000)]
    assert checksums_of(data, 1000) == {
        "bytes": 2560,
        "sha256": "sha256:" + hashlib.sha256(data).hexdigest(),
        "chunks": {"size": 1000, "sha256": want},
    }
    assert checksums_of(data)["chunks"] == {"size": CHUNK_BYTES, "sha256": [hashlib.sha256(data).hexdigest()]}


def test_record_batches_hold_at_most_batch_rows_and_about_one_chunk(tmp_path):
    """docs/FORMAT.md: batches of at most 64 rows and about one chunk of data, so a streaming
    reader can decode each as soon as its chunks are in. Attention blocks count like targets."""
    write(tmp_path, [sized_row(i) for i in range(130)])
    assert batch_rows(tmp_path) == [64, 64, 2]
    write(tmp_path, [sized_row(i, targets=3000) for i in range(10)], chunk_bytes=8192)
    assert batch_rows(tmp_path) == [3, 3, 3, 1]  # ~3050 bytes a row: a batch closes at >= 8192
    write(tmp_path, [sized_row(i, attention=3000) for i in range(10)], chunk_bytes=8192)
    assert batch_rows(tmp_path) == [3, 3, 3, 1]


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="teacher died"), ShardWriter(as_location(tmp_path), NAME, META) as w:
        w.write(topk_row(0))
        raise RuntimeError("teacher died")
    assert list(tmp_path.iterdir()) == []


def test_the_writer_stops_before_a_shard_readers_would_refuse(tmp_path, monkeypatch):
    """Readers refuse shards over MAX_SHARD_BYTES (4 GiB; 64 KiB here): the writer stops at that
    size with a one-line error naming the fix, and leaves no file."""
    import teacher_cache.shards

    monkeypatch.setattr(teacher_cache.shards, "MAX_SHARD_BYTES", 64 << 10)
    with pytest.raises(ShardError, match=f"{NAME}: over 65536 bytes, .*use a smaller --shard-size"):
        write(tmp_path, [sized_row(i, targets=16 << 10) for i in range(8)], batch_rows=1)
    assert list(tmp_path.iterdir()) == []
    write(tmp_path, [sized_row(i, targets=16 << 10) for i in range(2)], batch_rows=1)  # under it: written


def test_stream_reads_every_row_of_a_shard_in_many_chunks(tmp_path):
    """Chunks of 256 bytes: the footer lies in chunks the IPC stream never asks for, and the
    reader still fetches and checks them (the whole file's sha256 is checked at the end)."""
    rows = [topk_row(i) for i in range(20)]
    info = write(tmp_path, rows, chunk_bytes=256)
    table = ShardStream(as_location(tmp_path), entry(tmp_path, info)).read_all()
    assert table.column("sample_id").to_pylist() == [r.sample_id for r in rows]
    assert table.column("targets").to_pylist() == [r.targets for r in rows]
    assert [np.array(x).tolist() for x in table.column("input_ids").to_pylist()] == [r.input_ids.tolist() for r in rows]


def test_a_corrupted_chunk_is_refused_before_arrow_reads_it(tmp_path):
    info = write(tmp_path, [topk_row(i) for i in range(20)], chunk_bytes=1024)
    path = tmp_path / NAME
    data = bytearray(path.read_bytes())
    data[2 * 1024 + 100] ^= 0xFF  # inside a record batch, in chunk 2
    path.write_bytes(bytes(data))
    n = len(info.chunks["sha256"])
    with pytest.raises(ShardError, match=f"{NAME}: sha256 mismatch in chunk 2 of {n}"):
        ShardStream(as_location(tmp_path), entry(tmp_path, info)).read_all()


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda e: e["chunks"]["sha256"].pop(), r"manifest lists (\d+) chunk hashes for (?!\1)\d+ chunks"),
        (lambda e: e.update(sha256="sha256:" + "0" * 64), r"sha256 mismatch \(corrupted or replaced"),
    ],
)
def test_an_entry_that_disagrees_with_itself_is_refused(tmp_path, edit, match):
    """The chunk hashes must cover the file, and the whole-file sha256 must agree with them."""
    info = write(tmp_path, [topk_row(i) for i in range(6)], chunk_bytes=1024)
    e = entry(tmp_path, info)
    assert len(e["chunks"]["sha256"]) > 2
    edit(e)
    with pytest.raises(ShardError, match=match):
        ShardStream(as_location(tmp_path), e).read_all()


def test_a_file_without_the_arrow_magic_is_refused_even_with_matching_hashes(tmp_path):
    """The IPC stream after the magic would decode: the magic itself is checked."""
    write(tmp_path, [topk_row(0)])
    path = tmp_path / NAME
    data = b"NOTARROW" + path.read_bytes()[8:]
    path.write_bytes(data)
    with pytest.raises(ShardError, match="not an Arrow IPC file"):
        ShardStream(as_location(tmp_path), {"name": NAME, **checksums_of(data)})


def test_a_schema_with_an_extra_or_a_missing_column_is_refused():
    with pytest.raises(ShardError, match="x.arrow: schema differs from format v1: 8 columns, not 7"):
        check_schema(SCHEMA.append(pa.field("extra", pa.int32())), "x.arrow")
    with pytest.raises(ShardError, match="column 6 is missing"):
        check_schema(SCHEMA.remove(6), "x.arrow")


def test_shard_names_spools_and_what_a_cache_folder_may_hold():
    assert SHARD_RE.match(shard_name(3, 12)) and shard_name(3, 12) == "shard-w00003-000012.arrow"
    for bad in (NAME + TMP_SUFFIX, "sub/" + NAME, NAME + "/../../etc/passwd", "shard-w3-12.arrow"):
        assert not SHARD_RE.match(bad), bad
    # a worker sweeps its own half-written shards, never a live neighbour's
    assert fnmatch.fnmatch(shard_name(0, 5) + TMP_SUFFIX, spool_glob(0))
    assert not fnmatch.fnmatch(shard_name(1, 5) + TMP_SUFFIX, spool_glob(0))
    assert not fnmatch.fnmatch(shard_name(0, 5), spool_glob(0))
    for name in ("parts", "manifest.json", NAME, NAME + TMP_SUFFIX, ".DS_Store", "upload.tmp"):
        assert is_cache_file(name), name
    for name in ("data.jsonl", "notes.txt", "manifest.json.bak"):
        assert not is_cache_file(name), name


def test_a_failed_atomic_write_names_the_file_asked_for_not_its_temp_name(tmp_path):
    from teacher_cache.storage import write_atomic

    target = tmp_path / "gone" / "report.json"  # its folder vanished after the checks
    with pytest.raises(FileNotFoundError) as e:
        write_atomic(target, b"{}")
    assert e.value.filename == str(target) and ".tmp" not in str(e.value)
    write_atomic(tmp_path / "report.json", b"{}")
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["report.json"]
