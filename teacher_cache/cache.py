"""Reading a cache: `open_cache(path)` validates, then streams `CachedSample`s.

A cache may be a local directory or an fsspec URL (s3://, gs://, hf://, file://).
A cache from elsewhere is untrusted: the manifest is validated before use; a shard's
size is checked before it is read, and its bytes are streamed in chunks, each checked
against the manifest's sha256 for that chunk before Arrow sees it (the whole shard's
sha256 is checked when its last chunk arrives); its schema and metadata are checked
before any row is decoded, its row count when it ends, and every row's lengths and
ids while decoding.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from teacher_cache import codec
from teacher_cache.manifest import (
    MANIFEST,
    MAX_MANIFEST_BYTES,
    PARTS_DIR,
    ManifestError,
    parse_part_name,
    read_part,
    validate,
    worker_lock_name,
)
from teacher_cache.settings import is_int
from teacher_cache.shards import MAX_SHARD_BYTES, SHARD_GLOB, SHARD_RE, ShardError, ShardStream, shard_metadata
from teacher_cache.storage import Location, as_location, holder, not_a_regular_file


@dataclass(eq=False)  # its fields are numpy arrays: == compares by identity, not elementwise (ambiguous)
class CachedSample:
    """One cached sample; T tokens, P target positions, k top-k, N sampled ids over all positions,
    L attention layers, ka attention top-k."""

    sample_id: str
    source: str  # the model whose distribution these targets are
    domain: str | None
    input_ids: np.ndarray  # int64 [T]
    target_positions: np.ndarray  # int64 [P]; targets predict input_ids[t + 1]
    # top-k targets (targets.kind == "topk")
    topk_ids: np.ndarray | None = None  # int64 [P, k], by descending log-prob
    topk_logprobs: np.ndarray | None = None  # float32 [P, k], natural log, temperature 1
    tail_logprob: np.ndarray | None = None  # float32 [P], log of the mass outside the top-k
    # sampled targets (targets.kind == "sampled")
    sampled_offsets: np.ndarray | None = None  # int64 [P + 1]
    sampled_ids: np.ndarray | None = None  # int64 [N]
    sampled_counts: np.ndarray | None = None  # int32 [N], summing to num_draws per position
    num_draws: int | None = None
    # attention summaries (manifest.attention.layers, in that order)
    attention_layers: tuple[int, ...] = ()
    attention_ids: np.ndarray | None = None  # int64 [L, P, ka] key positions
    attention_logprobs: np.ndarray | None = None  # float32 [L, P, ka] log head-averaged weights
    attention_tail_logprob: np.ndarray | None = None  # float32 [L, P] log of the rest


class RawRow(NamedTuple):
    """One shard row before decoding: its record batch's columns and its index there."""

    where: str  # "<shard> row <i>", for errors
    cols: dict  # column name -> the batch's column (Python lists for the byte and string columns)
    j: int  # the row within that batch


class Cache:
    """A validated cache directory; iterate it, or stream shard by shard."""

    def __init__(self, where: Location, manifest: dict) -> None:
        self.where = where
        self.manifest = manifest
        self.kind = manifest["targets"]["kind"]
        self.vocab_size = manifest["tokenizer"]["vocab_size"]
        self.logprob_error = manifest["targets"].get("logprob_error", codec.MAX_ERROR)  # top-k and attention
        att = manifest.get("attention") or {}
        self.attention_layers = tuple(att.get("layers", ()))
        self._entries = {s["name"]: s for s in manifest["shards"]}  # names are unique (validate)

    @property
    def digest(self) -> str:
        """sha256 of the manifest (it lists every shard's sha256): the identity of the cache's data."""
        return hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode()).hexdigest()

    @property
    def row_bytes(self) -> int:
        """The most bytes one row can take decompressed under this manifest's settings (a bound,
        loose, that a record batch declaring more for its rows cannot meet): int32 tokens and
        positions up to max_length, blocks at <= 16 bytes per entry, 64 KiB for the rest."""
        targets, longest = self.manifest["targets"], self.manifest["data"]["max_length"]
        entries = targets["k"] if self.kind == "topk" else min(targets["num_draws"], self.vocab_size)
        if self.attention_layers:
            entries += len(self.attention_layers) * self.manifest["attention"]["top_k"]
        return (64 << 10) + longest * (8 + 16 * entries)

    @property
    def shard_names(self) -> list[str]:
        return [s["name"] for s in self.manifest["shards"]]

    def __len__(self) -> int:
        return int(self.manifest["counts"]["samples"])

    def __repr__(self) -> str:
        t = self.manifest["targets"]
        what = f"top-{t['k']}" if self.kind == "topk" else f"sampled, {t['num_draws']} draws"
        return f"<Cache {self.where}: {len(self)} samples, {what}, {len(self.manifest['shards'])} shards>"

    def __iter__(self) -> Iterator[CachedSample]:
        for name in self.shard_names:
            yield from self.iter_shard(name)

    def find(self, sample_id: str | int | None = None) -> CachedSample:
        """The sample with this id (the cache's first when None), decoded: rows are scanned in
        shard order, their bytes checked as they stream, and only the match is decoded. An integer
        is its decimal string, as a record's integer id is stored (7 finds "7"). KeyError when no
        row has the id; TypeError for an id of another type (it would scan the cache for nothing)."""
        if is_int(sample_id):
            sample_id = str(int(sample_id))
        elif sample_id is not None and not isinstance(sample_id, str):
            raise TypeError(f"sample_id must be a str, an int or None, got {sample_id!r}")
        for name in self.shard_names:
            for row in self.iter_rows(name):
                if sample_id is None or row.cols["sample_id"][row.j] == sample_id:
                    return self.decode(row)
        raise KeyError(sample_id)

    def entry(self, name: str) -> dict:
        entry = self._entries.get(name)
        if entry is None:
            raise ShardError(f"{name}: not listed in the manifest")
        return entry

    def check_files(self) -> None:
        """Every listed shard stored, at its manifest size (one listing, no shard read): a cache that
        lost or cut a shard fails when opened, not when training reaches that shard. (Checksums:
        as each shard is read, or all at once by `teacher-cache verify`.)"""
        stored = self.where.sizes(SHARD_GLOB)
        for name in self._entries:
            self._stored_size(name, stored.get(name))  # None: not listed, or listed without a size (http)

    def _stored_size(self, name: str, listed: int | None = None) -> int:
        """A shard's stored size (`listed`, else asked for), which must be its manifest's."""
        size = listed
        if size is None:
            try:
                size = self.where.size(name)
            except FileNotFoundError:
                size = None
        odd = self._not_a_file(name)  # a FIFO lists its size as 0: a shard listed at 0 bytes would hang a read
        if odd:
            raise ShardError(f"{self.where.describe(name)}: {odd}, not a shard file")
        if size != (expected := self.entry(name)["bytes"]):
            if size is None:
                raise ShardError(f"{name}: listed in the manifest but missing from {self.where}")
            raise ShardError(f"{self.where.describe(name)}: {size} bytes stored, manifest says {expected}")
        return size

    def _not_a_file(self, name: str) -> str | None:
        """What stands where a local shard should be, if not a regular file (a listing reports a
        folder's or a dangling link's own size, a FIFO's as 0; opening a FIFO waits for a writer)."""
        if not self.where.is_local:
            return None
        path = self.where.local_path(name)
        if path.is_symlink() and not path.exists():
            return f"a symbolic link to {os.readlink(path)}, which does not exist"
        return not_a_regular_file(path)

    def open_shard(self, name: str) -> ShardStream:
        """Check a shard's size and header against the manifest; stream its record batches."""
        entry = self.entry(name)
        size = self._stored_size(name)
        if size > MAX_SHARD_BYTES:
            raise ShardError(f"{self.where.describe(name)}: {size} bytes, over the reader's limit of {MAX_SHARD_BYTES}")
        stream = ShardStream(self.where, entry, self.row_bytes)
        meta = shard_metadata(stream.schema, stream.name)
        # a merged cache lists each shard with the hash of the run that wrote it
        own = meta.get("config_hash")
        if not isinstance(own, str) or own != entry.get("config_hash", self.manifest.get("config_hash")):
            raise ShardError(f"{self.where.describe(name)}: made by a different run than this manifest describes")
        return stream

    def read_table(self, name: str) -> pa.Table:
        """A whole shard, checked (merge needs all of a shard's rows at once; training streams)."""
        table, expected = self.open_shard(name).read_all(), self.entry(name)["rows"]
        if table.num_rows != expected:
            raise ShardError(f"{self.where.describe(name)}: {table.num_rows} rows, manifest says {expected}")
        return table

    def iter_shard(self, name: str) -> Iterator[CachedSample]:
        """Decode one shard's rows in order, as its checked bytes stream in."""
        for row in self.iter_rows(name):
            yield self.decode(row)

    def iter_rows(self, name: str) -> Iterator[RawRow]:
        """One shard's rows in order, undecoded: its bytes and row counts are checked as they
        stream in, no row's targets are decoded (`decode` does that, for the rows wanted)."""
        expected = self.entry(name)["rows"]
        i = 0
        for batch in self.open_shard(name):
            if i + batch.num_rows > expected:
                raise ShardError(f"{self.where.describe(name)}: more rows than the {expected} the manifest lists")
            yield from self._raw_rows(name, batch, i)
            i += batch.num_rows
        if i != expected:
            raise ShardError(f"{self.where.describe(name)}: {i} rows, manifest says {expected}")

    def _raw_rows(self, name: str, batch: pa.RecordBatch, first: int) -> Iterator[RawRow]:
        """A record batch's rows, undecoded; `first` is the shard's row number of its first."""
        cols = {
            c: batch.column(c).to_pylist()
            if c in ("sample_id", "source", "domain", "targets", "attention")
            else batch.column(c)
            for c in batch.schema.names
        }
        for j in range(batch.num_rows):
            yield RawRow(f"{self.where.describe(name)} row {first + j}", cols, j)

    def check_rows(self, name: str, table: pa.Table) -> None:
        """Decode every row of a shard read whole (`read_table`): what a trainer would refuse
        (ShardError naming the row) is refused here, before a merge passes the rows on."""
        i = 0
        for batch in table.to_batches():
            for row in self._raw_rows(name, batch, i):
                self.decode(row)
            i += batch.num_rows

    def decode(self, row: RawRow) -> CachedSample:
        """A row from `iter_rows`, checked and decoded (ShardError naming shard and row if bad)."""
        where, cols, j = row
        ids, longest = cols["input_ids"][j], self.manifest["data"]["max_length"]
        if len(ids) > longest:  # from the list's offsets, before any copy
            raise ShardError(f"{where}: {len(ids)} tokens, past the cache's max_length {longest}")
        input_ids = ids.values.to_numpy(zero_copy_only=False).astype(np.int64)  # int64 [T]
        positions = cols["target_positions"][j].values.to_numpy(zero_copy_only=False).astype(np.int64)  # int64 [P]
        self._check_row(where, input_ids, positions)
        sample = CachedSample(cols["sample_id"][j], cols["source"][j], cols["domain"][j], input_ids, positions)
        try:
            self._decode_targets(sample, cols["targets"][j], where)
            self._decode_attention(sample, cols["attention"][j], where)
        except codec.CodecError as e:
            raise ShardError(f"{where}: {e}") from None
        return sample

    def _check_row(self, where: str, input_ids: np.ndarray, positions: np.ndarray) -> None:
        T = len(input_ids)
        if T == 0:  # the trainer would fail on it naming no row
            raise ShardError(f"{where}: a row with no tokens")
        if input_ids.min() < 0 or input_ids.max() >= self.vocab_size:
            raise ShardError(f"{where}: token id outside the vocabulary of {self.vocab_size}")
        if len(positions) and (positions.min() < 0 or positions.max() >= T - 1 or np.any(np.diff(positions) <= 0)):
            raise ShardError(f"{where}: target positions not strictly increasing within [0, {T - 1})")

    def _decode_targets(self, s: CachedSample, blob: bytes, where: str) -> None:
        P = len(s.target_positions)
        if self.kind == "topk":
            k = self.manifest["targets"]["k"]
            # ids int64 [P, k], lps float32 [P, k], tail float32 [P]
            ids, lps, tail = codec.decode_topk(
                blob, vocab_size=self.vocab_size, max_positions=P, max_k=k, max_error=self.logprob_error
            )
            if ids.shape != (P, min(k, self.vocab_size)):
                raise ShardError(f"{where}: targets hold {ids.shape}, expected ({P}, {min(k, self.vocab_size)})")
            if _repeats_an_id(ids):  # an id named twice in a row would count its mass twice
                raise ShardError(f"{where}: a top-k row names the same id twice")
            self._check_mass(lps, tail, where, "a top-k row's probabilities")
            s.topk_ids, s.topk_logprobs, s.tail_logprob = ids, lps, tail
        else:
            # offsets int64 [P + 1], ids int64 [N], counts int32 [N], n draws per position
            draws = self.manifest["targets"]["num_draws"]
            offsets, ids, counts, n = codec.decode_sampled(
                blob, vocab_size=self.vocab_size, max_positions=P, max_entries=P * min(draws, self.vocab_size),
                num_draws=draws,
            )  # fmt: skip
            if len(offsets) != P + 1:
                raise ShardError(f"{where}: sampled targets for {len(offsets) - 1} positions, expected {P}")
            s.sampled_offsets, s.sampled_ids, s.sampled_counts, s.num_draws = offsets, ids, counts, n

    def _check_mass(self, lps: np.ndarray, tail: np.ndarray, where: str, what: str) -> None:
        """Rows of log-probs float32 [P, k] + tail [P] must hold a total mass of 1 within the codec's
        bound: a row of zero log-probs (mass k), or one of no mass at all, decodes but is no distribution."""
        if not len(tail):
            return
        with np.errstate(divide="ignore"):  # a row of no mass: log(0) = -inf, refused below
            total = np.log(np.exp(lps).sum(1, dtype=np.float64) + np.exp(tail))  # float64 [P]
        off = np.abs(total)
        if not off.max() <= mass_tolerance(self.logprob_error):  # NaN fails too
            worst = float(np.exp(total[np.argmax(off)]))
            raise ShardError(f"{where}: {what} and tail sum to {worst:.4g}, not 1 within the cache's error bound")

    def _decode_attention(self, s: CachedSample, blobs: list[bytes] | None, where: str) -> None:
        if not self.attention_layers:
            if blobs:
                raise ShardError(f"{where}: attention present but the manifest declares none")
            return
        if blobs is None or len(blobs) != len(self.attention_layers):
            raise ShardError(f"{where}: expected {len(self.attention_layers)} attention blocks")
        T, P = len(s.input_ids), len(s.target_positions)
        ka = self.manifest["attention"]["top_k"]
        # per layer: key ids int64 [P, ka], logprobs float32 [P, ka], tail float32 [P]
        decoded = [
            codec.decode_topk(b, vocab_size=T, max_positions=P, max_k=ka, max_error=self.logprob_error) for b in blobs
        ]
        shapes = {d[0].shape for d in decoded}
        if shapes != {(P, min(ka, T))}:
            raise ShardError(f"{where}: attention blocks hold {shapes}, expected ({P}, {min(ka, T)})")
        ids = np.stack([d[0] for d in decoded])  # int64 [L, P, ka]
        lps = np.stack([d[1] for d in decoded])  # float32 [L, P, ka]
        tail = np.stack([d[2] for d in decoded])  # float32 [L, P]
        # every layer's rows checked at once: a query at position t attends to keys <= t only
        # (entries past t pad short rows, weight 0)
        if np.any((ids > s.target_positions[:, None]) & (lps > -np.inf)):  # [L, P, ka] vs queries [P, 1]
            raise ShardError(f"{where}: attention key after its query")
        k = ids.shape[-1]
        if _repeats_an_id(ids.reshape(-1, k)):  # a key named twice would count its weight twice
            raise ShardError(f"{where}: an attention row names the same key twice")
        self._check_mass(lps.reshape(-1, k), tail.reshape(-1), where, "an attention row's weights")
        s.attention_layers = self.attention_layers
        s.attention_ids, s.attention_logprobs, s.attention_tail_logprob = ids, lps, tail


def mass_tolerance(logprob_error: float) -> float:
    """How far (in nats) a decoded row's total mass may be from 1: the codec's bound (CODEC.md)
    with room for float32 rounding and the coarse entries far below the top-1."""
    return 0.03 + logprob_error


def _repeats_an_id(ids: np.ndarray) -> bool:
    """Whether any row of ids [P, k] names an id twice."""
    ordered = np.sort(ids, axis=1)  # [P, k]
    return bool(np.any(ordered[:, 1:] == ordered[:, :-1]))


def inside_cache(folder: Path) -> Path | None:
    """The local teacher cache that `folder` (absolute) is or lies in, or None."""
    return next((p for p in (folder, *folder.parents) if _is_cache(p)), None)


def _is_cache(folder: Path) -> bool:
    """A teacher cache's folder: its manifest beside its shards or worker parts."""
    if not (folder / MANIFEST).is_file():
        return False
    return (folder / PARTS_DIR).is_dir() or any(SHARD_RE.fullmatch(n) for n in os.listdir(folder))


def _unfinished(where: Location, parts: list[str]) -> str:
    """What an incomplete cache's worker parts say is left to do (workers of one run share one --out)."""
    runs: dict[int, dict[int, bool]] = {}  # num_workers -> {worker: finished}
    for name in parts:
        ids = parse_part_name(name.rsplit("/", 1)[-1])
        if ids is not None:
            try:
                part = read_part(where, *ids)
            except ManifestError as e:
                return str(e)
            runs.setdefault(ids[1], {})[ids[0]] = bool(part and part.get("complete"))
    if len(runs) != 1:
        return "finish or resume the run"
    ((n, seen),) = runs.items()
    missing = [w for w in range(n) if w not in seen]
    running = [w for w, done in sorted(seen.items()) if not done]
    held = {w: holder(where.local_path() / worker_lock_name(w)) for w in running} if where.is_local else {}
    busy = [f"{f'worker {w} ' if n > 1 else ''}pid {h[0]}" for w, h in held.items() if h is not None]
    if busy:  # a run writing it now (its lock held): resuming would be refused; waiting is the answer
        return f"a run is writing it now ({', '.join(busy)}): wait for it to finish"
    if not missing and not running:  # e.g. workers' folders copied together: the last to end writes it
        return f"all {n} workers are finished: rerun any worker's command with this --out to write {MANIFEST}"
    if n == 1:
        return "the run is unfinished: its command, run again, resumes it"
    todo = [f"worker(s) {', '.join(map(str, running))} unfinished (resume them)"] if running else []
    if missing:
        todo.append(
            f"no part of worker(s) {', '.join(map(str, missing))} here (run them with this --out: the "
            "workers of one run share one --out)"
        )
    return f"{n} workers, " + "; ".join(todo)


def open_cache(path: str | Path | Location, *, check_files: bool = True) -> Cache:
    """Validate a cache's manifest (a directory or fsspec URL) and return a Cache over it; with
    `check_files`, also that every shard it lists is stored at its size (`Cache.check_files`)."""
    where = as_location(path)
    if not where.exists(MANIFEST):
        if not where.exists(""):
            bucket = where.bucket()
            missing = f" (no bucket {bucket})" if bucket and not as_location(bucket).exists("") else ""
            raise ManifestError(f"{where}: does not exist{missing}")
        parts = where.glob(f"{PARTS_DIR}/*.json")
        if parts:
            raise ManifestError(f"{where}: cache incomplete (no {MANIFEST} yet): {_unfinished(where, parts)}")
        if where.is_local and where.local_path().is_file():
            folder = where.local_path().parent
            hint = f": give the cache's folder, {folder}" if where.local_path().name == MANIFEST else ""
            raise ManifestError(f"{where} is a file, not a teacher cache's folder{hint}")
        raise ManifestError(f"{where}: no {MANIFEST} (not a teacher cache)")
    try:
        manifest = where.read_json(MANIFEST, MAX_MANIFEST_BYTES)
    except ValueError as e:
        raise ManifestError(str(e)) from None
    cache = Cache(where, validate(manifest, where.describe(MANIFEST)))
    if check_files:
        cache.check_files()
    return cache
