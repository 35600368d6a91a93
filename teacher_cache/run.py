"""Stage one: records -> tokens -> teacher forward -> targets -> codec -> shards -> manifest.

`run(cfg)` is the Python API behind `teacher-cache run`. Work is cut into shards of
`shard_size` samples, deterministically from the data and the worker split, so a
restarted run redoes only shards that were not durable when it stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import torch

from teacher_cache import __version__, codec, progress
from teacher_cache.backends import EngineFailure, TeacherBackend, TeacherOutput
from teacher_cache.cache import inside_cache
from teacher_cache.config import RunConfig, RunError, same_file
from teacher_cache.errors import first_of, one_line, parse_json, plural
from teacher_cache.manifest import (
    FORMAT_NAME,
    LOGPROB_SCALE,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    PARTS_DIR,
    assemble,
    config_hash,
    header_differences,
    parse_part_name,
    part_name,
    part_path,
    read_part,
    union_engines,
    worker_lock_name,
)
from teacher_cache.models import LOGIT_TRANSFORMS, ModelRef, position_limit, resolve_model, weight_files, weights_sha256
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
    holder,
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


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _durable_prefix(out: Location, shards: list[dict]) -> list[dict]:
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


def _check_other_runs(cfg: RunConfig, out: Location, header: dict, chash: str) -> None:
    """Refuse, before any work, an --out holding shards of a run with other settings: other
    workers' parts (of this or another --num-workers, whose shards this run would overwrite or
    never assemble with) or a finished manifest. A part without shards is a failed start (ignored)
    unless a live run is writing it: its worker's lock held with that part's name as its note
    (this worker's index is not probed: this run holds that lock, or is refused it next)."""
    for name in out.glob(f"{PARTS_DIR}/*.json"):
        owner = parse_part_name(name.removeprefix(f"{PARTS_DIR}/"))
        if owner is None or owner == (cfg.worker_index, cfg.num_workers):
            continue  # not a part file; or this worker's own, which _previous_part checks
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
                f"({_differences(part, header)}); use another --out, or the arguments and data of that run"
            )
        raise RunError(
            f"{out} holds {plural(len(part['shards']), 'shard')} of worker {owner[0]} of {owner[1]}, made with "
            f"different settings ({_differences(part, header)}); use another --out, or the arguments and data of "
            "that run"
        )
    if out.exists(MANIFEST):
        try:
            manifest = out.read_json(MANIFEST, MAX_MANIFEST_BYTES)
        except ValueError as e:  # damaged: a run writes it whole, from its parts/ (which rebuild it)
            hint = f"if {out} is this run's, delete that file and run again (parts/ rebuild it); else use another --out"
            raise RunError(f"{e}; {hint}") from None
        if not isinstance(manifest, dict) or manifest.get("config_hash") != chash:
            what = _differences(manifest, header) if isinstance(manifest, dict) else "the settings differ"
            raise RunError(f"{out} holds a finished cache made with different settings ({what}); use another --out")


def _differences(old: dict, header: dict) -> str:
    """Why an earlier run's config hash is not this run's, for messages: the settings that differ,
    or the older version that hashed the same settings another way."""
    found = header_differences(old, header)
    if found:
        return ", ".join(found) + " differ"
    return f"the same settings, hashed another way by teacher-cache {old.get('tool_version', 'of another version')}"


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
        _log(f"hashing the teacher's weights ({size / 2**30:.1f} GiB) to record which ones made this cache")
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


def _backend_name(cfg: RunConfig) -> str:
    """--backend with "auto" resolved: vllm where installed, else hf."""
    from teacher_cache.backends import vllm_available

    if cfg.backend != "auto":
        return cfg.backend
    return "vllm" if vllm_available() else "hf"


def _make_backend(cfg: RunConfig, ref: ModelRef) -> tuple[TeacherBackend, TeacherBackend | None]:
    """The engine for the targets, and an hf engine beside vLLM for attention summaries (or None)."""
    from teacher_cache.backends import vllm_available

    name = _backend_name(cfg)
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
    name = _backend_name(cfg)
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
        raise RunError(_vocab_message(logits.shape[-1], vocab))
    return logits[:, :vocab]


def _encoded(cfg: RunConfig, rec: Record, tk: Tokenized, out: TeacherOutput, vocab: int, source: str) -> Row:
    err = cfg.logprob_error
    if out.topk is not None:
        top: TopKTargets = out.topk
        if top.ids.size and int(top.ids.max()) >= vocab:  # a hub teacher's padded output layer (_check_vocab)
            raise RunError(_stock_padded_message(f"gave id {int(top.ids.max())},", vocab))
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
    teacher_config = _local_config(ref)
    _check_attention_layers(cfg, teacher_config)
    _check_positions(cfg, teacher_config)
    tok = load_tokenizer(ref.path, ref.revision, trust_remote_code=cfg.trust_remote_code)
    _check_vocab(teacher_config, len(tok), stock=_stock_mode(cfg))
    if cfg.targets == "topk" and cfg.top_k > len(tok):  # would store every token's log-prob, in k's name
        raise RunError(f"--top-k {cfg.top_k} is larger than the teacher's vocabulary ({len(tok)} tokens)")
    out = _open_out(cfg)
    header = _header(cfg, ref, tok, _backend_info(cfg))
    chash = config_hash(header)
    _check_other_runs(cfg, out, header, chash)
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
        previous = _previous_part(cfg, out, header, chash)  # rereads its kept shards: not under the start lock
        with _starting(out, own):  # one worker at a time, from its check to its first part file
            _check_other_runs(cfg, out, header, chash)  # again: a run with other settings may have started since
            if previous is not None and previous.get("complete"):
                _log(
                    f"nothing to do: worker {cfg.worker_index} of {cfg.num_workers} already finished "
                    f"({plural(previous['counts']['samples'], 'sample')} in "
                    f"{plural(len(previous['shards']), 'shard')})"
                )
                assemble(out, cfg.num_workers)
                return previous
            if previous is not None and previous.get("redo") and out.exists(MANIFEST):
                out.remove(MANIFEST)  # it lists shards being redone: readers say "incomplete" until the end
                _log(f"{MANIFEST} removed: the cache is incomplete until the redo ends")
            part = _new_part(cfg, header, chash, previous)
            if out.is_local:  # half-written by a killed run (object stores only ever see whole shards)
                for stale in out.local_path().glob(spool_glob(cfg.worker_index)):
                    stale.unlink()
            _write_part(cfg, out, part, [], [], 0.0)

        total = _share_size(cfg, special_text_finder(tok))
        done = len(part["shards"])
        if done:
            remaining = max(0, -(-total // cfg.shard_size) - done)
            _log(f"resuming: {plural(done, 'shard')} already durable, {remaining} to go")
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
            _log(f"waiting for another worker of {out} to start (pid {e.pid})")
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


def _check_vocab(teacher_config: dict, vocab: int, *, stock: bool = False) -> None:
    """A tokenizer with ids past the teacher's output layer, refused before --out is made (local
    checkpoints; a hub teacher's logits are checked as they come, _vocab_logits); with `stock`
    (vLLM's prompt_logprobs), an output layer padded past the tokenizer too: vLLM normalises over
    every row and ranks the extra ones in its top-k, which only the hidden mode drops."""
    rows = teacher_config.get("vocab_size")
    if isinstance(rows, int) and rows < vocab:
        raise RunError(_vocab_message(rows, vocab))
    if stock and isinstance(rows, int) and rows > vocab:
        transforms = [k for k in LOGIT_TRANSFORMS if teacher_config.get(k) not in (None, 1, 1.0)]
        raise RunError(_stock_padded_message(f"has {rows} rows,", vocab, transforms))


def _stock_mode(cfg: RunConfig) -> bool:
    """Whether vLLM's own prompt log-probs make the targets (not logits projected here)."""
    return cfg.vllm_mode == "prompt_logprobs" and _backend_name(cfg) == "vllm"


def _stock_padded_message(rows: str, vocab: int, transforms: list[str] | None = None) -> str:
    """`transforms`: the teacher's logit transforms, which the modes that drop the extra rows refuse."""
    problem = (
        f"--vllm-mode prompt_logprobs: the teacher's output layer {rows} past its tokenizer's {vocab} tokens, "
        "and vLLM's log-probs are normalised over every row and rank the extra ones in the top-k"
    )
    if transforms:  # --vllm-mode hidden and --backend hf compute h @ lm_head.weight^T only
        return (
            f"{problem}; its logits are transformed ({', '.join(transforms)}), which --vllm-mode hidden and "
            "--backend hf refuse: no mode here can cache this teacher"
        )
    return f"{problem}: use --vllm-mode hidden or --backend hf (they drop the rows no token id names)"


def _check_positions(cfg: RunConfig, teacher_config: dict) -> None:
    """--max-length past the positions a local teacher was trained on, refused before --out is made:
    the hf backend would extrapolate there silently (targets of no value), vLLM refuses late."""
    limit = position_limit(teacher_config)
    if limit is None:
        return
    if cfg.max_length > limit:
        raise RunError(
            f"--max-length {cfg.max_length} is past the {limit} positions {cfg.teacher} was trained on "
            f"(max_position_embeddings): use --max-length {limit} or less"
        )
    if cfg.max_length == limit and _stock_mode(cfg):
        raise RunError(
            f"--vllm-mode prompt_logprobs needs one position more than --max-length {limit} (vLLM generates a "
            f"token after the prompt), past the {limit} {cfg.teacher} was trained on: use --max-length "
            f"{limit - 1} or less, or --vllm-mode hidden"
        )


def _local_config(ref: ModelRef) -> dict:
    """A local teacher's config.json ({} for a hub teacher, whose config comes when it loads)."""
    config = Path(ref.path) / "config.json"
    if not (ref.is_local and config.is_file()):
        return {}
    parsed = parse_json(config.read_text())
    return parsed if isinstance(parsed, dict) else {}


def _vocab_message(rows: int, vocab: int) -> str:
    return f"the teacher's output layer has {rows} rows but its tokenizer {vocab} tokens: ids past it have no logits"


def _check_attention_layers(cfg: RunConfig, teacher_config: dict) -> None:
    """Attention layers past the teacher's last, refused before --out is made (local checkpoints:
    their config.json is at hand; a hub teacher's layers are checked when it loads)."""
    layers = teacher_config.get("num_hidden_layers")
    if cfg.attention_layers and isinstance(layers, int) and max(cfg.attention_layers) >= layers:
        raise RunError(f"attention layer {max(cfg.attention_layers)} out of range: {cfg.teacher} has {layers} layers")


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


def _previous_part(cfg: RunConfig, out: Location, header: dict, chash: str) -> dict | None:
    """This worker's part from an earlier attempt, cut to its durable shards; None if there is
    nothing to resume. Raises RunError if it was made with other settings or another engine."""
    previous = read_part(out, cfg.worker_index, cfg.num_workers)
    if previous is None or (not previous.get("shards") and not previous.get("complete")):
        return None  # none, or an attempt that failed before its first shard: nothing to keep or match
    if previous.get("config_hash") != chash:
        raise RunError(
            f"{out} holds {plural(len(previous.get('shards', [])), 'shard')} made with different settings "
            f"({_differences(previous, header)}); use another --out, or the same arguments and data"
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
    kept = _durable_prefix(out, previous["shards"])
    if len(kept) < len(previous["shards"]):
        lost = previous["shards"][len(kept)]["name"]
        _log(
            f"{lost} is missing, or not the size or sha256 its part file says: "
            f"redoing worker {cfg.worker_index} from there"
        )
        previous = {**previous, "shards": kept, "complete": False, "redo": True}
    return previous


def _new_part(cfg: RunConfig, header: dict, chash: str, previous: dict | None) -> dict:
    """This worker's part, not complete, going on from `previous` (its shards, engines and time)."""
    part = {**header, "config_hash": chash, "worker": cfg.worker_index, "complete": False, "shards": [], "engines": []}
    if previous is not None:
        part["shards"] = previous["shards"]
        part["engines"] = [e for e in previous.get("engines", []) if isinstance(e, dict)]
        part["elapsed_before_s"] = previous.get("timing", {}).get("wall_s", 0)  # every attempt's, so far
    return part


def _write_part(cfg: RunConfig, out: Location, part: dict, bad: list[str], dups: list[int], wall_s: float) -> None:
    """The part file of a run in progress: its durable shards and the counts so far."""
    out.write_json(
        part_path(cfg.worker_index, cfg.num_workers),
        {**part, "counts": _counts(part, bad, dups), "timing": {"wall_s": wall_s + part.get("elapsed_before_s", 0.0)}},
    )


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
        _log(
            f"warning: {plural(len(specials), 'record')} of worker {cfg.worker_index}'s share "
            f"{'holds' if len(specials) == 1 else 'hold'} the text of a "
            f"special token in a message (the first: {where} holds {text!r}): the tokenizer reads it as that "
            "token, not as text (an end of sequence inside an answer, say): clean the data if that is not meant"
        )
    typos = sorted(set(cfg.excluded) - met)  # domains are case-sensitive: a typo excludes nothing
    domains = _data_domains(cfg) if typos or (total == 0 and cfg.only_domain) else []
    listed = f" (the data's domains: {first_of([repr(d) for d in domains], 8)})" if domains else ""
    for domain in typos:
        _log(f"warning: no record has domain {domain!r}: --exclude-domain {domain} excludes nothing{listed}")
    if total == 0 and cfg.only_domain and cfg.only_domain not in domains:  # in no worker's share: a typo
        raise RunError(f"--only-domain {cfg.only_domain}: no record of the data has that domain{listed}")
    if total == 0 and bad:
        _log(
            f"warning: every record of worker {cfg.worker_index}'s share is malformed ({len(bad)} skipped by "
            f"--skip-bad, the first: {bad[0]}): this part of the cache is empty"
        )
    elif total == 0 and (cfg.only_domain or cfg.excluded):
        others = " or ".join(repr(d) for d in cfg.excluded)
        kept = f"domain {cfg.only_domain!r}" if cfg.only_domain else f"a domain other than {others}"
        _log(f"warning: no record of worker {cfg.worker_index}'s share has {kept}: this part of the cache is empty")
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
    listed = _PartWrites()
    try:
        for index, records in enumerate(shards):
            if index < done:
                continue
            if backend is None:
                if cfg.progress:
                    _log(f"loading the teacher {ref.name} ({_backend_name(cfg)})")
                backend, attn_backend = _make_backend(cfg, ref)
            if getattr(backend, "mode", None) == "prompt_logprobs":  # a hub teacher's config is first read here
                _check_vocab(getattr(backend, "teacher_config", {}), vocab, stock=True)
            bar.start()  # once, at the first shard to make (the engine loaded, or given)
            if not described:  # once per run: its engines do not change (a resume's may)
                engines = [b.describe() for b in (backend, attn_backend) if b is not None]
                part["engines"] = union_engines([part["engines"], engines])
                described = True
            name = shard_name(cfg.worker_index, index)
            entry = _cache_shard(cfg, tok, out, part, name, records, backend, attn_backend, vocab, bar)
            part["shards"].append(entry)
            listed.after_shard(lambda: _write_part(cfg, out, part, bad, dups, time.time() - t0))
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
    part["counts"] = _counts(part, bad, dups)
    part["bad_records"] = bad + [b for s in part["shards"] for b in s["bad_records"]]
    part["timing"] = {"wall_s": total, "tokens_per_s": part["counts"]["tokens"] / total if total > 0 else None}
    out.write_json(part_path(cfg.worker_index, cfg.num_workers), part)
    manifest = assemble(out, cfg.num_workers)
    c = part["counts"]
    repeats = f", {plural(c['duplicates'], 'repeated record')} dropped" if c["duplicates"] else ""
    _log(
        f"worker {cfg.worker_index}: {plural(c['samples'], 'sample')}, "
        f"{plural(c['target_positions'], 'target position')}, "
        f"{c['skipped_bad']} skipped, {c['truncated']} truncated{repeats} in {wall:.1f}s"
        + ("; cache complete" if manifest else f"; manifest.json comes when every worker has finished into {out}")
    )
    late = c["skipped_bad"] - len(bad)  # refused when tokenised (too long for --max-length, say), not parsed
    if not c["samples"] and late > 0:  # the parse-time case was warned about before the teacher loaded
        _log(
            f"warning: every record of worker {cfg.worker_index}'s share was refused when tokenised ({late} "
            f"skipped by --skip-bad, the first: {part['bad_records'][len(bad)]}): "
            "this part of the cache is empty"
        )
    return part


def _counts(part: dict, bad: list[str], dups: list[int]) -> dict:
    shards = part["shards"]
    return {
        "samples": sum(s["rows"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards),
        "target_positions": sum(s["target_positions"] for s in shards),
        "truncated": sum(s["truncated"] for s in shards),
        "skipped_bad": len(bad) + sum(s["skipped_bad"] for s in shards),
        "duplicates": len(dups),
    }


class _PartWrites:
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
