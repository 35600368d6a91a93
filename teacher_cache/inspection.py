"""`inspect` and `verify`: what a cache is, and whether every byte of it checks out."""

from __future__ import annotations

import hashlib
from array import array

import numpy as np

from teacher_cache.cache import open_cache
from teacher_cache.manifest import codec_version, excluded_domains
from teacher_cache.shards import SHARD_GLOB, ShardError


def summary(path: str) -> dict:
    """Who made the cache and how, with its size and bytes per target position."""
    cache = open_cache(path, check_files=False)  # reports a damaged cache, shard by shard
    m = cache.manifest
    c = m["counts"]
    size = sum(s["bytes"] for s in m["shards"])
    teacher = m["teacher"]
    att = m.get("attention")
    return {
        "teacher": teacher["name"],
        "teacher_location": teacher.get("hub_id") or teacher.get("path"),
        "revision": teacher.get("revision"),
        "teacher_config_sha256": teacher.get("config_sha256"),
        "teacher_weights_sha256": teacher.get("weights_sha256"),
        "source_tag": m["source"],
        "backend": m.get("backend"),
        "engines": m.get("engines") or [],  # backend, device and library versions that ran the teacher
        "tokenizer_fingerprint": m["tokenizer"]["fingerprint"],
        "vocab_size": m["tokenizer"]["vocab_size"],
        "targets": m["targets"],
        "attention": att,
        "format_version": m["format_version"],
        "codec_version": codec_version([m]),
        "tool_version": m.get("tool_version"),
        "samples": c["samples"],
        "tokens": c["tokens"],
        "target_positions": c["target_positions"],
        "skipped_bad": c["skipped_bad"],
        "truncated": c["truncated"],
        "duplicates": c.get("duplicates", 0),  # repeated sample ids dropped (by a run, or by merge)
        "shards": len(m["shards"]),
        "bytes": size,
        "bytes_per_target_position": round(size / c["target_positions"], 2) if c["target_positions"] else None,
        "data_files": list(dict.fromkeys(f["path"] for f in m["data"]["files"])),  # once each, merged or not
        # a domain cache (a DAE expert's) or a general one, and the longest rows the reader takes
        "only_domain": m["data"].get("only_domain"),
        "exclude_domain": m["data"].get("exclude_domain"),
        "max_length": m["data"]["max_length"],
        "wall_s": (m.get("timing") or {}).get("wall_s"),  # None for a merged cache: see merged_from
        **({"merged_from": merged} if (merged := _merged_from(m)) else {}),
        # of a merge's dropped repeats, those whose targets differed from the row kept (other numerics)
        **{k: m[k] for k in ("duplicates_with_other_targets",) if k in m},
    }


def _merged_from(m: dict) -> list[str]:
    """The paths a merged cache came from (recorded, not validated: entries of another shape are left out)."""
    entries = m.get("merged_from")
    entries = entries if isinstance(entries, list) else []
    return [e["path"] for e in entries if isinstance(e, dict) and isinstance(e.get("path"), str)]


def verify(path: str, *, progress: bool = False) -> tuple[list[str], int]:
    """Decode every row of every shard; return (problems, samples checked)."""
    from teacher_cache.progress import bar as progress_bar

    cache = open_cache(path, check_files=False)  # reports a damaged cache, shard by shard
    problems: list[str] = []
    checked = 0
    listed = set(cache.shard_names)
    # each stored log-prob is within the cache's bound, so is the total top-k + tail log-mass
    for extra in (n for n in cache.where.glob(SHARD_GLOB) if n not in listed):
        problems.append(f"{extra}: shard file not listed in the manifest")
    m = cache.manifest
    sums = {"tokens": 0, "target_positions": 0}  # over every row read, against the manifest's counts
    ids = array("Q")  # 8 bytes of each sample id's sha256, packed (a cache of 10M samples: 80 MB; a list: 640)
    domain = _DomainCheck(m["data"])
    read_all = True
    with progress_bar(m["counts"]["samples"], "verifying", "sample", enabled=progress) as bar:
        for name in cache.shard_names:
            shard = {"tokens": 0, "target_positions": 0}
            try:
                for s in cache.iter_shard(name):
                    problems.extend(_bounds(s, name, m["source"]))
                    problems.extend(domain(s, name))
                    ids.append(_id_hash(s.sample_id))
                    shard["tokens"] += len(s.input_ids)
                    shard["target_positions"] += len(s.target_positions)
                    checked += 1
                    bar.update(1)
            except ShardError as e:
                problems.append(str(e))
                read_all = False
                continue
            entry = cache.entry(name)
            for key, n in shard.items():
                sums[key] += n
                if key in entry and entry[key] != n:
                    problems.append(f"{name}: rows hold {n} {key}, its entry says {entry[key]}")
    for key, n in sums.items():
        if read_all and m["counts"][key] != n:  # the totals are known only when every row was read
            problems.append(f"counts.{key}: rows hold {n}, the manifest says {m['counts'][key]}")
    problems.extend(_repeated_ids(cache, np.frombuffer(ids, np.uint64)))
    return problems, checked


def _id_hash(sample_id: str) -> int:
    return int.from_bytes(hashlib.sha256(sample_id.encode("utf-8", "surrogatepass")).digest()[:8], "little")


def _repeated_ids(cache, hashes: np.ndarray, show: int = 5) -> list[str]:
    """Sample ids stored more than once (run and merge keep one row per id, so a repeat was put
    there by hand: the trainer would see it twice an epoch). The ids are named from a second
    pass over the shards' undecoded rows, made only when some repeat."""
    ordered = np.sort(hashes)  # uint64 [N]
    repeated = set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
    if not repeated:
        return []
    where: dict[str, list[str]] = {}
    for name in cache.shard_names:
        try:
            for row in cache.iter_rows(name):
                sid = row.cols["sample_id"][row.j]
                if _id_hash(sid) in repeated:
                    where.setdefault(sid, []).append(name)
        except ShardError:  # reported already
            continue
    twice = {sid: names for sid, names in where.items() if len(names) > 1}
    out = [
        f"sample {sid!r}: stored {len(names)} times ({', '.join(names)})" for sid, names in list(twice.items())[:show]
    ]
    if len(twice) > show:
        out.append(f"... and {len(twice) - show} more sample ids stored more than once")
    return out


class _DomainCheck:
    """Each row's domain against the manifest's filter: a cache made with --only-domain D holds
    D's samples only (the trainer routes all its rows as domain samples), one made with
    --exclude-domain none of those."""

    def __init__(self, data: dict) -> None:
        self.only, self.excluded = data.get("only_domain"), excluded_domains(data)

    def __call__(self, s, shard: str) -> list[str]:
        if self.only is not None and s.domain != self.only:
            return [f"{shard} sample {s.sample_id}: domain {s.domain!r} in a cache of domain {self.only!r} only"]
        if s.domain in self.excluded:
            return [f"{shard} sample {s.sample_id}: domain {s.domain!r}, which the cache excludes"]
        return []


def _bounds(s, shard: str, source: str) -> list[str]:
    """What the reader does not check per row: the source tag, log-prob signs, count signs (a
    row's total mass is the reader's: `cache.mass_tolerance`)."""
    where = f"{shard} sample {s.sample_id}"
    out = [] if s.source == source else [f"{where}: source tag {s.source!r}, the manifest's is {source!r}"]
    if s.topk_logprobs is not None:
        lp = s.topk_logprobs
        if np.any(lp > 1e-3) or np.any(np.isnan(lp)):
            out.append(f"{where}: log-probs above 0 or NaN")
    if s.sampled_counts is not None and np.any(s.sampled_counts <= 0):
        out.append(f"{where}: non-positive sample counts")
    return out
