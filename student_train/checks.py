"""Checks before the first step: the student reads the cache's ids the same way, and the caches
of one run (DAE mixes several) hold targets one batch can carry."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from student_train.config import TrainError


class IncompatibleCacheError(ValueError):
    """The cache cannot train this student (different tokenizer or format), or caches that
    cannot share a batch."""


def check_distinct(caches: list, option: str = "--cache") -> list[str]:
    """The caches' digests; TrainError if one is given twice (its samples would count twice), or
    if a shard is listed twice, in one cache or in two (by sha256: a cache copied with another
    manifest, a merged cache given with one of its sources, a shard copied under a second name)."""
    digests = [c.digest for c in caches]
    twice = [str(c.where) for i, c in enumerate(caches) if digests[i] in digests[:i]]
    if twice:
        raise TrainError(f"{twice[0]}: the same cache is given twice (same manifest); give each {option} once")
    first: dict[str, tuple[int, str]] = {}  # shard sha256 -> (the cache, where) it was first listed
    for i, cache in enumerate(caches):
        for entry in cache.manifest["shards"]:
            at = cache.where.describe(entry["name"])
            j, seen = first.setdefault(entry["sha256"], (i, at))
            if seen != at:  # a run's shards differ (each names itself in its metadata): these are copies
                # in two caches, each given once: one holds the other's shard (a merge and its source)
                fix = f"give {caches[j].where} or {cache.where} as {option}, not both"
                raise TrainError(
                    f"{at}: the same file as {seen} (same sha256): its samples would count twice; "
                    f"{'remove the copy from its manifest' if j == i else fix}"
                )
    return digests


def content_digest(cache) -> str:
    """sha256 of the cache's manifest without what the rows do not depend on: its `timing` (how
    fast the run went), its `config` (the arguments as typed: --out, --batch-size, --no-progress;
    the settings that decide the rows are in its header keys and config_hash) and where the teacher
    and data files were (provenance: each is named by its sha256). What a checkpoint records of
    its caches. A lost shard that `teacher-cache run` redid (the same bytes), from another working
    directory or without progress bars, rewrites the manifest with another timing and config, and
    a resume refused the cache as "the caches' contents" changed. Shards are listed with their
    sha256: rows that changed change this digest."""
    import hashlib
    import json

    from teacher_cache.manifest import content_settings

    kept = {k: v for k, v in cache.manifest.items() if k not in ("timing", "config")}
    kept.update({k: v for k, v in content_settings(cache.manifest).items() if k in kept})  # no paths
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def check_has_samples(caches: list) -> None:
    """ValueError when the caches' manifests count no sample: nothing to draw a batch from."""
    if not sum(c.manifest["counts"]["samples"] for c in caches):
        names = sorted(str(c.where) for c in caches)
        raise ValueError(f"no samples in {', '.join(names)}: {'they are' if len(names) > 1 else 'it is'} empty")


def check_has_targets(caches: list) -> None:
    """ValueError when the caches' manifests count no target position: every training step's loss
    would be 0, and an evaluation would measure nothing."""
    if not sum(c.manifest["counts"]["target_positions"] for c in caches):
        names = sorted(str(c.where) for c in caches)
        raise ValueError(f"no target positions in {', '.join(names)}: no sample has a token to learn")


def check_student_matches(tokenizer: Any, caches: list, *, attention: bool = False) -> None:
    """Refuse a student whose tokenizer differs from the caches', or caches that disagree on
    the format, the target kind or (with attention=True: the attention loss is on) the teacher
    layers their attention summaries come from. Caches may differ in top-k, attention top-k,
    num_draws and log-prob error bound: batches pad and weight each sample by its own."""
    from teacher_cache.tokenize import tokenizer_fingerprint

    mine = tokenizer_fingerprint(tokenizer)
    first = caches[0]
    for cache in caches:
        m = cache.manifest
        if m["tokenizer"]["fingerprint"] != mine:
            raise IncompatibleCacheError(
                f"{cache.where}: cached with tokenizer {m['tokenizer']['fingerprint'][:19]}..., the student's is "
                f"{mine[:19]}...: token ids would mean different things"
            )
        if m["format_version"] != first.manifest["format_version"]:
            raise IncompatibleCacheError(
                f"{cache.where}: format v{m['format_version']} mixed with v{first.manifest['format_version']}"
            )
        if m["targets"]["kind"] != first.manifest["targets"]["kind"]:
            raise IncompatibleCacheError(
                f"{cache.where}: {m['targets']['kind']} targets mixed with {first.manifest['targets']['kind']}"
            )
        if attention and cache.attention_layers != first.attention_layers:
            raise IncompatibleCacheError(
                f"{cache.where}: attention summaries of teacher layers {list(cache.attention_layers)}, "
                f"{first.where} has {list(first.attention_layers)}: the attention loss needs the same layers"
            )


def check_student_model(config: dict, caches: list) -> None:
    """From the student's config alone (check reads no weights; train and eval call it on the
    model they loaded): refuse an output layer with fewer rows than the caches' vocabulary (their
    targets and labels name ids it has no logit for: an index error mid-run), and caches whose
    sequences are longer than the positions the student was trained on (it would extrapolate
    there, rotary, or fail mid-run, learned position embeddings)."""
    from teacher_cache.models import position_limit

    rows, limit = config.get("vocab_size"), position_limit(config)
    for cache in caches:
        if isinstance(rows, int) and not isinstance(rows, bool) and rows < cache.vocab_size:
            raise IncompatibleCacheError(
                f"{cache.where}: token ids up to {cache.vocab_size - 1}, but the student's output layer has {rows} "
                "rows (vocab_size): the ids past it have no logit"
            )
    longer = longer_than(limit, caches) if limit is not None else None
    if longer:
        raise IncompatibleCacheError(
            f"{longer[0]}: sequences up to {longer[1]} tokens, past the {limit} positions the student "
            f"was trained on (max_position_embeddings): use caches made with --max-length <= {limit}"
        )


def longer_than(limit: int, caches: list) -> tuple[str, int] | None:
    """(where, data.max_length) of the first cache whose sequences may be longer than `limit`."""
    for cache in caches:
        longest = cache.manifest["data"]["max_length"]  # an int >= 2 (manifest.validate)
        if longest > limit:
            return str(cache.where), longest
    return None


def template_differs(tokenizer: Any, caches: list) -> str | None:
    """A warning when the student's chat template is not the one the caches' samples were formatted
    with: the ids mean the same, so training is sound, but the student learns the cache's format and
    must be prompted that way, not with its own template. None when every cache's template is its own."""
    from teacher_cache.tokenize import chat_template_hash

    mine = chat_template_hash(tokenizer)
    other = [str(c.where) for c in caches if c.manifest["tokenizer"].get("chat_template_sha256") != mine]
    if not other:
        return None
    return (
        f"the student's chat template is not the one {', '.join(other)} formatted its samples with: the student "
        "learns that format (prompt it so, e.g. with the teacher's tokenizer's template), not its own"
    )


def _data_files(data: dict) -> set[str]:
    """The sha256 of the data files a cache was made from (its manifest's data section)."""
    entries = data.get("files")
    entries = entries if isinstance(entries, list) else []
    return {f["sha256"] for f in entries if isinstance(f, dict) and isinstance(f.get("sha256"), str)}


def may_share_samples(a: dict, b: dict) -> bool:
    """Whether two caches' data settings can hold the same sample: a data file in common (sha256)
    and domain filters that let one domain through both."""
    from teacher_cache.manifest import excluded_domains

    if not _data_files(a) & _data_files(b):
        return False
    only_a, only_b = a.get("only_domain"), b.get("only_domain")
    if only_a is not None and only_b is not None:
        return only_a == only_b
    if only_a is not None:
        return only_a not in excluded_domains(b)
    if only_b is not None:
        return only_b not in excluded_domains(a)
    return True  # both general: each keeps every domain the other does not exclude, "none" included


def repeated_samples(caches: list) -> str | None:
    """A warning when two caches of one kind (both general, or both experts of one domain) may hold
    the same samples (`may_share_samples`): each such sample is trained once per cache (the same
    data cached again with another --shard-size, or by a second teacher). A domain cache beside a
    general one: `domain_overlap`. None when no such pair is seen."""
    for i, a in enumerate(caches):
        for b in caches[i + 1 :]:
            da, db = a.manifest["data"], b.manifest["data"]
            if da.get("only_domain") == db.get("only_domain") and may_share_samples(da, db):
                return (
                    f"{a.where} and {b.where} were made from the same data files: the samples both hold "
                    "are trained once per cache"
                )
    return None


def domain_overlap(caches: list) -> str | None:
    """A warning when a general cache (no --only-domain) was made from the same data files as a
    domain cache (--only-domain D) but without --exclude-domain D: it holds D's samples too, so a
    DAE mix trains them against both teachers. None when no such pair is seen (caches made from
    other files are not compared: their ids are not read)."""
    from teacher_cache.manifest import excluded_domains

    experts = sorted({c.manifest["data"].get("only_domain") for c in caches} - {None})
    remake = " ".join(f"--exclude-domain {e}" for e in experts)  # every expert's domain, left out at once
    for d in caches:
        domain = d.manifest["data"].get("only_domain")
        for g in caches if domain else ():
            data = g.manifest["data"]
            if (
                data.get("only_domain") is None
                and domain not in excluded_domains(data)
                and _data_files(data) & _data_files(d.manifest["data"])
            ):
                return (
                    f"{g.where} was made from the same data as the domain cache {d.where} without "
                    f"--exclude-domain {domain}: its {domain!r} samples are trained against both teachers "
                    f"(remake it with {remake})"
                )
    return None


def attention_layer_map(mapping: tuple[tuple[int, int], ...], caches: list, config: Any) -> list[tuple[int, int]]:
    """With the attention loss on: [(index in the caches' attention layers, student layer)] from
    --attention-layer-map's (teacher layer, student layer) pairs (() = identity), refused when a
    teacher layer is not cached, a student layer does not exist in `config` (the student's
    transformers config), or a mapped student layer's sliding window is shorter than the caches'
    sequences (rows on keys beyond it would have an infinite KL). Reads no weight: check and
    train call it alike."""
    from teacher_cache.attention import layer_windows

    cached = caches[0].attention_layers  # the same in every cache (check_student_matches, attention=True)
    if not cached:
        raise TrainError("--attn-weight > 0 but the cache holds no attention summaries (cache with --attention-layers)")
    pairs = dict(mapping) if mapping else {t: t for t in cached}
    unknown = [t for t in pairs if t not in cached]
    if unknown:
        raise TrainError(f"--attention-layer-map names teacher layers {unknown} not in the cache ({list(cached)})")
    n = config.num_hidden_layers
    bad = [s for s in pairs.values() if not 0 <= s < n]
    if bad:
        raise TrainError(f"student layers {bad} out of range: the student has {n} layers")
    layer_map = [(cached.index(t), s) for t, s in sorted(pairs.items())]
    windows = layer_windows(config)  # None: full causal attention
    window = min((windows[s] for _, s in layer_map if windows[s] is not None), default=None)
    longer = longer_than(window, caches) if window is not None else None
    if longer:
        raise TrainError(
            f"{longer[0]}: sequences up to {longer[1]} tokens, but the student attends within a sliding "
            f"window of {window}: the attention loss needs caches made with --max-length <= {window}"
        )
    return layer_map


def check_temperature(kind: str, temperature: float) -> None:
    """Refuse a KD temperature other than 1 with sampled caches: their draws come from the
    teacher at temperature 1 and estimate p, not p^(1/T), so the loss would train the student's
    own distribution towards p^T (a sharper teacher). Top-k caches are tempered as k + 1 outcomes,
    the student's alike (losses.topk_kl)."""
    if kind == "sampled" and temperature != 1.0:
        raise IncompatibleCacheError(
            f"--temperature {temperature:g} with a sampled cache: its draws come from the teacher at temperature 1 "
            "and cannot be re-tempered (the student would learn a sharpened teacher); use --temperature 1 or a "
            "top-k cache"
        )


def check_output_file(out: str, what: str, ours: Callable[[bytes], bool]) -> Path:
    """--out for a report or a plot, checked before the work: a local path (not a URL) in an
    existing folder that is not a teacher cache (nor inside one), and either new or an earlier
    file of this kind (`ours` on its first bytes); never a cache's, a run's or any other file."""
    from teacher_cache.cache import inside_cache
    from teacher_cache.storage import is_url

    if is_url(out):
        raise TrainError(f"--out {out}: a local path is needed (write here, then copy it to the store)")
    path = Path(out)
    if not path.resolve().parent.is_dir():
        raise TrainError(f"--out {out}: folder {path.resolve().parent} does not exist")
    cache = inside_cache(path.resolve().parent)
    if cache is not None:
        raise TrainError(f"--out {out} is inside the teacher cache {cache}: write it elsewhere")
    if path.is_dir():
        raise TrainError(f"--out {out} is a folder, not a file for {what}")
    if path.exists():
        with open(path, "rb") as f:
            head = f.read(1 << 16)
        if not ours(head):
            raise TrainError(f"--out {out} exists and is not {what}: it is left as it is; choose another path")
    return path
