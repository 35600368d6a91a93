"""The manifest: what made a cache, what it holds, and checks for caches from elsewhere.

Each worker keeps its own part file, `parts/worker-IIIII-of-NNNNN.json`, rewritten
atomically after every durable shard; it is the worker's resume point. When every
part is complete, `manifest.json` is assembled from them (deterministically, so
workers finishing together write the same bytes).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from teacher_cache.shards import FORMAT_VERSION

MANIFEST = "manifest.json"
PARTS_DIR = "parts"
FORMAT_NAME = "teacher-cache"
SHARD_RE = re.compile(r"^shard-w\d{5}-\d{6}\.arrow$")
COUNT_KEYS = ("samples", "tokens", "target_positions", "truncated", "skipped_bad", "duplicates")
# fields whose equality makes two caches' rows interchangeable (see `compatibility_key`)
_HEADER_KEYS = ("format", "format_version", "teacher", "tokenizer", "targets", "attention", "data", "source")


class ManifestError(ValueError):
    """A manifest that is missing, malformed, or from an unsupported format."""


def part_name(worker: int, num_workers: int) -> str:
    return f"worker-{worker:05d}-of-{num_workers:05d}.json"


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def config_hash(header: dict) -> str:
    blob = json.dumps({k: header[k] for k in _HEADER_KEYS}, sort_keys=True).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def assemble(directory: Path, num_workers: int) -> dict | None:
    """Combine complete parts into manifest.json; None while a worker is unfinished."""
    parts = []
    for w in range(num_workers):
        p = directory / PARTS_DIR / part_name(w, num_workers)
        if not p.is_file():
            return None
        part = json.loads(p.read_text())
        if not part.get("complete"):
            return None
        parts.append(part)
    head = parts[0]
    if any(p["config_hash"] != head["config_hash"] for p in parts):
        raise ManifestError(f"{directory}: worker parts were made with different settings")
    manifest = {k: head[k] for k in (*_HEADER_KEYS, "config_hash", "tool_version", "config", "backend")}
    manifest["config"] = {k: v for k, v in head["config"].items() if k != "worker_index"}
    manifest["shards"] = [s for p in parts for s in p["shards"]]
    manifest["counts"] = {k: sum(p["counts"][k] for p in parts) for k in COUNT_KEYS}
    manifest["bad_records"] = [b for p in parts for b in p.get("bad_records", [])]
    wall = max(p["timing"]["wall_s"] for p in parts)
    manifest["timing"] = {
        "wall_s": wall,
        "tokens_per_s": manifest["counts"]["tokens"] / wall if wall > 0 else None,
        "workers": num_workers,
    }
    write_json_atomic(directory / MANIFEST, manifest)
    return manifest


def validate(manifest: object, where: str) -> dict:
    """Check a manifest read from elsewhere before anything trusts it."""
    if not isinstance(manifest, dict):
        raise ManifestError(f"{where}: manifest is not a JSON object")
    if manifest.get("format") != FORMAT_NAME:
        raise ManifestError(f"{where}: not a teacher-cache manifest (format={manifest.get('format')!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ManifestError(
            f"{where}: format version {version!r} is not supported by this reader (reads v{FORMAT_VERSION}); "
            "upgrade teacher-cache or regenerate the cache"
        )
    for key in (*_HEADER_KEYS, "shards", "counts"):
        if key not in manifest:
            raise ManifestError(f"{where}: manifest lacks {key!r}")
    targets = manifest["targets"]
    if targets.get("kind") not in ("topk", "sampled"):
        raise ManifestError(f"{where}: unknown target kind {targets.get('kind')!r}")
    vocab = manifest["tokenizer"].get("vocab_size")
    if not isinstance(vocab, int) or vocab <= 0:
        raise ManifestError(f"{where}: tokenizer.vocab_size must be a positive integer")
    seen = set()
    for s in manifest["shards"]:
        name = s.get("name") if isinstance(s, dict) else None
        if not isinstance(name, str) or not SHARD_RE.match(name):
            raise ManifestError(f"{where}: bad shard name {name!r}")
        if name in seen:
            raise ManifestError(f"{where}: shard {name} listed twice")
        seen.add(name)
        for key in ("rows", "bytes"):
            if not isinstance(s.get(key), int) or s[key] < 0:
                raise ManifestError(f"{where}: shard {name} has no valid {key!r}")
        if not isinstance(s.get("sha256"), str) or not s["sha256"].startswith("sha256:"):
            raise ManifestError(f"{where}: shard {name} has no sha256")
    rows = sum(s["rows"] for s in manifest["shards"])
    if rows != manifest["counts"].get("samples"):
        samples = manifest["counts"].get("samples")
        raise ManifestError(f"{where}: shards hold {rows} rows but counts.samples is {samples}")
    return manifest
