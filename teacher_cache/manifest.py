"""The manifest: what made a cache, what it holds, and checks for caches from elsewhere.

Each worker keeps its own part file, `parts/worker-IIIII-of-NNNNN.json`, rewritten
atomically after durable shards (`parts.PartWrites`); it is the worker's resume point. When every
part is complete, `manifest.json` is assembled from them (deterministically, so
workers finishing together write the same bytes).
"""

from __future__ import annotations

import hashlib
import json
import re

from teacher_cache.codec import READ_VERSIONS as CODEC_READ_VERSIONS
from teacher_cache.codec import step_units
from teacher_cache.shards import FORMAT_VERSION, MAX_CHUNK_BYTES, MIN_CHUNK_BYTES, SHARD_RE
from teacher_cache.storage import Location

MANIFEST = "manifest.json"
PARTS_DIR = "parts"
FORMAT_NAME = "teacher-cache"
MAX_MANIFEST_BYTES = 256 << 20  # a manifest or part file claiming more is refused unread
LOGPROB_SCALE = "natural log, raw"  # targets.logprobs: raw teacher log-probs at temperature 1
MAX_NUM_DRAWS = 1 << 16  # sampled targets: the most draws per position (the sampler holds int64 [P, draws] arrays)
COUNT_KEYS = ("samples", "tokens", "target_positions", "truncated", "skipped_bad", "duplicates")
# fields whose equality makes two caches' rows interchangeable (see `compatibility_key`)
_HEADER_KEYS = ("format", "format_version", "teacher", "tokenizer", "targets", "attention", "data", "source")


class ManifestError(ValueError):
    """A manifest that is missing, malformed, or from an unsupported format."""


def part_name(worker: int, num_workers: int) -> str:
    return f"worker-{worker:05d}-of-{num_workers:05d}.json"


def worker_lock_name(worker: int) -> str:
    """The lock file a running worker holds in its --out (per worker index, whatever --num-workers)."""
    return f"{PARTS_DIR}/.worker-{worker:05d}.lock"


def parse_part_name(name: str) -> tuple[int, int] | None:
    """(worker, num_workers) of a part file's name (as part_name makes it), else None."""
    m = re.fullmatch(r"worker-(\d{5})-of-(\d{5})\.json", name)
    return (int(m[1]), int(m[2])) if m else None


def content_settings(header: dict) -> dict:
    """The header keys that decide a cache's rows, without where things were on the machine that
    made it: the teacher's `name` / `path` and the data files' `path`s are provenance (its
    config, weights and each file are identified by sha256), so the same checkpoint and data at
    another path or from another working directory is the same run."""
    view = {k: header.get(k) for k in _HEADER_KEYS}
    if isinstance(view["teacher"], dict):
        view["teacher"] = {k: v for k, v in view["teacher"].items() if k not in ("name", "path")}
    data = view["data"]
    if isinstance(data, dict) and isinstance(data.get("files"), list):
        files = [{k: v for k, v in f.items() if k != "path"} if isinstance(f, dict) else f for f in data["files"]]
        view["data"] = {**data, "files": files}
    return view


def config_hash(header: dict) -> str:
    """sha256 over the settings that decide a cache's content (`content_settings`); every shard's
    metadata carries it."""
    blob = json.dumps(content_settings(header), sort_keys=True).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def config_hash_v010(header: dict) -> str:
    """The config hash as teacher-cache 0.1.0 computed it: over the header keys, paths included."""
    blob = json.dumps({k: header.get(k) for k in _HEADER_KEYS}, sort_keys=True).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def runs_of(manifest: dict) -> list[dict]:
    """The runs whose rows a cache holds, each as {"config_hash", "settings": its hashed header
    keys}: a run's own, or a merged cache's `runs` (sources merged before are flattened)."""
    if manifest.get("merged_from") is None:
        return [{"config_hash": manifest["config_hash"], "settings": {k: manifest.get(k) for k in _HEADER_KEYS}}]
    return manifest["runs"]


def merged_data(runs: list[dict]) -> dict:
    """The data settings a merged cache's reader goes by, from its runs': the longest max_length
    (every row is bounded by it) and a domain filter only where every run has the same one."""
    data = [r["settings"]["data"] for r in runs]
    merged = {"max_length": max(d["max_length"] for d in data)}
    for key in ("only_domain", "exclude_domain"):  # a str, a list or None
        values = {json.dumps(d.get(key)) for d in data}
        merged[key] = json.loads(values.pop()) if len(values) == 1 else None
    return merged


def merged_config_hash(merged_from: list[dict]) -> str:
    """A merged cache's config hash: sha256 over its sources' config hashes, sorted."""
    return "sha256:" + hashlib.sha256(json.dumps(sorted(m["config_hash"] for m in merged_from)).encode()).hexdigest()


def header_differences(a: dict, b: dict, limit: int = 3) -> list[str]:
    """Dotted paths of the settings (`content_settings`) where two run headers differ, e.g.
    ["data.files[0].sha256"]; at most `limit`."""
    out: list[str] = []

    def walk(x: object, y: object, path: str) -> None:
        if len(out) >= limit or x == y:
            return
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y), key=str):
                walk(x.get(k), y.get(k), f"{path}.{k}" if path else str(k))
        elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            for i, (u, v) in enumerate(zip(x, y, strict=True)):
                walk(u, v, f"{path}[{i}]")
        else:
            out.append(path)

    walk(content_settings(a), content_settings(b), "")
    return out


def combine_backends(backends: list[dict]) -> dict:
    """One `backend` entry for rows made by several runs: the common one, or "mixed" with each."""
    if all(b == backends[0] for b in backends):
        return backends[0]
    return {"backend": "mixed", "vllm_mode": None, "parts": backends}


def codec_version(headers: list[dict]) -> int:
    """The codec version a reader needs for rows from these runs or caches: the highest one
    (blocks are self-describing; headers from before it was recorded mean version 1)."""
    return max(h.get("codec_version", 1) for h in headers)


def part_path(worker: int, num_workers: int) -> str:
    """A worker's part file, relative to the cache."""
    return f"{PARTS_DIR}/{part_name(worker, num_workers)}"


def read_part(where: Location, worker: int, num_workers: int) -> dict | None:
    """A worker's part file, or None if it has not written one."""
    name = part_path(worker, num_workers)
    if not where.exists(name):
        return None
    try:
        part = where.read_json(name, MAX_MANIFEST_BYTES)
    except ValueError as e:
        raise ManifestError(f"{e}; delete it to redo this worker's shards") from None
    why = _part_problem(part)
    if why:
        raise ManifestError(
            f"{where.describe(name)}: malformed worker part ({why}); delete it to redo this worker's shards"
        )
    return part


def _part_problem(part: object) -> str | None:
    """What is wrong with a worker part's types (what run and assemble read), or None."""
    if not isinstance(part, dict):
        return "not an object"
    if not isinstance(part.get("config_hash"), str):
        return "config_hash must be a string"
    shards = part.get("shards")
    if not isinstance(shards, list):
        return "shards must be a list"
    for s in shards:
        if not (
            isinstance(s, dict) and isinstance(s.get("name"), str) and _int(s.get("rows")) and _int(s.get("bytes"))
        ):
            return "each shard needs a name, rows and bytes"
        if not SHARD_RE.match(s["name"]):
            return f"bad shard name {s['name']!r}"
    engines = part.get("engines", [])
    if not (isinstance(engines, list) and all(isinstance(e, dict) for e in engines)):
        return "engines must be a list of objects"
    if part.get("complete"):
        if any(k not in part for k in _HEADER_KEYS):
            return "it lacks the run's header keys"
        counts, timing = part.get("counts"), part.get("timing")
        if not (isinstance(counts, dict) and all(_int(counts.get(k)) for k in COUNT_KEYS)):
            return f"counts must hold {COUNT_KEYS}"
        if not (isinstance(timing, dict) and isinstance(timing.get("wall_s"), (int, float))):
            return "timing.wall_s must be a number"
        if not all(isinstance(part.get(k), dict) for k in ("backend", "config")):
            return "backend and config must be objects"
    return None


def union_engines(lists: list[list[dict]]) -> list[dict]:
    """Each distinct engine description (backend, device, library versions) once, in order."""
    out: list[dict] = []
    for e in (e for engines in lists for e in engines):
        if e not in out:
            out.append(e)
    return out


def assemble(where: Location, num_workers: int) -> dict | None:
    """Combine complete parts into manifest.json; None while a worker is unfinished."""
    parts = []
    for w in range(num_workers):
        part = read_part(where, w, num_workers)
        if part is None or not part.get("complete"):
            return None
        parts.append(part)
    head = parts[0]
    for w, p in enumerate(parts):
        if p["config_hash"] != head["config_hash"]:
            differ = ", ".join(header_differences(head, p)) or "config_hash"  # a hash alone: parts edited by hand
            raise ManifestError(
                f"{where}: worker {w} of {num_workers} was run with other settings than worker 0 ({differ} differ): "
                f"rerun it with worker 0's settings after deleting its part file {part_path(w, num_workers)}"
            )
    manifest = {k: head[k] for k in (*_HEADER_KEYS, "config_hash", "tool_version", "config")}
    manifest["backend"] = combine_backends([p["backend"] for p in parts])  # workers may run other engines
    manifest["codec_version"] = codec_version(parts)  # a resumed run may span versions
    manifest["config"] = {k: v for k, v in head["config"].items() if k != "worker_index"}
    manifest["shards"] = [s for p in parts for s in p["shards"]]
    manifest["engines"] = union_engines([p.get("engines") or [] for p in parts])
    manifest["counts"] = {k: sum(p["counts"][k] for p in parts) for k in COUNT_KEYS}
    manifest["bad_records"] = [b for p in parts for b in p.get("bad_records", [])]
    wall = max(p["timing"]["wall_s"] for p in parts)
    manifest["timing"] = {
        "wall_s": wall,
        "tokens_per_s": manifest["counts"]["tokens"] / wall if wall > 0 else None,
        "workers": num_workers,
    }
    where.write_json(MANIFEST, manifest)
    return manifest


def validate(manifest: object, where: str) -> dict:
    """Check a manifest read from elsewhere before anything trusts it."""
    if not isinstance(manifest, dict):
        raise ManifestError(f"{where}: manifest is not a JSON object")
    if manifest.get("format") != FORMAT_NAME:
        raise ManifestError(f"{where}: not a teacher-cache manifest (format={manifest.get('format')!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):  # true == 1 to Python
        raise ManifestError(
            f"{where}: format version {version!r} is not supported by this reader (reads v{FORMAT_VERSION}); "
            "upgrade teacher-cache or regenerate the cache"
        )
    for key in (*_HEADER_KEYS, "shards", "counts"):
        if key not in manifest:
            raise ManifestError(f"{where}: manifest lacks {key!r}")
    codec = codec_version([manifest])
    if codec not in CODEC_READ_VERSIONS or isinstance(codec, bool):
        raise ManifestError(
            f"{where}: codec version {codec!r} is not supported by this reader (reads "
            f"{', '.join(map(str, CODEC_READ_VERSIONS))}); upgrade teacher-cache"
        )
    _check_types(manifest, where)
    seen = set()
    for s in manifest["shards"]:
        name = s.get("name") if isinstance(s, dict) else None
        if not isinstance(name, str) or not SHARD_RE.match(name):
            raise ManifestError(f"{where}: bad shard name {name!r}")
        if name in seen:
            raise ManifestError(f"{where}: shard {name} listed twice")
        seen.add(name)
        for key in ("rows", "bytes"):
            if not _int(s.get(key)):  # a bool is an int to Python, not a count
                raise ManifestError(f"{where}: shard {name} has no valid {key!r}")
        if s["rows"] > s["bytes"]:  # every row takes bytes; readers size their sample index by rows
            raise ManifestError(f"{where}: shard {name} lists {s['rows']} rows in {s['bytes']} bytes")
        if not isinstance(s.get("sha256"), str) or not s["sha256"].startswith("sha256:"):
            raise ManifestError(f"{where}: shard {name} has no sha256")
        if "config_hash" in s and not isinstance(s["config_hash"], str):  # merged caches: the run that wrote it
            raise ManifestError(f"{where}: shard {name} has a config_hash that is not a string")
        _check_chunks(s, where)
    _check_config_hash(manifest, where)
    rows = sum(s["rows"] for s in manifest["shards"])
    if rows != manifest["counts"].get("samples"):
        samples = manifest["counts"].get("samples")
        raise ManifestError(f"{where}: shards hold {rows} rows but counts.samples is {samples}")
    return manifest


def _check_config_hash(m: dict, where: str) -> None:
    """The config hash is recomputed, not taken on trust: a manifest whose settings were edited
    after the run (its shards carry the hash of the settings they were made with) is refused.
    A run's manifest hashes its settings (either way teacher-cache has hashed them); a merged one
    hashes its sources' hashes, and only its shard entries carry a hash of their own."""
    merged = m.get("merged_from")
    if merged is None:
        own = next((s.get("name") for s in m["shards"] if isinstance(s, dict) and "config_hash" in s), None)
        if own is not None:
            raise ManifestError(f"{where}: shard {own} has a config_hash of its own, which only a merged cache's have")
        if m["config_hash"] not in (config_hash(m), config_hash_v010(m)):
            raise ManifestError(
                f"{where}: its settings do not hash to its config_hash: edited after the run "
                "(its shards were made with other settings)"
            )
        return
    ok = isinstance(merged, list) and all(isinstance(e, dict) and isinstance(e.get("config_hash"), str) for e in merged)
    if not ok or not merged:
        raise ManifestError(f"{where}: merged_from must list each source's config_hash")
    if m["config_hash"] != merged_config_hash(merged):
        raise ManifestError(f"{where}: merged_from does not hash to its config_hash: edited after the merge")
    bare = next((s.get("name") for s in m["shards"] if isinstance(s, dict) and "config_hash" not in s), None)
    if bare is not None:
        raise ManifestError(f"{where}: shard {bare} of a merged cache has no config_hash")
    _check_runs(m, where)


def _check_runs(m: dict, where: str) -> None:
    """A merged cache's settings are bound to its shards through `runs`: each run's settings hash
    to its config_hash, every shard names one of them, and the settings that decide how rows are
    read (tokenizer, teacher, targets, attention, source; data's max_length and domain filter)
    are the runs' own. Else its manifest could say anything its merge did not check."""
    runs = m.get("runs")
    ok = isinstance(runs, list) and runs and all(
        isinstance(r, dict) and isinstance(r.get("config_hash"), str) and isinstance(r.get("settings"), dict)
        and isinstance(r["settings"].get("data"), dict) and _int(r["settings"]["data"].get("max_length"), 2)
        for r in runs
    )  # fmt: skip
    if not ok:
        raise ManifestError(
            f"{where}: a merged cache must list the settings of the runs its shards come from (runs); one "
            "merged before teacher-cache 0.2.1 has none: merge its sources again"
        )
    for r in runs:
        if r["config_hash"] not in (config_hash(r["settings"]), config_hash_v010(r["settings"])):
            raise ManifestError(
                f"{where}: runs: settings that do not hash to {r['config_hash']}: edited after the merge"
            )
        differ = header_differences({**m, "data": None}, {**r["settings"], "data": None})
        if differ:
            raise ManifestError(
                f"{where}: {', '.join(differ)} differ from the run {r['config_hash']} its shards come from: "
                "edited after the merge"
            )
    hashes = {r["config_hash"] for r in runs}
    stray = next((s["name"] for s in m["shards"] if s["config_hash"] not in hashes), None)
    if stray is not None:
        raise ManifestError(f"{where}: shard {stray} names a run (config_hash) that runs does not list")
    data = m["data"]
    expected = merged_data(runs)
    differ = [f"data.{k}" for k, v in expected.items() if data.get(k) != v]
    if differ:
        raise ManifestError(f"{where}: {', '.join(differ)} differ from what its runs give: edited after the merge")


def _int(v: object, least: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def excluded_domains(data: dict) -> set[str]:
    """A manifest's data.exclude_domain (None, one domain or a list) as a set."""
    d = data.get("exclude_domain")
    return set() if d is None else {d} if isinstance(d, str) else set(d)


def _opt_str(v: object) -> bool:
    return v is None or isinstance(v, str)


def _check_types(m: dict, where: str) -> None:
    """Every field a reader, `inspect`, `merge` or the trainer uses has the type they assume."""

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ManifestError(f"{where}: {what}")

    t = m["teacher"]
    need(isinstance(t, dict) and isinstance(t.get("name"), str), "teacher must be an object with a name")
    keys = ("path", "hub_id", "revision", "dtype", "config_sha256", "weights_sha256")
    need(all(_opt_str(t.get(k)) for k in keys), "bad teacher field")
    tok = m["tokenizer"]
    need(isinstance(tok, dict) and isinstance(tok.get("fingerprint"), str), "tokenizer must have a fingerprint")
    need(_opt_str(tok.get("chat_template_sha256")), "tokenizer.chat_template_sha256 must be a string")
    vocab = tok.get("vocab_size")  # the codec's blocks hold it in 32 bits
    need(_int(vocab, 1) and vocab < 1 << 32, "tokenizer.vocab_size must be an integer in [1, 2**32)")
    targets = m["targets"]
    need(isinstance(targets, dict), "targets must be an object")
    kind = targets.get("kind")
    need(kind in ("topk", "sampled"), f"unknown target kind {kind!r}")
    if kind == "topk":
        need(_int(targets.get("k"), 1), "targets.k must be a positive integer")
    else:
        draws = targets.get("num_draws")
        need(_int(draws, 1) and draws <= MAX_NUM_DRAWS, f"targets.num_draws must be an integer in [1, {MAX_NUM_DRAWS}]")
        # counts / num_draws estimate the teacher's probabilities only for draws from the teacher
        need(targets.get("proposal") == "teacher", f"targets.proposal {targets.get('proposal')!r} is not 'teacher'")
    # the losses apply the student's --temperature to raw teacher log-probs, so any other scale is refused
    temp = targets.get("temperature")
    need(not isinstance(temp, bool) and temp == 1.0, f"targets.temperature {temp!r} is not 1.0")
    scale = targets.get("logprobs")
    need(scale == LOGPROB_SCALE, f"targets.logprobs {scale!r} is not {LOGPROB_SCALE!r}")
    att = m["attention"]
    need(att is None or isinstance(att, dict), "attention must be an object or null")
    if att is not None:
        layers = att.get("layers")
        need(isinstance(layers, list) and all(_int(x) for x in layers), "attention.layers must list layer indices")
        need(_int(att.get("top_k"), 1), "attention.top_k must be a positive integer")
    for name, spec in (("targets", targets), ("attention", att or {})):
        if "logprob_error" in spec:  # absent in caches made before it was a setting: 0.02
            try:
                step_units(spec["logprob_error"])
            except ValueError as e:
                raise ManifestError(f"{where}: {name}.logprob_error: {e}") from None
    data = m["data"]
    need(isinstance(data, dict) and isinstance(data.get("files"), list), "data must list its files")
    need(all(isinstance(f, dict) and isinstance(f.get("path"), str) for f in data["files"]), "bad data.files entry")
    excluded = data.get("exclude_domain")  # one domain, or a list of several
    several = isinstance(excluded, list) and all(isinstance(d, str) for d in excluded)
    need(_opt_str(data.get("only_domain")) and (_opt_str(excluded) or several), "bad data domain filter")
    # the reader refuses longer rows; the trainer sizes its checks by it
    need(_int(data.get("max_length"), 2), "data.max_length must be an integer >= 2")
    need(isinstance(m["source"], str), "source must be a string")
    need(isinstance(m.get("config_hash"), str), "config_hash must be a string")
    counts = m["counts"]
    need(isinstance(counts, dict), "counts must be an object")
    bad = [k for k in COUNT_KEYS if not _int(counts.get(k))]
    need(not bad, f"counts.{bad[0] if bad else ''} must be a non-negative integer")
    need(isinstance(m["shards"], list), "shards must be a list")
    engines = m.get("engines")
    need(engines is None or (isinstance(engines, list) and all(isinstance(e, dict) for e in engines)), "bad engines")
    for key, typ in (("backend", dict), ("timing", dict), ("bad_records", list), ("tool_version", str)):
        need(key not in m or isinstance(m[key], typ), f"{key} must be a {typ.__name__}")


def _check_chunks(shard: dict, where: str) -> None:
    """`chunks` (optional): {"size": n, "sha256": [hex, ...]}, one hash per n bytes of the shard."""
    chunks = shard.get("chunks")
    if not chunks:
        return
    name, size = shard["name"], chunks.get("size") if isinstance(chunks, dict) else None
    if not _int(size, MIN_CHUNK_BYTES) or size > MAX_CHUNK_BYTES:
        raise ManifestError(f"{where}: shard {name} has a chunk size outside [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}]")
    hashes = chunks.get("sha256")
    if (
        not isinstance(hashes, list)
        or len(hashes) != max(1, -(-shard["bytes"] // size))
        or not all(isinstance(h, str) and re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes)
    ):
        raise ManifestError(f"{where}: shard {name} chunk hashes do not cover its {shard['bytes']} bytes")
