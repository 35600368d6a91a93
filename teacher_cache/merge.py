"""`teacher-cache merge A B ... --out C`: join compatible caches, or say exactly why not.

Compatible means rows are interchangeable: same format version, tokenizer, chat template,
teacher (config and dtype), targets (kind, k / num_draws, log-prob error bound), attention
spec and source tag.
Sample ids may overlap only with the same input (tokens, target positions, domain, source): the
first row is kept. Its targets may differ from a repeat's by numerics (another batch
composition or engine computed them) and the manifest counts such repeats; the merged manifest lists
each shard with the config hash of the run that wrote it, each run with its settings (`runs`,
which the reader checks the merged settings against), and each source cache with its backend
(the manifest's `backend` is "mixed" when they differ).
"""

from __future__ import annotations

import hashlib
import json
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from teacher_cache import progress
from teacher_cache.cache import Cache, inside_cache, open_cache
from teacher_cache.manifest import (
    COUNT_KEYS,
    MANIFEST,
    codec_version,
    combine_backends,
    header_differences,
    merged_config_hash,
    merged_data,
    runs_of,
    union_engines,
)
from teacher_cache.progress import log
from teacher_cache.shards import (
    FORMAT_VERSION,
    SHARD_RE,
    Row,
    ShardInfo,
    ShardWriter,
    is_cache_file,
    shard_metadata,
    shard_name,
)
from teacher_cache.storage import Location, StorageError, remove_if_unused


class MergeError(ValueError):
    """The caches cannot be merged; the message says which field differs."""


def _compat(m: dict) -> dict:
    t = m["teacher"]
    return {
        "format version": m["format_version"],
        "tokenizer fingerprint": m["tokenizer"]["fingerprint"],
        "chat template": m["tokenizer"].get("chat_template_sha256"),
        "teacher": {k: t.get(k) for k in ("config_sha256", "weights_sha256", "dtype", "hub_id", "revision")},
        "targets (kind, k, draws, logprob_error)": m["targets"],
        "attention spec": m.get("attention"),
        "source tag": m["source"],
    }


def check_compatible(caches: list[Cache]) -> None:
    """Raise MergeError naming the first field in which a cache's rows differ from the first's."""
    first = _compat(caches[0].manifest)
    for cache in caches[1:]:
        other = _compat(cache.manifest)
        for key, value in first.items():
            if other[key] != value:
                why = _difference(value, other[key])
                if key == "teacher":  # its hashes say that they differ; the names say which models
                    why = f"{caches[0].manifest['teacher']['name']} vs {cache.manifest['teacher']['name']}; {why}"
                why = f"{key} differs ({why})"
                raise MergeError(f"cannot merge {caches[0].where} and {cache.where}: {why}")
        # the rest of what the reader compares between a merged cache and each of its runs
        differ = header_differences({**caches[0].manifest, "data": None}, {**cache.manifest, "data": None})
        if differ:
            raise MergeError(f"cannot merge {caches[0].where} and {cache.where}: {', '.join(differ)} differ")


def _warn_domain_lost(caches: list[Cache], paths: list[str]) -> None:
    """Domain caches (--only-domain) merged with caches of another domain, or none, make a cache
    with no single domain: stage two reads its rows as general samples (a DAE mix would train the
    expert's rows as the reference's). Legal, so said, not refused."""
    domains = [c.manifest["data"].get("only_domain") for c in caches]
    if any(d is not None for d in domains) and len(set(domains)) > 1:
        listed = ", ".join(f"{p} ({'--only-domain ' + d if d is not None else 'no domain filter'})"
                           for p, d in zip(paths, domains, strict=True))  # fmt: skip
        log(
            f"warning: the merged cache has no single domain ({listed}): student-train reads all its rows as "
            "general samples, not a domain expert's (for DAE, merge caches of one domain only)"
        )


def _difference(a: object, b: object) -> str:
    """'a vs b', or for two dicts only their keys that differ: 'k: 32 vs 8, ...'."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted({*a, *b} - {k for k in a.keys() & b.keys() if a[k] == b[k]})
        return ", ".join(f"{k}: {_short(a.get(k))} vs {_short(b.get(k))}" for k in keys)
    return f"{_short(a)} vs {_short(b)}"


def _short(v: object) -> str:
    s = json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= 80 else s[:77] + "..."


def _int_lists(col: pa.ChunkedArray) -> list[bytes | None]:
    """A list<int32> column -> each row's values as little-endian int32 bytes (None if null)."""
    arr = col.combine_chunks()
    data = arr.values.to_numpy().astype("<i4").tobytes()  # all rows' values, one copy
    ends = (arr.offsets.to_numpy().astype(np.int64) * 4).tolist()  # [n + 1] byte offsets into data
    valid = arr.is_valid().to_numpy(zero_copy_only=False).tolist()  # [n]
    return [data[ends[i] : ends[i + 1]] if ok else None for i, ok in enumerate(valid)]


def _framed(value: bytes | str | None) -> bytes:
    """One value, unambiguously: a null flag, then its length, then its bytes."""
    if value is None:
        return b"\0"
    data = value.encode() if isinstance(value, str) else value
    return b"\1" + len(data).to_bytes(8, "little") + data


def row_digests(table: pa.Table) -> list[tuple[bytes, bytes]]:
    """Per row (sha256 of its input: source, domain, token ids, target positions; sha256 of that
    input and its teacher outputs: targets, attention), from Arrow's buffers: the token lists as
    their int32 bytes, never as Python ints. Equal digests <=> equal rows (or inputs)."""
    cols = table.select(["source", "domain", "targets", "attention"]).to_pydict()  # strings and bytes
    ids, positions = (_int_lists(table.column(name)) for name in ("input_ids", "target_positions"))
    out = []
    for src, dom, i, p, tgt, att in zip(
        cols["source"], cols["domain"], ids, positions, cols["targets"], cols["attention"], strict=True
    ):
        given = hashlib.sha256(b"".join([_framed(src), _framed(dom), _framed(i), _framed(p)]))
        outputs = [_framed(tgt), b"\0" if att is None else b"\1" + len(att).to_bytes(8, "little")]
        outputs.extend(_framed(block) for block in att or ())
        whole = given.copy()
        whole.update(b"".join(outputs))
        out.append((given.digest(), whole.digest()))
    return out


class _ShardPlan(NamedTuple):
    """One source shard and what the merge keeps of it."""

    cache: Cache
    entry: dict  # the shard's entry in its cache's manifest
    config_hash: str  # from the shard's own schema metadata
    keep: list[int] | None  # indices of the rows to keep; None: all, the shard is copied as it is
    sizes: dict[str, int]  # its tokens and target positions, counted from its rows (entries are not trusted)


def merge(paths: list[str], out: str, *, progress: bool = False) -> dict:
    """Merge caches into `out` (a new directory or URL); returns the merged manifest.

    Shards are read one at a time (memory: one shard and a digest per sample id), twice for a
    shard that loses duplicate rows: once to plan, once to rewrite it."""
    if len(paths) < 2:
        raise MergeError("merge needs at least two caches")
    dest = Location(out)
    _check_dest(dest)
    caches = [open_cache(p) for p in paths]
    digests = [c.digest for c in caches]
    for i, d in enumerate(digests):
        if d in digests[:i]:  # legal (its rows are kept once), but rarely what was meant
            first = paths[digests.index(d)]
            log(
                f"warning: {paths[i]} is the same cache as {first} (same manifest): every row of it is a "
                "duplicate, kept once"
            )
    check_compatible(caches)
    _warn_domain_lost(caches, paths)
    made = dest.local_path() if dest.is_local and not dest.local_path().exists() else None
    try:
        try:
            dest.check_writable("")  # before the planning pass reads every shard (a web server takes no writes)
        except StorageError as e:
            raise MergeError(str(e)) from None
        n_shards = sum(len(c.manifest["shards"]) for c in caches)
        with _bar(progress, n_shards, "checking") as bar:
            plans, repeats = _plan(caches, bar)
    except BaseException:  # a bad source row, Ctrl-C: nothing written yet, no empty --out left behind
        if made is not None:
            remove_if_unused(made)
        raise
    dest.makedirs()
    with _bar(progress, len(plans), "writing", unit="source shard") as bar:  # those that keep no row: none
        shards = _write_shards(dest, plans, bar)
    manifest = _merged_manifest(caches, shards, repeats)
    dest.write_json(MANIFEST, manifest)
    open_cache(dest)  # the result must pass the same checks as any cache
    return manifest


def _check_dest(dest: Location) -> None:
    """Raise MergeError unless `dest` is new or empty, naming an unfinished merge as one."""
    if dest.is_local and dest.local_path().exists() and not dest.local_path().is_dir():
        raise MergeError(f"--out {dest} is a file, not a directory for the merged cache")
    cache = inside_cache(dest.local_path().resolve().parent) if dest.is_local else None
    if cache is not None:  # a cache in a cache: the outer one's resume and verify would trip on it
        raise MergeError(f"--out {dest} is inside the teacher cache {cache}: use a directory of its own")
    names = dest.glob("*")
    leftovers = MANIFEST not in names and all(is_cache_file(n) and n != "parts" for n in names)
    if names and leftovers and any(SHARD_RE.match(n) for n in names):  # not a folder of dot-files alone
        raise MergeError(f"{dest} holds an unfinished merge (shards, no manifest.json): delete it and merge again")
    if names:
        raise MergeError(f"{dest} exists and is not empty")


def _bar(enabled: bool, total: int, desc: str, unit: str = "shard"):
    """A progress bar over shards on stderr (a no-op when disabled)."""
    return progress.bar(total, desc, unit, enabled=enabled)


class _Repeats(NamedTuple):
    """Rows a merge dropped as repeats of a sample id seen before (the first row is kept)."""

    dropped: int
    other_targets: int  # of those, with targets that differ from the kept row's (numerics)


def _plan(caches: list[Cache], bar) -> tuple[list[_ShardPlan], _Repeats]:
    """Every source shard in order with the rows it keeps, and the repeats it drops: rows whose
    sample id was seen before with the same input; a repeat with another input raises."""
    seen: dict[str, tuple[bytes, int]] = {}  # sample id -> (digests, its shard's index << 32 | row)
    shards: list[str] = []  # each source shard as described in messages, by index
    plans: list[_ShardPlan] = []
    dropped = other = 0
    for cache in caches:
        for entry in cache.manifest["shards"]:
            table = cache.read_table(entry["name"])  # checked; dropped once planned
            cache.check_rows(entry["name"], table)  # every row decodes: no bad row reaches the merged cache
            chash = shard_metadata(table.schema, entry["name"])["config_hash"]
            shards.append(cache.where.describe(entry["name"]))
            keep, repeats = _new_rows(table, shards, seen)
            sizes = {
                key: int(pc.sum(pc.list_value_length(table.column(column))).as_py() or 0)
                for key, column in (("tokens", "input_ids"), ("target_positions", "target_positions"))
            }
            plans.append(_ShardPlan(cache, entry, chash, None if not repeats.dropped else keep, sizes))
            dropped, other = dropped + repeats.dropped, other + repeats.other_targets
            bar.update(1)
    return plans, _Repeats(dropped, other)


def _new_rows(table: pa.Table, shards: list[str], seen: dict[str, tuple[bytes, int]]) -> tuple[list[int], _Repeats]:
    """Indices of the shard's rows (the last of `shards`) whose sample id is new (added to `seen`),
    and its repeats; a repeated id with another input (tokens, positions, domain or source) raises
    MergeError. The same input with other targets is a repeat: the same teacher (check_compatible)
    in another batch composition or engine, whose numerics differ by a quantisation step or so.
    `seen` keeps 24 bytes of digests and an int per id (merges of 10^7 samples: a where-string per
    row took ~500 bytes each): 16 of the input's digest, 8 of the whole row's (a count only)."""
    keep, dropped, other = [], 0, 0
    here = len(shards) - 1
    ids = table.column("sample_id").to_pylist()
    for i, (sid, (given, whole)) in enumerate(zip(ids, row_digests(table), strict=True)):
        digests = given[:16] + whole[:8]
        if sid in seen:
            first, at = seen[sid]
            if first[:16] != digests[:16]:
                raise MergeError(
                    f"sample id {sid!r} is in {shards[at >> 32]} row {at & 0xFFFFFFFF} and {shards[here]} row {i} "
                    "with different content (tokens, target positions, domain or source)"
                )
            dropped += 1
            other += first[16:] != digests[16:]
            continue
        seen[sid] = (digests, here << 32 | i)
        keep.append(i)
    return keep, _Repeats(dropped, other)


def _write_shards(dest: Location, plans: list[_ShardPlan], bar) -> list[dict]:
    """Copy or rewrite each planned shard into `dest` as worker 0's shard of the same index
    (a shard that keeps no row leaves a gap); returns their manifest entries."""
    shards = []
    for index, (cache, entry, chash, keep, sizes) in enumerate(plans):
        bar.update(1)
        name = shard_name(0, index)
        origin = cache.where.describe(entry["name"])
        if keep is None:  # the shard's bytes are kept as they are (its metadata names its old name)
            dest.copy_from(cache.where, entry["name"], name)
            shards.append({**entry, **sizes, "name": name, "config_hash": chash, "from": origin})
            continue
        if not keep:
            continue
        info = _rewrite_shard(dest, name, chash, cache.read_table(entry["name"]), keep)  # read (and checked) again
        # rows carry no truncation flag: a rewritten shard keeps its source's count as an upper bound
        shards.append(
            {
                **info.to_dict(),
                "truncated": _count(entry.get("truncated")),
                "skipped_bad": 0,
                "bad_records": [],
                "config_hash": chash,
                "from": origin,
            }
        )
    return shards


def _rewrite_shard(dest: Location, name: str, chash: str, table: pa.Table, keep: list[int]) -> ShardInfo:
    """Write the `keep` rows of `table` as shard `name` of `dest`, its blobs as they are."""
    rows = table.to_pylist()
    with ShardWriter(dest, name, {"format_version": FORMAT_VERSION, "config_hash": chash, "shard": name}) as w:
        for i in keep:
            r = rows[i]
            w.write(
                Row(
                    r["sample_id"],
                    r["source"],
                    r["domain"],
                    np.asarray(r["input_ids"], dtype=np.int64),  # int64 [T]
                    np.asarray(r["target_positions"], dtype=np.int64),  # int64 [P]
                    r["targets"],
                    r["attention"],
                )
            )
        info = w.finalize()
    return info


def _count(value: object) -> int:
    """A count a source manifest records but no reader checks (validate): a non-negative int, or 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _merged_manifest(caches: list[Cache], shards: list[dict], repeats: _Repeats) -> dict:
    """The first cache's manifest with the merged shards, counts, engines, data files, backend
    and codec version, and where each part came from."""
    first = caches[0].manifest
    drop = ("shards", "counts", "timing", "bad_records", "config", "engines")
    manifest = {k: v for k, v in first.items() if k not in drop}
    manifest["engines"] = union_engines([c.manifest.get("engines") or [] for c in caches])
    runs: dict[str, dict] = {}  # each run whose rows the sources hold, once (a merged source's flattened)
    for c in caches:
        runs.update((r["config_hash"], r) for r in runs_of(c.manifest) if r["config_hash"] not in runs)
    manifest["runs"] = list(runs.values())
    manifest["data"] = {
        **first["data"],
        "files": [f for c in caches for f in c.manifest["data"]["files"]],
        # the longest max_length (the reader bounds every row by it); a filter the merged rows do not
        # all share is no filter
        **merged_data(manifest["runs"]),
    }
    manifest["merged_from"] = [
        {
            "path": str(c.where.local_path().resolve()) if c.where.is_local else str(c.where),  # not as typed
            "config_hash": c.manifest["config_hash"],
            "backend": c.manifest.get("backend"),
            "samples": c.manifest["counts"]["samples"],
        }
        for c in caches
    ]
    manifest["backend"] = combine_backends([c.manifest.get("backend") for c in caches])
    manifest["codec_version"] = codec_version([c.manifest for c in caches])
    manifest["config_hash"] = merged_config_hash(manifest["merged_from"])
    manifest["shards"] = shards
    counts = {k: sum(c.manifest["counts"][k] for c in caches) for k in COUNT_KEYS}
    counts["samples"] = sum(s["rows"] for s in shards)
    counts["tokens"] = sum(s["tokens"] for s in shards)
    counts["target_positions"] = sum(s["target_positions"] for s in shards)
    counts["duplicates"] += repeats.dropped
    manifest["counts"] = counts
    # repeats kept from the first cache whose dropped copy had other targets (numerics)
    manifest["duplicates_with_other_targets"] = repeats.other_targets + sum(
        _count(c.manifest.get("duplicates_with_other_targets")) for c in caches
    )
    manifest["bad_records"] = [b for c in caches for b in c.manifest.get("bad_records", [])]
    return manifest
