"""Reading a cache: `open_cache(path)` validates, then streams `CachedSample`s.

A cache from elsewhere is untrusted: the manifest is validated before use, every
shard's sha256, schema and row count are checked against the manifest before any
row is decoded, and every row's lengths and ids are checked while decoding.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from teacher_cache import codec
from teacher_cache.manifest import MANIFEST, PARTS_DIR, ManifestError, validate
from teacher_cache.shards import ShardError, read_shard_table, sha256_bytes, shard_metadata

MAX_SHARD_BYTES = 4 << 30  # refuse a shard that claims more than this


@dataclass
class CachedSample:
    """One cached sample; P target positions, k top-k, L attention layers."""

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


class Cache:
    """A validated cache directory; iterate it, or stream shard by shard."""

    def __init__(self, root: Path, manifest: dict) -> None:
        self.root = root
        self.manifest = manifest
        self.kind = manifest["targets"]["kind"]
        self.vocab_size = manifest["tokenizer"]["vocab_size"]
        att = manifest.get("attention") or {}
        self.attention_layers = tuple(att.get("layers", ()))

    @property
    def shard_names(self) -> list[str]:
        return [s["name"] for s in self.manifest["shards"]]

    def __len__(self) -> int:
        return int(self.manifest["counts"]["samples"])

    def __iter__(self) -> Iterator[CachedSample]:
        for name in self.shard_names:
            yield from self.iter_shard(name)

    def read_shard_bytes(self, name: str) -> bytes:
        entry = next((s for s in self.manifest["shards"] if s["name"] == name), None)
        if entry is None:
            raise ShardError(f"{name}: not listed in the manifest")
        path = self.root / name
        if not path.is_file():
            raise ShardError(f"{name}: listed in the manifest but missing from {self.root}")
        size = path.stat().st_size
        if size != entry["bytes"] or size > MAX_SHARD_BYTES:
            raise ShardError(f"{name}: {size} bytes on disk, manifest says {entry['bytes']}")
        data = path.read_bytes()
        if sha256_bytes(data) != entry["sha256"]:
            raise ShardError(f"{name}: sha256 mismatch (corrupted or replaced shard)")
        return data

    def iter_shard(self, name: str) -> Iterator[CachedSample]:
        """Decode one shard's rows, in order, after checking the shard as a whole."""
        entry = next(s for s in self.manifest["shards"] if s["name"] == name)
        table = read_shard_table(self.read_shard_bytes(name), name)
        meta = shard_metadata(table, name)
        # a merged cache lists each shard with the hash of the run that wrote it
        if meta.get("config_hash") != entry.get("config_hash", self.manifest.get("config_hash")):
            raise ShardError(f"{name}: made by a different run than this manifest describes")
        if table.num_rows != entry["rows"]:
            raise ShardError(f"{name}: {table.num_rows} rows, manifest says {entry['rows']}")
        cols = {
            c: table.column(c).to_pylist()
            if c in ("sample_id", "source", "domain", "targets", "attention")
            else table.column(c)
            for c in table.column_names
        }
        ids_col, pos_col = cols["input_ids"], cols["target_positions"]
        for i in range(table.num_rows):
            where = f"{name} row {i}"
            input_ids = ids_col[i].values.to_numpy(zero_copy_only=False).astype(np.int64)  # [T]
            positions = pos_col[i].values.to_numpy(zero_copy_only=False).astype(np.int64)  # [P]
            self._check_row(where, input_ids, positions)
            sample = CachedSample(cols["sample_id"][i], cols["source"][i], cols["domain"][i], input_ids, positions)
            try:
                self._decode_targets(sample, cols["targets"][i], where)
                self._decode_attention(sample, cols["attention"][i], where)
            except codec.CodecError as e:
                raise ShardError(f"{where}: {e}") from None
            yield sample

    def _check_row(self, where: str, input_ids: np.ndarray, positions: np.ndarray) -> None:
        T = len(input_ids)
        if T and (input_ids.min() < 0 or input_ids.max() >= self.vocab_size):
            raise ShardError(f"{where}: token id outside the vocabulary of {self.vocab_size}")
        if len(positions) and (positions.min() < 0 or positions.max() >= T - 1 or np.any(np.diff(positions) <= 0)):
            raise ShardError(f"{where}: target positions not strictly increasing within [0, {T - 1})")

    def _decode_targets(self, s: CachedSample, blob: bytes, where: str) -> None:
        P = len(s.target_positions)
        if self.kind == "topk":
            k = self.manifest["targets"]["k"]
            ids, lps, tail = codec.decode_topk(blob, vocab_size=self.vocab_size, max_positions=P, max_k=k)
            if ids.shape != (P, min(k, self.vocab_size)):
                raise ShardError(f"{where}: targets hold {ids.shape}, expected ({P}, {k})")
            s.topk_ids, s.topk_logprobs, s.tail_logprob = ids, lps, tail
        else:
            offsets, ids, counts, n = codec.decode_sampled(blob, vocab_size=self.vocab_size, max_positions=P)
            if len(offsets) != P + 1 or n != self.manifest["targets"]["num_draws"]:
                raise ShardError(
                    f"{where}: sampled targets for {len(offsets) - 1} positions / {n} draws, "
                    f"expected {P} / {self.manifest['targets']['num_draws']}"
                )
            s.sampled_offsets, s.sampled_ids, s.sampled_counts, s.num_draws = offsets, ids, counts, n

    def _decode_attention(self, s: CachedSample, blobs: list[bytes] | None, where: str) -> None:
        if not self.attention_layers:
            if blobs:
                raise ShardError(f"{where}: attention present but the manifest declares none")
            return
        if blobs is None or len(blobs) != len(self.attention_layers):
            raise ShardError(f"{where}: expected {len(self.attention_layers)} attention blocks")
        T, P = len(s.input_ids), len(s.target_positions)
        ka = self.manifest["attention"]["top_k"]
        decoded = [codec.decode_topk(b, vocab_size=T, max_positions=P, max_k=ka) for b in blobs]
        shapes = {d[0].shape for d in decoded}
        if shapes != {(P, min(ka, T))}:
            raise ShardError(f"{where}: attention blocks hold {shapes}, expected ({P}, {min(ka, T)})")
        # a query at position t attends to keys <= t only (entries past t pad short rows, weight 0)
        for ids, lps, _ in decoded:
            if np.any((ids > s.target_positions[:, None]) & (lps > -np.inf)):
                raise ShardError(f"{where}: attention key after its query")
        s.attention_layers = self.attention_layers
        s.attention_ids = np.stack([d[0] for d in decoded])  # [L, P, ka]
        s.attention_logprobs = np.stack([d[1] for d in decoded])  # [L, P, ka]
        s.attention_tail_logprob = np.stack([d[2] for d in decoded])  # [L, P]


def open_cache(path: str | Path) -> Cache:
    """Validate a cache directory's manifest and return a Cache over it."""
    root = Path(path)
    mpath = root / MANIFEST
    if not mpath.is_file():
        parts = sorted((root / PARTS_DIR).glob("*.json")) if (root / PARTS_DIR).is_dir() else []
        if parts:
            raise ManifestError(
                f"{root}: cache incomplete ({len(parts)} worker part(s), no manifest.json yet); "
                "finish or resume the run"
            )
        raise ManifestError(f"{root}: no {MANIFEST} (not a teacher cache)")
    if mpath.stat().st_size > 256 << 20:
        raise ManifestError(f"{mpath}: implausibly large manifest")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{mpath}: not valid JSON ({e})") from None
    return Cache(root, validate(manifest, str(mpath)))
