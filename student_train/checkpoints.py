"""A run's checkpoints: written atomically, found, pruned, and resumed only when they match.

checkpoint-N/ holds the student (safetensors, LoRA merged), its tokenizer, optimizer.pt
(AdamW state and RNG) and trainer_state.json (step, data position, the TrainConfig).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from student_train.checks import check_distinct, content_digest
from student_train.config import RESUMABLE, TrainConfig, TrainError
from student_train.distributed import full_state
from teacher_cache.errors import one_line, parse_json
from teacher_cache.storage import as_umask_allows, fsync_dir


def aside(ckpt: Path | None) -> str:
    """How to go on past a damaged checkpoint: resume from the one before it."""
    return f"; move {ckpt} aside to resume from the checkpoint before it" if ckpt else ""


def resume_point(cfg: TrainConfig, out: Path, caches: list, world: int, student_path: str) -> tuple[dict, Path | None]:
    """-> (state: step, samples per rank, elapsed, cache digests; the checkpoint to resume or None),
    after the checks: no cache twice, no run overwritten, the same settings and caches on resume."""
    digests = check_distinct(caches)
    contents = [content_digest(c) for c in caches]  # saved: a cache's timing may change (a redone shard)
    state = {"step": 0, "samples_per_rank": 0, "elapsed_s": 0.0, "caches_sha256": contents, "world_size": world}
    state["domain_mix"] = "per_round"  # how Plan routes a DAE mix (data.py); "per_index" before it was saved
    state["student_path"] = student_path  # the --student folder, resolved (a preset's built folder)
    latest = latest_checkpoint(out)
    ckpt = latest if cfg.resume else None
    metrics_path = out / "metrics.jsonl"
    holds_run = latest is not None or (metrics_path.is_file() and metrics_path.stat().st_size > 0)
    if not cfg.resume and holds_run:
        raise TrainError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if ckpt:
        saved = _read_trainer_state(ckpt, cfg)
        check_resume(ckpt, saved, cfg, digests, student_path, contents=contents)
        if saved.get("world_size", world) != world:  # the data position is per rank (absent before it was saved)
            raise TrainError(
                f"{ckpt} was trained by {saved['world_size']} processes, this run has {world}: the data position "
                f"is per process, so resume with {saved['world_size']}, or start a new run from it: "
                f"--student {ckpt} --out NEW_DIR"
            )
        if cfg.lora_rank:
            raise TrainError(
                f"{ckpt} holds LoRA adapters merged into the weights: a resume would restart the adapters and mismatch "
                f"their optimizer state; start a new LoRA run from it: --student {ckpt} --out NEW_DIR"
            )
        state.update({k: v for k, v in saved.items() if k in state and k != "student_path"})
        state["domain_mix"] = saved.get("domain_mix", "per_index")
    return state, ckpt


def _read_trainer_state(ckpt: Path, cfg: TrainConfig) -> dict:
    """A checkpoint's trainer_state.json, its types checked (the resume trusts its step and data position)."""
    path = ckpt / "trainer_state.json"
    try:
        saved = parse_json(path.read_text())
    except (OSError, ValueError) as e:
        raise TrainError(f"{path}: unreadable ({one_line(e, 300)}){aside(ckpt)}") from None
    try:
        ok = _valid_trainer_state(saved, ckpt, cfg)
    except TypeError:  # a field of another type than the checks compare
        ok = False
    if not ok:
        raise TrainError(f"{path}: not a trainer state this run can resume (step, data position, config){aside(ckpt)}")
    return saved


def _valid_trainer_state(saved: object, ckpt: Path, cfg: TrainConfig) -> bool:
    return bool(
        isinstance(saved, dict)
        and all(isinstance(saved.get(k), int) and not isinstance(saved[k], bool) for k in ("step", "samples_per_rank"))
        and isinstance(saved.get("elapsed_s", 0.0), (int, float))
        and isinstance(saved.get("config", {}), dict)
        and 0 <= saved["step"] <= saved.get("config", {}).get("max_steps", cfg.max_steps)
        and saved["samples_per_rank"] >= 0
        and saved.get("domain_mix", "per_index") in ("per_index", "per_round")
        and ckpt.name == f"checkpoint-{saved['step']}"
    )


def check_resume(
    ckpt: Path,
    saved: dict,
    cfg: TrainConfig,
    digests: list[str],
    student_path: str,
    *,
    contents: list[str] | None = None,
) -> None:
    """Refuse --resume with settings or caches other than the checkpoint's: the data position
    and the learning-rate schedule it saved would mean something else. The student is compared
    by the folder its name resolves to (a relative path from another directory is the same).
    The caches are compared by `contents` (checks.content_digest: what checkpoints record now),
    or by `digests` (the whole manifest's: what older checkpoints recorded)."""
    before = saved.get("config", {})
    now = json.loads(json.dumps(asdict(cfg)))  # tuples as lists, as saved
    same = set(RESUMABLE) | ({"student"} if saved.get("student_path") == student_path else set())
    changed = sorted(k for k in now if k not in same and k in before and before[k] != now[k])
    was = saved.get("caches_sha256", digests)
    ways = [digests] if contents is None else [contents, digests]
    if was not in ways:  # the same caches in another order give another sample order
        reordered = any(sorted(was) == sorted(w) for w in ways)
        changed.append("the caches' order" if reordered else "the caches' contents")
    if changed:
        raise TrainError(
            f"{ckpt} was trained with other settings ({', '.join(changed)}); resume with the same ones, or "
            f"start a new run from it: --student {ckpt} --out NEW_DIR"
        )


def restore_optimizer(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> None:
    """AdamW state and the RNG from ckpt/optimizer.pt (gathered by parameter name under FSDP)."""
    try:
        saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    except Exception as e:  # missing, truncated or foreign bytes
        raise TrainError(f"{ckpt / 'optimizer.pt'}: cannot load ({one_line(e, 300)}){aside(ckpt)}") from None
    if not isinstance(saved, dict) or "rng" not in saved or not {"optimizer", "fsdp_optimizer"} & set(saved):
        raise TrainError(f"{ckpt / 'optimizer.pt'}: not a checkpoint's optimizer state{aside(ckpt)}")
    if ("fsdp_optimizer" in saved) != sharded:
        written = "with" if "fsdp_optimizer" in saved else "without"
        raise TrainError(f"{ckpt} was written {written} --fsdp across ranks; resume the same way")
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        full = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(model, optimizer, optim_state_dict=saved["fsdp_optimizer"], options=full)
    else:
        optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"])
    if torch.cuda.is_available() and len(saved.get("cuda_rng") or []) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(saved["cuda_rng"])


def _complete(out: Path) -> list[Path]:
    """The complete checkpoint-N in `out` (each with its trainer_state.json), oldest first."""

    def step(p: Path) -> int:
        n = p.name.removeprefix("checkpoint-")
        return int(n) if n.isdigit() else -1

    return [p for p in sorted(out.glob("checkpoint-*"), key=step) if (p / "trainer_state.json").is_file()]


def latest_checkpoint(out: Path) -> Path | None:
    """The highest-numbered complete checkpoint-N in `out` (one with its trainer_state.json), or None."""
    ckpts = _complete(out)
    return ckpts[-1] if ckpts else None


def prune_checkpoints(out: Path, keep: int) -> list[Path]:
    """Remove all but the newest `keep` complete checkpoints (-> the removed ones). Each is first
    renamed to a hidden .checkpoint-N.old (one atomic step: a kill mid-removal never leaves a
    half-deleted checkpoint-N that looks resumable), then deleted; leftovers of a killed removal go too."""
    complete = [p for p in _complete(out) if p.name.removeprefix("checkpoint-").isdigit()]
    old = complete[:-keep] if keep else []
    for ckpt in old:
        _set_aside(ckpt)
    fsync_dir(out)
    for gone in out.glob(".checkpoint-*.old"):
        shutil.rmtree(gone, ignore_errors=True)
    return old


def _set_aside(ckpt: Path) -> Path:
    """Rename checkpoint-N to the hidden .checkpoint-N.old (one atomic step, so no half-deleted
    checkpoint-N ever looks resumable); -> the new name, for the caller to delete."""
    gone = ckpt.with_name(f".{ckpt.name}.old")
    shutil.rmtree(gone, ignore_errors=True)
    os.replace(ckpt, gone)
    return gone


def sweep_partial_checkpoints(out: Path) -> None:
    """Remove what a killed run left of its checkpoint writes and removals (.checkpoint-N.tmp,
    .checkpoint-N.old: up to a whole checkpoint's size each); called with the run directory locked."""
    for left in (*out.glob(".checkpoint-*.tmp"), *out.glob(".checkpoint-*.old")):
        shutil.rmtree(left, ignore_errors=True)


def prune(out: Path, keep: int) -> None:
    """--keep-last after a checkpoint is on disk; a failure to delete (permissions) is one line."""
    try:
        prune_checkpoints(out, keep)
    except OSError as e:
        raise TrainError(
            f"could not remove old checkpoints in {out} for --keep-last {keep} ({one_line(e)}); the newest are "
            "kept: fix that, then rerun with --resume"
        ) from None


def save_sharded(
    out: Path, step: int, model: nn.Module, tok, optimizer, state: dict, cfg: TrainConfig, rank: int
) -> None:
    """save for FSDP: every rank joins the gathers of weights and optimizer state; rank 0 writes
    the same plain checkpoint as without FSDP (optimizer state keyed by parameter name)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    weights = full_state(model, rank0_cpu=True)
    optim = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        save(out, step, model, tok, optimizer, state, cfg, weights=weights, fsdp_optimizer=optim)


def save(
    out: Path,
    step: int,
    model: nn.Module,
    tok,
    optimizer,
    state: dict,
    cfg: TrainConfig,
    *,
    weights: dict[str, torch.Tensor] | None = None,
    fsdp_optimizer: dict | None = None,
) -> Path:
    """Write checkpoint-STEP atomically: safetensors weights, tokenizer, optimizer, RNG, data position.
    A failed write (a full disk) leaves the earlier checkpoints as they were and raises TrainError."""
    tmp = out / f".checkpoint-{step}.tmp"
    try:
        return _write_checkpoint(out, step, tmp, model, tok, optimizer, state, cfg, weights, fsdp_optimizer)
    except Exception as e:  # OSError, safetensors' SafetensorError, torch.save's RuntimeError
        full = shutil.disk_usage(out).free < (64 << 20)  # before the partial checkpoint frees its space
        shutil.rmtree(tmp, ignore_errors=True)
        why, fix = ("no space left on the device", "free space") if full else (one_line(e), "fix that")
        kept = "the checkpoints before it are kept" if latest_checkpoint(out) else "it was the first"
        raise TrainError(
            f"could not write checkpoint-{step} in {out} ({why}); {kept}: {fix}, then rerun with --resume"
        ) from None
    except BaseException:  # Ctrl-C, SIGTERM: no partial checkpoint left behind either
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_checkpoint(
    out: Path, step: int, tmp: Path, model, tok, optimizer, state: dict, cfg: TrainConfig, weights, fsdp_optimizer
) -> Path:
    final = out / f"checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    from teacher_cache.models import hf_progress

    with hf_progress(False):  # its "Writing model shards" bar would break the training bar (which says "saving")
        if cfg.lora_rank:  # a plain transformers model: adapters merged into their base weights
            base, merged = merged_lora_state(model)
            base.save_pretrained(tmp, state_dict=merged, safe_serialization=True)
        else:
            model.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
    tok.save_pretrained(tmp)
    opt = {"fsdp_optimizer": fsdp_optimizer} if fsdp_optimizer is not None else {"optimizer": optimizer.state_dict()}
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    torch.save({**opt, "rng": torch.get_rng_state(), "cuda_rng": cuda_rng}, tmp / "optimizer.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({**state, "config": asdict(cfg)}, indent=2))
    as_umask_allows(tmp)  # safetensors writes the weights 0600: teammates could not read them
    for f in (p for p in tmp.iterdir() if p.is_file()):  # on disk before the rename shows the checkpoint
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fsync_dir(tmp)
    if final.exists():  # an incomplete checkpoint-N: set aside first, never half-deleted under its name
        shutil.rmtree(_set_aside(final), ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(out)
    return final


def merged_lora_state(model: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """peft model -> (its base transformers model, that model's state dict with each LoRA delta
    merged into its base weight and no adapter keys). Only the adapted weights are new tensors,
    one per adapted linear layer; the model itself is not copied, nor changed (merging in place
    and unmerging would leave rounding drift in the trained weights)."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    merged = {}
    with torch.no_grad():
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer):
                w = module.get_base_layer().weight  # [out, in]
                delta = sum(module.get_delta_weight(a) for a in module.active_adapters)  # [out, in]
                merged[f"{name}.weight"] = w + delta.to(w.dtype)
        state = {}
        for key, t in base.state_dict().items():
            if ".lora_" in key:
                continue
            key = key.replace(".base_layer.", ".")
            state[key] = merged.get(key, t)
    return base, state


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's bytes, in name order: equal across ranks."""
    h = hashlib.sha256()
    for name, p in sorted(state.items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
