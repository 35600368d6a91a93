"""A `teacher-cache run` worker's part file (parts/worker-IIIII-of-NNNNN.json): what an earlier
attempt of this worker left and may be resumed, the settings other workers' parts hold, and how
often this attempt rewrites its own."""

from __future__ import annotations

import time
from collections.abc import Callable

from teacher_cache.config import RunConfig, RunError
from teacher_cache.errors import plural
from teacher_cache.manifest import (
    MANIFEST,
    MAX_MANIFEST_BYTES,
    PARTS_DIR,
    header_differences,
    parse_part_name,
    part_name,
    part_path,
    read_part,
    worker_lock_name,
)
from teacher_cache.progress import log
from teacher_cache.records import file_sha256
from teacher_cache.storage import Location, holder


def durable_prefix(out: Location, shards: list[dict]) -> list[dict]:
    """The listed shards up to the first whose file is missing, of another size than listed
    (deleted, truncated or lost by the store) or, on a local disk, of another sha256 (damaged):
    a resume trusts only those and redoes the rest. Object stores are trusted by size (their
    objects are written whole; reading every shard back would download the cache)."""
    for i, entry in enumerate(shards):
        name = entry["name"]
        try:
            ok = out.exists(name) and out.size(name) == entry["bytes"]
            if ok and out.is_local:
                ok = file_sha256(str(out.local_path(name))) == entry.get("sha256")
        except OSError:
            ok = False
        if not ok:
            return shards[:i]
    return shards


def check_other_runs(cfg: RunConfig, out: Location, header: dict, chash: str) -> None:
    """Refuse, before any work, an --out holding shards of a run with other settings: other
    workers' parts (of this or another --num-workers, whose shards this run would overwrite or
    never assemble with) or a finished manifest. A part without shards is a failed start (ignored)
    unless a live run is writing it: its worker's lock held with that part's name as its note
    (this worker's index is not probed: this run holds that lock, or is refused it next)."""
    for name in out.glob(f"{PARTS_DIR}/*.json"):
        owner = parse_part_name(name.removeprefix(f"{PARTS_DIR}/"))
        if owner is None or owner == (cfg.worker_index, cfg.num_workers):
            continue  # not a part file; or this worker's own, which previous_part checks
        part = read_part(out, *owner)
        if part is None or part["config_hash"] == chash:
            continue
        if not part["shards"] and not part.get("complete"):
            held = None
            if out.is_local and owner[0] != cfg.worker_index:
                held = holder(out.local_path(worker_lock_name(owner[0])))
            if held is None or held[1] != part_name(*owner):
                continue
            raise RunError(
                f"{out}: worker {owner[0]} of {owner[1]} is being written now by a run with different settings "
                f"({differences(part, header)}); use another --out, or the arguments and data of that run"
            )
        raise RunError(
            f"{out} holds {plural(len(part['shards']), 'shard')} of worker {owner[0]} of {owner[1]}, made with "
            f"different settings ({differences(part, header)}); use another --out, or the arguments and data of "
            "that run"
        )
    if out.exists(MANIFEST):
        try:
            manifest = out.read_json(MANIFEST, MAX_MANIFEST_BYTES)
        except ValueError as e:  # damaged: a run writes it whole, from its parts/ (which rebuild it)
            hint = f"if {out} is this run's, delete that file and run again (parts/ rebuild it); else use another --out"
            raise RunError(f"{e}; {hint}") from None
        if not isinstance(manifest, dict) or manifest.get("config_hash") != chash:
            what = differences(manifest, header) if isinstance(manifest, dict) else "the settings differ"
            raise RunError(f"{out} holds a finished cache made with different settings ({what}); use another --out")


def differences(old: dict, header: dict) -> str:
    """Why an earlier run's config hash is not this run's, for messages: the settings that differ,
    or the older version that hashed the same settings another way."""
    found = header_differences(old, header)
    if found:
        return ", ".join(found) + " differ"
    return f"the same settings, hashed another way by teacher-cache {old.get('tool_version', 'of another version')}"


def previous_part(cfg: RunConfig, out: Location, header: dict, chash: str) -> dict | None:
    """This worker's part from an earlier attempt, cut to its durable shards; None if there is
    nothing to resume. Raises RunError if it was made with other settings or another engine."""
    previous = read_part(out, cfg.worker_index, cfg.num_workers)
    if previous is None or (not previous.get("shards") and not previous.get("complete")):
        return None  # none, or an attempt that failed before its first shard: nothing to keep or match
    if previous.get("config_hash") != chash:
        raise RunError(
            f"{out} holds {plural(len(previous.get('shards', [])), 'shard')} made with different settings "
            f"({differences(previous, header)}); use another --out, or the same arguments and data"
        )
    if previous.get("backend") != header["backend"]:
        was, now = previous.get("backend") or {}, header["backend"]

        def engine(b: dict) -> str:
            tp = b.get("tensor_parallel_size", 1)
            return f"{b.get('backend')}, vllm mode {b.get('vllm_mode')}, tensor parallel {tp}"

        raise RunError(
            f"{out}: worker {cfg.worker_index}'s shards were made with backend {engine(was)}; resume with the "
            f"same --backend / --vllm-mode / --tensor-parallel-size (got {engine(now)}) or use another --out"
        )
    kept = durable_prefix(out, previous["shards"])
    if len(kept) < len(previous["shards"]):
        lost = previous["shards"][len(kept)]["name"]
        log(
            f"{lost} is missing, or not the size or sha256 its part file says: "
            f"redoing worker {cfg.worker_index} from there"
        )
        previous = {**previous, "shards": kept, "complete": False, "redo": True}
    return previous


def new_part(cfg: RunConfig, header: dict, chash: str, previous: dict | None) -> dict:
    """This worker's part, not complete, going on from `previous` (its shards, engines and time)."""
    part = {**header, "config_hash": chash, "worker": cfg.worker_index, "complete": False, "shards": [], "engines": []}
    if previous is not None:
        part["shards"] = previous["shards"]
        part["engines"] = [e for e in previous.get("engines", []) if isinstance(e, dict)]
        part["elapsed_before_s"] = previous.get("timing", {}).get("wall_s", 0)  # every attempt's, so far
    return part


def write_part(cfg: RunConfig, out: Location, part: dict, bad: list[str], dups: list[int], wall_s: float) -> None:
    """The part file of a run in progress: its durable shards and the counts so far."""
    timing = {"wall_s": wall_s + part.get("elapsed_before_s", 0.0)}
    out.write_json(
        part_path(cfg.worker_index, cfg.num_workers), {**part, "counts": part_counts(part, bad, dups), "timing": timing}
    )


def part_counts(part: dict, bad: list[str], dups: list[int]) -> dict:
    shards = part["shards"]
    return {
        "samples": sum(s["rows"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards),
        "target_positions": sum(s["target_positions"] for s in shards),
        "truncated": sum(s["truncated"] for s in shards),
        "skipped_bad": len(bad) + sum(s["skipped_bad"] for s in shards),
        "duplicates": len(dups),
    }


class PartWrites:
    """Rewrites the part file after a shard when the writes so far leave room: each write waits
    until writing takes at most 2 % of the time. The part grows ~0.5 KB per shard and is rewritten
    whole (one PUT on object stores): after every one of 10^4 shards the writes would grow with the
    square of the count (22 GiB, minutes), and even writes of 5-50 ms took 20-60 % of a run of
    small, fast shards. Shards that take longer than 50 writes are each written at once. Those made
    since the last write are redone by a resume after a kill -9; a stop (an error, Ctrl-C) writes
    them first (`flush`)."""

    SHARE = 0.02

    def __init__(self) -> None:
        self._write: Callable[[], None] | None = None  # the latest shard's write, not yet done
        self._next = 0.0  # time.monotonic() before which no write is due

    def after_shard(self, write: Callable[[], None]) -> None:
        self._write = write
        if time.monotonic() >= self._next:
            self.flush()

    def flush(self) -> None:
        write, self._write = self._write, None
        if write is None:
            return
        start = time.monotonic()
        write()
        cost = time.monotonic() - start
        self._next = start + cost / self.SHARE
