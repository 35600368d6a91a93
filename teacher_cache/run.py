"""Stage one: records -> tokens -> teacher forward -> targets -> codec -> shards -> manifest.

`run(cfg)` is the Python API behind `teacher-cache run`. Work is cut into shards of
`shard_size` samples, deterministically from the data and the worker split, so a
restarted run redoes only shards that were not durable when it stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import torch

from teacher_cache import __version__, codec, progress
from teacher_cache.backends import EngineFailure, TeacherBackend, TeacherOutput
from teacher_cache.cache import inside_cache
from teacher_cache.config import RunConfig, RunError, same_file
from teacher_cache.errors import first_of, one_line, plural
from teacher_cache.manifest import (
    FORMAT_NAME,
    LOGPROB_SCALE,
    MANIFEST,
    PARTS_DIR,
    assemble,
    config_hash,
    parse_part_name,
    part_name,
    part_path,
    union_engines,
    worker_lock_name,
)
from teacher_cache.models import ModelRef, resolve_model, weight_files, weights_sha256
from teacher_cache.parts import PartWrites, check_other_runs, new_part, part_counts, previous_part, write_part
from teacher_cache.preflight import (
    backend_name,
    check_attention_layers,
    check_positions,
    check_vocab,
    local_config,
    stock_mode,
    stock_padded_message,
    vocab_message,
)
from teacher_cache.progress import log
from teacher_cache.records import BadRecordError, Record, check_data_file, file_sha256, iter_records
from teacher_cache.shards import (
    FORMAT_VERSION,
    SHARD_RE,
    Row,
    ShardWriter,
    is_cache_file,
    shard_name,
    spool_glob,
)
from teacher_cache.storage import (
    Location,
    LockedError,
    StorageError,
    exclusive,
    remove_if_unused,
    sweep_atomic_temps,
)
from teacher_cache.targets import TopKTargets, attention_summary, sampled_from_logits, topk_from_logits
from teacher_cache.tokenize import (
    Tokenized,
    chat_template_hash,
    load_tokenizer,
    special_text_finder,
    tokenize_record,
    tokenizer_fingerprint,
)


def _belongs_to(sample_id: str, worker: int, num_workers: int) -> bool:
    h = int.from_bytes(hashlib.sha256(sample_id.encode()).digest()[:8], "little")
    return h % num_workers == worker


def _sample_seed(seed: int, sample_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()[:8], "little") >> 1


def _my_records(
    cfg: RunConfig, bad: list[str], dups: list[int], excluded_seen: set[str] | None = None
) -> Iterator[Record]:
    """This worker's records in data order: domain filter (the excluded domains met are added to
    `excluded_seen`), worker split, duplicate check."""
    seen: dict[str, bytes] = {}  # sample id -> content digest (32 bytes: millions of records per worker)
    # a record that does not parse has no id to place it: worker 0 alone lists it (the others skip it)
    parse_bad = bad if cfg.worker_index == 0 else []
    for rec in iter_records(list(cfg.data), skip_bad=cfg.skip_bad, bad=parse_bad):
        if not _kept(cfg, rec, excluded_seen):
            continue
        digest = hashlib.sha256(json.dumps([rec.domain, rec.messages], sort_keys=True).encode()).digest()
        if rec.sample_id in seen:
            if seen[rec.sample_id] != digest:
                why = f"id {rec.sample_id!r} reused for different content"
                if not cfg.skip_bad:  # the run stops here: worth one more read to name the first use
                    why += f" (first at {_first_use(cfg, rec.sample_id)}); rerun with --skip-bad to skip such records"
                    raise BadRecordError(rec.where, why)
                bad.append(str(BadRecordError(rec.where, why)))
            else:
                dups.append(1)
            continue
        seen[rec.sample_id] = digest
        yield rec


def _kept(cfg: RunConfig, rec: Record, excluded_seen: set[str] | None = None) -> bool:
    """The record passes the domain filter (an excluded domain met is added to `excluded_seen`) and
    falls to this worker."""
    if cfg.only_domain is not None and rec.domain != cfg.only_domain:
        return False
    if rec.domain in cfg.excluded:
        if excluded_seen is not None:
            excluded_seen.add(rec.domain)
        return False
    return _belongs_to(rec.sample_id, cfg.worker_index, cfg.num_workers)


def _first_use(cfg: RunConfig, sample_id: str) -> str:
    """Where this worker's records first use `sample_id` ("file:line")."""
    for rec in iter_records(list(cfg.data), skip_bad=True):
        if rec.sample_id == sample_id and _kept(cfg, rec):
            return rec.where
    return "an earlier record"  # not reached: the id was seen


def _chunks(items: Iterator[Record], size: int) -> Iterator[list[Record]]:
    chunk: list[Record] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _weights_sha256(ref: ModelRef) -> str | None:
    """The local teacher's weights_sha256 (None for a hub teacher: hub_id + revision name it)."""
    if not ref.is_local:
        return None
    size = sum(p.stat().st_size for p in weight_files(ref.path))
    if size > 1 << 30:  # ~1 s per GB: say why the start is slow
        log(f"hashing the teacher's weights ({size / 2**30:.1f} GiB) to record which ones made this cache")
    return weights_sha256(ref.path)


def _header(cfg: RunConfig, ref: ModelRef, tok, backend_info: dict) -> dict:
    config_file = Path(ref.path) / "config.json" if ref.is_local else None
    teacher_cfg = config_file.read_bytes() if config_file and config_file.is_file() else b""
    attention = None
    if cfg.attention_layers:
        attention = {
            "layers": list(cfg.attention_layers),
            "top_k": cfg.attention_top_k,
            "logprob_error": cfg.logprob_error,
            "reduction": "mean over heads",
            "source": "hf" if backend_info["backend"] == "hf" else "hf pass beside vllm",
        }
    targets = {"kind": cfg.targets, "temperature": 1.0, "logprobs": LOGPROB_SCALE}
    if cfg.targets == "topk":
        targets.update(k=cfg.top_k, logprob_error=cfg.logprob_error)
    else:
        targets.update(num_draws=cfg.num_draws, proposal="teacher")
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "codec_version": codec.CODEC_VERSION,
        "tool_version": __version__,
        "teacher": {
            "name": ref.name,
            "path": ref.path if ref.is_local else None,
            "hub_id": None if ref.is_local else ref.path,
            "revision": ref.revision,
            "dtype": ref.dtype,
            "config_sha256": "sha256:" + hashlib.sha256(teacher_cfg).hexdigest() if teacher_cfg else None,
            "weights_sha256": _weights_sha256(ref),
        },
        "tokenizer": {
            "fingerprint": tokenizer_fingerprint(tok),
            "chat_template_sha256": chat_template_hash(tok),
            "vocab_size": len(tok),
        },
        "targets": targets,
        "attention": attention,
        "data": {
            "files": [{"path": same_file(p), "sha256": file_sha256(p)} for p in cfg.data],
            "only_domain": cfg.only_domain,
            "exclude_domain": cfg.exclude_header,
            "max_length": cfg.max_length,
            "shard_size": cfg.shard_size,
            "num_workers": cfg.num_workers,
            "seed": cfg.seed,
        },
        "source": cfg.source or ref.source,  # a checkpoint's folder name, not the path typed
        "backend": backend_info,
        "config": asdict(cfg),
    }


def _make_backend(cfg: RunConfig, ref: ModelRef) -> tuple[TeacherBackend, TeacherBackend | None]:
    """The engine for the targets, and an hf engine beside vLLM for attention summaries (or None)."""
    from teacher_cache.backends import vllm_available

    name = backend_name(cfg)
    if name == "vllm":
        if not vllm_available():
            raise RunError("backend vllm requested but vLLM is not installed (make install, or --backend hf)")
        from teacher_cache.backends.vllm_backend import VllmBackend

        main = VllmBackend(
            ref,
            mode=cfg.vllm_mode,
            top_k=cfg.top_k,
            # the generate runner needs room for one more token than the longest (truncated) prompt
            max_model_len=cfg.max_length + (cfg.vllm_mode == "prompt_logprobs"),
            seed=cfg.seed,
            trust_remote_code=cfg.trust_remote_code,
            tensor_parallel_size=cfg.tensor_parallel_size,
            in_process=True,  # the run's only engine, closed at its end (CPU, one rank: faster)
            progress=cfg.progress,
        )
        attn = None
        if cfg.attention_layers:
            from teacher_cache.backends.hf import HfBackend

            attn = HfBackend(
                ref,
                attention_layers=cfg.attention_layers,
                logits=False,
                trust_remote_code=cfg.trust_remote_code,
                progress=cfg.progress,
            )
        return main, attn
    from teacher_cache.backends.hf import HfBackend

    hf = HfBackend(
        ref, attention_layers=cfg.attention_layers, trust_remote_code=cfg.trust_remote_code, progress=cfg.progress
    )
    return hf, None


def _backend_info(cfg: RunConfig) -> dict:
    """Backend identity for the header, known before the (expensive) engine is built; a
    tensor-parallel engine says how many ranks (reduction order: its kernel noise differs)."""
    name = backend_name(cfg)
    if name == "hf" and cfg.tensor_parallel_size > 1:  # auto without vLLM installed
        raise RunError("--tensor-parallel-size needs the vllm backend, and vLLM is not installed here")
    info = {"backend": name, "vllm_mode": cfg.vllm_mode if name == "vllm" else None}
    if cfg.tensor_parallel_size > 1:  # only then: caches and partial runs of 1 rank keep their header
        info["tensor_parallel_size"] = cfg.tensor_parallel_size
    return info


def _encode_row(cfg: RunConfig, rec: Record, tk: Tokenized, out: TeacherOutput, vocab: int, source: str) -> Row:
    try:
        return _encoded(cfg, rec, tk, out, vocab, source)
    except ValueError as e:  # the codec's input checks: name the record
        raise RunError(f"{rec.where}: {one_line(e)}") from None


def _vocab_logits(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """[P, V_out] -> [P, vocab]: an output layer padded past the tokenizer (Phi-3, Qwen2.5) has
    columns no token id names; they are dropped (their mass, ~0, left out)."""
    if logits.shape[-1] < vocab:
        raise RunError(vocab_message(logits.shape[-1], vocab))
    return logits[:, :vocab]


def _encoded(cfg: RunConfig, rec: Record, tk: Tokenized, out: TeacherOutput, vocab: int, source: str) -> Row:
    err = cfg.logprob_error
    if out.topk is not None:
        top: TopKTargets = out.topk
        if top.ids.size and int(top.ids.max()) >= vocab:  # a hub teacher's padded output layer (check_vocab)
            raise RunError(stock_padded_message(f"gave id {int(top.ids.max())},", vocab))
        blob = codec.encode_topk(top.ids, top.logprobs, top.tail_logprob, vocab_size=vocab, max_error=err)
    elif cfg.targets == "topk":
        top = topk_from_logits(_vocab_logits(out.logits, vocab), cfg.top_k, inplace=True)  # not used again
        blob = codec.encode_topk(top.ids, top.logprobs, top.tail_logprob, vocab_size=vocab, max_error=err)
    else:
        gen = torch.Generator().manual_seed(_sample_seed(cfg.seed, rec.sample_id))
        s = sampled_from_logits(_vocab_logits(out.logits, vocab), cfg.num_draws, gen)
        blob = codec.encode_sampled(s.offsets, s.ids, s.counts, vocab_size=vocab, num_draws=s.num_draws)
    attn_blobs = None
    if out.attention is not None:
        T = len(tk.input_ids)
        attn_blobs = []
        for layer in cfg.attention_layers:
            a = attention_summary(out.attention[layer], cfg.attention_top_k)
            attn_blobs.append(codec.encode_topk(a.ids, a.logprobs, a.tail_logprob, vocab_size=T, max_error=err))
    return Row(rec.sample_id, source, rec.domain, tk.input_ids, tk.target_positions, blob, attn_blobs, tk.truncated)


def run(cfg: RunConfig, backend: TeacherBackend | None = None) -> dict:
    """Cache the teacher's targets for cfg.data into cfg.out; returns this worker's part.

    `backend` lets a caller reuse an engine it built (and closes itself); by default
    the engine is built from cfg when the first shard needs it.
    """
    t0 = time.time()
    for path in cfg.data:
        check_data_file(path)
    ref = resolve_model(cfg.teacher)  # an unknown teacher fails before --out is created
    teacher_config = local_config(ref)
    check_attention_layers(cfg, teacher_config)
    check_positions(cfg, teacher_config)
    tok = load_tokenizer(ref.path, ref.revision, trust_remote_code=cfg.trust_remote_code)
    check_vocab(teacher_config, len(tok), stock=stock_mode(cfg))
    if cfg.targets == "topk" and cfg.top_k > len(tok):  # would store every token's log-prob, in k's name
        raise RunError(f"--top-k {cfg.top_k} is larger than the teacher's vocabulary ({len(tok)} tokens)")
    out = _open_out(cfg)
    header = _header(cfg, ref, tok, _backend_info(cfg))
    chash = config_hash(header)
    check_other_runs(cfg, out, header, chash)
    made = _first_missing(out, PARTS_DIR)
    try:
        out.check_writable()  # makes --out and its parts/: only now, after the refusals above
    except StorageError as e:
        raise RunError(str(e)) from None
    with _hold_worker(cfg, out, made) as own:
        return _run_held(cfg, ref, tok, out, header, chash, made, own, backend, t0)


@contextlib.contextmanager
def _hold_worker(cfg: RunConfig, out: Location, made: Path | None) -> Iterator[tuple[Path, ...]]:
    """One process per worker of a local --out (a second one deleted the first's half-written
    shard, and the first then listed it at 0 bytes in a cache it called complete). Yields the
    files a run that made --out may remove with it when it fails (its part file and lock, and the
    workers' shared start lock), holding its lock; a run refused the lock removes nothing (the
    folder is the holder's; one that could not write its lock, on a full disk, removes `made`, the
    folder it made, if it holds no more than those files). Object stores take no lock: their workers
    must be started once each."""
    if not out.is_local:
        yield ()
        return
    root = out.local_path().absolute()
    own = (
        root / part_path(cfg.worker_index, cfg.num_workers),
        root / worker_lock_name(cfg.worker_index),
        root / PARTS_DIR / ".start.lock",  # _starting's: shared, but a failed run's own folder may go with it
    )
    held = False
    try:
        with exclusive(own[1], note=part_name(cfg.worker_index, cfg.num_workers)):
            held = True
            # what a kill -9 mid-write left: its own part's temps (this lock makes it their only
            # writer), and the manifest's once an hour old (any worker may write that one)
            sweep_atomic_temps(own[0])
            sweep_atomic_temps(root / MANIFEST, older_than=3600)
            yield own
    except LockedError as e:  # the holder's folder: nothing here is this run's to remove
        raise RunError(
            f"{out}: worker {cfg.worker_index} of {cfg.num_workers} is being written by another run (pid {e.pid}); "
            "wait for it to end, or stop it and run again (it resumes)"
        ) from None
    except OSError:
        if not held and made is not None:  # the lock not written (a full disk): the folder is only this run's
            remove_if_unused(made, *own)
        raise


def _run_held(cfg: RunConfig, ref: ModelRef, tok, out: Location, header: dict, chash: str, made: Path | None,
              own: tuple[Path, ...], backend: TeacherBackend | None, t0: float) -> dict:  # fmt: skip
    """run() once --out is made and this worker's lock held."""
    try:
        previous = previous_part(cfg, out, header, chash)  # rereads its kept shards: not under the start lock
        with _starting(out, own):  # one worker at a time, from its check to its first part file
            check_other_runs(cfg, out, header, chash)  # again: a run with other settings may have started since
            if previous is not None and previous.get("complete"):
                log(
                    f"nothing to do: worker {cfg.worker_index} of {cfg.num_workers} already finished "
                    f"({plural(previous['counts']['samples'], 'sample')} in "
                    f"{plural(len(previous['shards']), 'shard')})"
                )
                assemble(out, cfg.num_workers)
                return previous
            if previous is not None and previous.get("redo") and out.exists(MANIFEST):
                out.remove(MANIFEST)  # it lists shards being redone: readers say "incomplete" until the end
                log(f"{MANIFEST} removed: the cache is incomplete until the redo ends")
            part = new_part(cfg, header, chash, previous)
            if out.is_local:  # half-written by a killed run (object stores only ever see whole shards)
                for stale in out.local_path().glob(spool_glob(cfg.worker_index)):
                    stale.unlink()
            write_part(cfg, out, part, [], [], 0.0)

        total = _share_size(cfg, special_text_finder(tok))
        done = len(part["shards"])
        if done:
            remaining = max(0, -(-total // cfg.shard_size) - done)
            log(f"resuming: {plural(done, 'shard')} already durable, {remaining} to go")
        if backend is not None and cfg.attention_layers and backend.name != "hf":
            raise RunError("an injected non-hf backend cannot provide attention summaries")
        bad, dups = _cache_shards(cfg, ref, tok, out, part, backend, total, t0)
        _check_data_unchanged(cfg, header)
        return _finish(cfg, out, part, bad, dups, t0)
    except BaseException:
        if made is not None:  # what this run made, if it holds no more than its part file and lock
            remove_if_unused(made, *own)
        raise


def _check_data_unchanged(cfg: RunConfig, header: dict) -> None:
    """Refuse to call a run complete whose data files changed while it read them (appended to,
    rewritten): the header, and so the manifest, names each file by its sha256 at the start, but
    the shards hold records read later (a cache of 252 samples named a file of 240)."""
    for path, entry in zip(cfg.data, header["data"]["files"], strict=True):
        try:
            now = file_sha256(path)
        except (OSError, ValueError) as e:  # deleted or unreachable since it was read
            raise RunError(
                f"{path} cannot be read again to check it did not change during the run ({one_line(e, 200)}): "
                "the run is not marked finished; make it readable and run the same command again"
            ) from None
        if now != entry["sha256"]:
            raise RunError(
                f"{path} changed while this run read it ({entry['sha256']} at the start, {now} now): "
                "its shards may hold records of either version, so the run is not marked finished; "
                "run again into a new --out once the file no longer changes"
            )


@contextlib.contextmanager
def _starting(out: Location, own: tuple[Path, ...]) -> Iterator[None]:
    """Workers of a local --out start one at a time (parts/.start.lock, held for a moment): two runs
    with other settings started together both passed the check of the other's part before either
    had written one, and mixed their shards in one cache."""
    if not own:  # an object store: no locks (its workers must be started once each)
        yield
        return
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(exclusive(own[2]))
        except LockedError as e:  # held a moment by another worker's check: said, then waited for
            log(f"waiting for another worker of {out} to start (pid {e.pid})")
            held.enter_context(exclusive(own[2], wait=True))
        yield


def _first_missing(out: Location, parts_dir: str) -> Path | None:
    """The outermost folder check_writable is about to make for a local --out/parts/ (--out's
    missing parents included); None if they all exist, or for an object store."""
    if not out.is_local:
        return None
    root = out.local_path().absolute()
    missing = None
    for folder in (root / parts_dir, root, *root.parents):
        if folder.exists():
            break
        missing = folder
    return missing


def _open_out(cfg: RunConfig) -> Location:
    """--out, refused if it holds files that are not a cache's (run checks it can write there once
    the other refusals, which must leave a cache they refuse untouched, have passed)."""
    out = Location(cfg.out)
    if out.is_local and out.local_path().exists() and not out.local_path().is_dir():
        raise RunError(f"--out {out} is a file, not a directory for the cache")
    cache = inside_cache(out.local_path().resolve().parent) if out.is_local else None
    if cache is not None:  # the outer cache's resume and verify would trip on a cache inside it
        raise RunError(f"--out {out} is inside the teacher cache {cache}: use a directory of its own")
    try:
        names = out.glob("*")
        foreign = [n for n in names if not is_cache_file(n)]
        if foreign and not _is_cache(out, names):  # a cache's own folder always resumes
            raise RunError(f"{out} holds files that are not a cache's ({first_of(foreign)}): use an empty or new --out")
        # a run writes its part file before its first shard, so shards with neither a part nor a
        # manifest are no run's of this folder (a killed merge's, a cache whose parts/ went): this
        # run would overwrite some of them and leave the rest beside its own, unlisted
        shards = [n for n in names if SHARD_RE.match(n)]
        if shards and not _is_cache(out, names):
            raise RunError(
                f"{out} holds shards but no {MANIFEST} or worker part file ({first_of(shards)}): an unfinished "
                "merge, or a cache whose parts/ were removed; use an empty or new --out"
            )
    except StorageError as e:
        raise RunError(str(e)) from None
    return out


def _is_cache(out: Location, names: list[str]) -> bool:
    """A manifest, or a worker's part file in parts/: a folder merely named parts/ is not a cache's."""
    if MANIFEST in names:
        return True
    return PARTS_DIR in names and any(parse_part_name(n.rsplit("/", 1)[-1]) for n in out.glob(f"{PARTS_DIR}/*.json"))


def _share_size(cfg: RunConfig, special_text: Callable[[list[dict[str, str]]], str | None]) -> int:
    """How many records are this worker's: a parse-only pass over the data that gives the
    progress bar its total (cheap next to the teacher). Warns (legal, rarely meant) of records
    whose messages hold a special token's text, which the tokenizer reads as that token."""
    bad: list[str] = []
    met: set[str] = set()
    total, specials = 0, []  # (where, the special token's text) of each such record
    for rec in _my_records(cfg, bad, [], met):
        total += 1
        if (found := special_text(rec.messages)) is not None:
            specials.append((rec.where, found))
    if specials:
        where, text = specials[0]
        log(
            f"warning: {plural(len(specials), 'record')} of worker {cfg.worker_index}'s share "
            f"{'holds' if len(specials) == 1 else 'hold'} the text of a "
            f"special token in a message (the first: {where} holds {text!r}): the tokenizer reads it as that "
            "token, not as text (an end of sequence inside an answer, say): clean the data if that is not meant"
        )
    typos = sorted(set(cfg.excluded) - met)  # domains are case-sensitive: a typo excludes nothing
    domains = _data_domains(cfg) if typos or (total == 0 and cfg.only_domain) else []
    listed = f" (the data's domains: {first_of([repr(d) for d in domains], 8)})" if domains else ""
    for domain in typos:
        log(f"warning: no record has domain {domain!r}: --exclude-domain {domain} excludes nothing{listed}")
    if total == 0 and cfg.only_domain and cfg.only_domain not in domains:  # in no worker's share: a typo
        raise RunError(f"--only-domain {cfg.only_domain}: no record of the data has that domain{listed}")
    if total == 0 and bad:
        log(
            f"warning: every record of worker {cfg.worker_index}'s share is malformed ({len(bad)} skipped by "
            f"--skip-bad, the first: {bad[0]}): this part of the cache is empty"
        )
    elif total == 0 and (cfg.only_domain or cfg.excluded):
        others = " or ".join(repr(d) for d in cfg.excluded)
        kept = f"domain {cfg.only_domain!r}" if cfg.only_domain else f"a domain other than {others}"
        log(f"warning: no record of worker {cfg.worker_index}'s share has {kept}: this part of the cache is empty")
    return total


def _data_domains(cfg: RunConfig) -> list[str]:
    """The domains the data's records have, sorted (a parse pass; records without one are left out)."""
    return sorted({rec.domain for rec in iter_records(list(cfg.data), skip_bad=True) if rec.domain is not None})


def _cache_shards(
    cfg: RunConfig,
    ref: ModelRef,
    tok,
    out: Location,
    part: dict,
    backend: TeacherBackend | None,
    total: int,
    t0: float,
) -> tuple[list[str], list[int]]:
    """Write the shards after part's durable ones, adding each to the part file as it lands;
    returns the bad records and duplicates met. Closes the engines it built (not `backend`)."""
    bad: list[str] = []
    dups: list[int] = []
    done = len(part["shards"])
    shards = _chunks(_my_records(cfg, bad, dups), cfg.shard_size)
    owned = backend is None
    attn_backend = None
    vocab = len(tok)
    bar = _Progress(cfg.progress, total, done * cfg.shard_size)
    described = False
    listed = PartWrites()
    try:
        for index, records in enumerate(shards):
            if index < done:
                continue
            if backend is None:
                if cfg.progress:
                    log(f"loading the teacher {ref.name} ({backend_name(cfg)})")
                backend, attn_backend = _make_backend(cfg, ref)
            if not described:  # once per run: its engines do not change (a resume's may)
                if getattr(backend, "mode", None) == "prompt_logprobs":  # a hub teacher's config is first read here
                    check_vocab(getattr(backend, "teacher_config", {}), vocab, stock=True)
                engines = [b.describe() for b in (backend, attn_backend) if b is not None]
                part["engines"] = union_engines([part["engines"], engines])
                described = True
            bar.start()  # once, at the first shard to make (the engine loaded, or given)
            name = shard_name(cfg.worker_index, index)
            entry = _cache_shard(cfg, tok, out, part, name, records, backend, attn_backend, vocab, bar)
            part["shards"].append(entry)
            listed.after_shard(lambda: write_part(cfg, out, part, bad, dups, time.time() - t0))
    except BaseException as e:
        with contextlib.suppress(Exception):  # if this fails too, a resume redoes those shards
            listed.flush()  # a stop keeps every finished shard, not only those the throttle let through
        if not isinstance(e, EngineFailure):
            raise
        kept = "finished shards are kept; the same command resumes after them" if part["shards"] else "rerun it"
        raise RunError(f"{e}: {kept}") from None
    finally:
        bar.close()
        for b in (backend if owned else None, attn_backend):
            if b is not None:
                b.close()
    return bad, dups


SORT_BATCHES = 8  # a shard's records go to the teacher sorted by length within runs of this many batches


def _cache_shard(
    cfg: RunConfig,
    tok,
    out: Location,
    part: dict,
    name: str,
    records: list[Record],
    backend: TeacherBackend,
    attn_backend: TeacherBackend | None,
    vocab: int,
    bar: _Progress,
) -> dict:
    """Tokenize one shard's records, run the teacher over them batch by batch and write the
    shard (tagged with part's config hash and source); returns its entry for the part file."""
    tokenized, shard_bad = _tokenize_shard(cfg, tok, records, finished=len(part["shards"]))
    metadata = {"format_version": FORMAT_VERSION, "config_hash": part["config_hash"], "shard": name}
    # batches of similar lengths (the hf backend pads each batch to its longest: ~1.3x the tokens
    # in data order), sorted within runs of SORT_BATCHES batches; rows are written in data order,
    # each as soon as those before it are encoded (so at most a run's rows wait in memory)
    run_len = SORT_BATCHES * cfg.batch_size
    order = [
        i
        for lo in range(0, len(tokenized), run_len)
        for i in sorted(range(lo, min(lo + run_len, len(tokenized))), key=lambda i: len(tokenized[i][1].input_ids))
    ]
    encoded: dict[int, Row] = {}  # index in tokenized -> its row, until written
    with ShardWriter(out, name, metadata, chunk_bytes=cfg.chunk_bytes) as writer:
        for start in range(0, len(order), cfg.batch_size):
            indices = order[start : start + cfg.batch_size]
            batch = [tokenized[i] for i in indices]
            # one sample's [P, V] logits at a time: consumed as the backend yields them
            outputs = backend.forward([tk for _, tk in batch])
            attns = attn_backend.forward([tk for _, tk in batch]) if attn_backend else None
            for i, (rec, tk), o in zip(indices, batch, outputs, strict=True):
                if attns is not None:
                    o.attention = next(attns).attention
                encoded[i] = _encode_row(cfg, rec, tk, o, vocab, part["source"])
            while writer.rows in encoded:  # the next row in data order is ready
                writer.write(encoded.pop(writer.rows))
            bar.update(len(batch), sum(len(tk.input_ids) for _, tk in batch))
        bar.update(len(records) - len(tokenized), 0)
        info = writer.finalize()
    return {**info.to_dict(), "skipped_bad": len(shard_bad), "bad_records": shard_bad}


def _tokenize_shard(
    cfg: RunConfig, tok, records: list[Record], *, finished: int
) -> tuple[list[tuple[Record, Tokenized]], list[str]]:
    """The shard's records with their tokens, and the bad ones skipped (raises unless --skip-bad;
    `finished`: shards already durable, which the error says are kept)."""
    tokenized: list[tuple[Record, Tokenized]] = []
    shard_bad: list[str] = []
    for rec in records:
        try:
            tokenized.append((rec, tokenize_record(tok, rec, cfg.max_length)))
        except BadRecordError as e:
            if not cfg.skip_bad:  # found only now, when its shard is reached: say how to keep what is done
                kept = "rerun with --skip-bad to skip such records"
                kept = f"the finished shards are kept: {kept}" if finished else kept
                raise BadRecordError(e.where, f"{e.why}; {kept}") from None
            shard_bad.append(str(e))
    return tokenized, shard_bad


def _finish(cfg: RunConfig, out: Location, part: dict, bad: list[str], dups: list[int], t0: float) -> dict:
    """Mark the part complete with its counts and timing, assemble the manifest if every worker
    is done, and log the worker's summary; returns the part."""
    wall = time.time() - t0  # this attempt's
    total = wall + part.get("elapsed_before_s", 0.0)  # every attempt's, which made all the part's tokens
    part["complete"] = True
    part["counts"] = part_counts(part, bad, dups)
    part["bad_records"] = bad + [b for s in part["shards"] for b in s["bad_records"]]
    part["timing"] = {"wall_s": total, "tokens_per_s": part["counts"]["tokens"] / total if total > 0 else None}
    out.write_json(part_path(cfg.worker_index, cfg.num_workers), part)
    manifest = assemble(out, cfg.num_workers)
    c = part["counts"]
    repeats = f", {plural(c['duplicates'], 'repeated record')} dropped" if c["duplicates"] else ""
    log(
        f"worker {cfg.worker_index}: {plural(c['samples'], 'sample')}, "
        f"{plural(c['target_positions'], 'target position')}, "
        f"{c['skipped_bad']} skipped, {c['truncated']} truncated{repeats} in {wall:.1f}s"
        + ("; cache complete" if manifest else f"; manifest.json comes when every worker has finished into {out}")
    )
    late = c["skipped_bad"] - len(bad)  # refused when tokenised (too long for --max-length, say), not parsed
    if not c["samples"] and late > 0:  # the parse-time case was warned about before the teacher loaded
        log(
            f"warning: every record of worker {cfg.worker_index}'s share was refused when tokenised ({late} "
            f"skipped by --skip-bad, the first: {part['bad_records'][len(bad)]}): "
            "this part of the cache is empty"
        )
    return part


class _Progress:
    """The caching bar (samples, tokens/s); it appears once the engine is loaded, so that its rate
    and ETA, and tokens/s, count the caching only (not a 0 % bar under the engine's start-up)."""

    def __init__(self, enabled: bool, total: int, initial: int) -> None:
        self.enabled, self.total, self.initial = enabled, total, min(initial, total)
        self.bar = None
        self.started = False
        self.tokens = 0
        self.t0 = time.time()

    def start(self) -> None:
        """Show the bar and start the clocks; later calls do nothing."""
        if self.started:
            return
        self.started, self.t0 = True, time.time()
        if self.enabled:
            self.bar = progress.bar(self.total, "caching", "sample", initial=self.initial)

    def update(self, samples: int, tokens: int) -> None:
        self.tokens += tokens
        if self.bar is not None:  # the postfix waits for update's redraw, which keeps to mininterval
            self.bar.set_postfix(tok_s=f"{self.tokens / max(time.time() - self.t0, 1e-9):,.0f}", refresh=False)
            self.bar.update(samples)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
