"""Stage two: train a student from cached teacher targets. Readable top to bottom.

setup (caches, checks, model, optimizer, resume) -> loop: micro-steps (forward,
losses, backward) -> clip -> step -> log -> checkpoint. The teacher is never
loaded: only `teacher_cache.open_cache` and the student are.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from student_train import losses
from student_train.checks import (
    check_student_matches,
    check_student_model,
    check_temperature,
    domain_overlap,
    longer_than,
    template_differs,
)
from student_train.data import Batch, Plan, SampleStream, collate
from teacher_cache.cache import inside_cache
from teacher_cache.errors import first_of, one_line, os_reason, parse_json
from teacher_cache.settings import normalise
from teacher_cache.storage import LockedError, as_umask_allows, exclusive, fsync_dir, is_url, remove_if_unused


class TrainError(RuntimeError):
    """A training run that cannot start or continue; one line for the user."""


PRECISIONS = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; saved in every checkpoint (a resume must match it)."""

    student: str  # preset name or checkpoint directory
    caches: tuple[str, ...]
    out: str  # run directory: checkpoints, metrics.jsonl
    max_steps: int = 100
    batch_size: int = 8  # samples per micro-batch (per rank)
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.0
    clip: float = 1.0
    lam: float = 1.0  # (1 - lam) * CE + lam * (KD + attn_weight * attention)
    temperature: float = 1.0
    attn_weight: float = 0.0
    attention_layer_map: tuple[tuple[int, int], ...] = ()  # (teacher layer, student layer); () = identity
    domain_ratio: float | None = None
    seed: int = 0
    shuffle_window: int = 4  # shards mixed by the shuffle buffer
    save_every: int = 50
    keep_last: int = 0  # checkpoints kept: the newest N complete ones; 0 = every one
    num_workers: int = 0  # dataloader workers
    chunk_size: int = 1024  # target positions per vocabulary chunk in the losses
    gradient_checkpointing: bool = False
    lora_rank: int = 0
    fsdp: bool = False  # under torchrun: FSDP2 (fully_shard per decoder layer) instead of DDP
    precision: str = "auto"  # autocast: "bf16", "fp32", or "auto" = bf16 on a CUDA device that has it
    resume: bool = False
    progress: bool = True
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        normalise(self)  # built from Python: a Path, or one cache not in a tuple, is fine
        floats = ("lr", "min_lr_ratio", "weight_decay", "clip", "lam", "temperature", "attn_weight")
        bad = [f"--{k.replace('_', '-')}" for k in floats if not math.isfinite(getattr(self, k))]
        if bad or (self.domain_ratio is not None and not math.isfinite(self.domain_ratio)):
            raise TrainError(f"{', '.join(bad) or '--domain-ratio'} must be a finite number")
        ratio = self.domain_ratio
        rules = (  # option, value, whether it holds, what it must be
            ("--lr", self.lr, self.lr > 0, "> 0"),
            ("--min-lr-ratio", self.min_lr_ratio, 0 <= self.min_lr_ratio <= 1, "within [0, 1]"),
            ("--weight-decay", self.weight_decay, self.weight_decay >= 0, ">= 0"),
            ("--clip", self.clip, self.clip > 0, "> 0 (the gradient-norm threshold)"),
            ("--lam", self.lam, 0 <= self.lam <= 1, "within [0, 1]"),
            ("--temperature", self.temperature, self.temperature > 0, "> 0"),
            ("--attn-weight", self.attn_weight, self.attn_weight >= 0, ">= 0"),
            ("--domain-ratio", ratio, ratio is None or 0 <= ratio <= 1, "within [0, 1]"),
            ("--seed", self.seed, self.seed >= 0, ">= 0"),
            ("--keep-last", self.keep_last, self.keep_last >= 0, ">= 0 (0 keeps every checkpoint)"),
        )
        for option, value, holds, want in rules:
            if not holds:
                raise TrainError(f"{option} must be {want}, got {value:g}")
        if is_url(self.out):  # checkpoints are written, renamed and locked locally
            raise TrainError(f"--out {self.out}: a local run directory is needed (copy it to the store after)")
        if self.max_steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise TrainError("--max-steps, --batch-size and --grad-accum must be >= 1")
        teachers = [t for t, _ in self.attention_layer_map]
        if len(set(teachers)) != len(teachers):
            raise TrainError(f"--attention-layer-map names a teacher layer twice: {list(self.attention_layer_map)}")
        if self.fsdp and self.lora_rank:
            raise TrainError("--fsdp with --lora-rank is not supported: use one or the other")
        if self.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:  # torchrun's; one process shards nothing
            raise TrainError(
                "--fsdp shards the student across torchrun's processes, and this is one process: "
                "start it with torchrun --nproc-per-node N (N > 1), or drop --fsdp"
            )
        # options that would do nothing: said, not ignored
        if self.attention_layer_map and self.attn_weight == 0:
            raise TrainError("--attention-layer-map needs --attn-weight > 0 (the attention loss is off)")
        if self.attn_weight > 0 and self.lam == 0:
            raise TrainError(
                "--attn-weight needs --lam > 0: the loss is (1 - lam) CE + lam (KD + attn-weight x attention)"
            )
        if self.precision not in PRECISIONS:
            raise TrainError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


def autocast_for(device: torch.device, precision: str) -> torch.autocast:
    """The autocast context of the forward pass: weights, gradients and optimizer state stay
    float32 and the losses upcast to float32; bf16 runs the matmuls in bfloat16 (CPU or CUDA)."""
    if precision == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        precision = "bf16" if cuda_bf16 else "fp32"
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def lr_at(step: int, *, lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to `lr`, then cosine to lr * min_ratio at `total` steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class DistillStep(nn.Module):
    """Student forward plus every loss, in one module so DDP sees one forward."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, kind: str, layer_map: list[tuple[int, int]]) -> None:
        super().__init__()
        self.model, self.cfg, self.kind, self.layer_map = model, cfg, kind, layer_map

    def forward(self, batch: Batch) -> dict[str, torch.Tensor | None]:
        from teacher_cache import attention

        cfg = self.cfg
        capture = None
        student_layers = [s for _, s in self.layer_map]
        if self.layer_map:
            lengths = batch.attention_mask.sum(1).tolist()
            positions = [batch.pos[batch.row == b] for b in range(batch.input_ids.shape[0])]  # [P_b] each
            # the student's own window: rows must match what its layers attend to
            capture = attention.RowCapture(positions, lengths, attention.sliding_window_of(self.model.config))
            # stays attached through backward: gradient checkpointing recomputes the rows there
            attention.attach(self.model, student_layers, capture)
        hidden = self.model.get_decoder()(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        ).last_hidden_state  # [B, T, D]
        h = hidden[batch.row, batch.pos]  # [P, D] at target positions
        weight = self.model.get_output_embeddings().weight  # [V, D]
        out: dict[str, torch.Tensor | None] = {}
        out["ce"] = losses.chunked_ce(h, weight, batch.labels, cfg.chunk_size) if cfg.lam < 1 else None
        kd_parts = {}
        if cfg.lam > 0:
            for name, sel in (("kd_domain", batch.is_domain), ("kd_general", ~batch.is_domain)):
                if bool(sel.any()):
                    kd_parts[name] = (self._kd(h[sel], weight, batch, sel), int(sel.sum()))
            n = sum(c for _, c in kd_parts.values())  # 0 for a micro-batch without target positions
            out["kd"] = sum(v * c for v, c in kd_parts.values()) / n if n else h.sum() * 0.0
            out.update({k: v.detach() for k, (v, _) in kd_parts.items()})
        out["attn"] = self._attention(batch, capture) if capture is not None else None
        out["loss"] = losses.total_loss(
            out["ce"] if out["ce"] is not None else h.sum() * 0.0,
            out.get("kd", h.sum() * 0.0),
            out["attn"],
            lam=cfg.lam,
            attn_weight=cfg.attn_weight,
        )
        return out

    def _kd(self, h: torch.Tensor, weight: torch.Tensor, b: Batch, sel: torch.Tensor) -> torch.Tensor:
        t, c = self.cfg.temperature, self.cfg.chunk_size
        if self.kind == "topk":
            return losses.chunked_topk_kl(
                h, weight, b.topk_ids[sel], b.topk_logprobs[sel], b.tail_logprob[sel], temperature=t, chunk_size=c
            )
        return losses.chunked_sampled_kl(
            h, weight, b.sampled_ids[sel], b.sampled_weights[sel], temperature=t, chunk_size=c
        )

    def _attention(self, b: Batch, capture) -> torch.Tensor:
        T = b.input_ids.shape[1]
        per_layer = []
        for li, student_layer in self.layer_map:  # li: the layer's index in the cache's attention layers
            rows = capture.rows[student_layer]  # list of [P_b, T_b] per batch row
            padded = torch.cat([nn.functional.pad(r, (0, T - r.shape[1])) for r in rows])  # [P, T]
            per_layer.append(losses.attention_kl(padded, b.attn_ids[li], b.attn_logprobs[li], b.attn_tail[li]))
        return torch.stack(per_layer).mean()


def _dist() -> tuple[int, int, bool]:
    """-> (rank, world size, whether this call started the process group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    started = world > 1 and not torch.distributed.is_initialized()
    if started:
        if torch.cuda.is_available():  # before NCCL and FSDP look at the current device (else GPU 0 for all)
            gpu, visible = _local_gpu(int(os.environ.get("RANK", "0"))), torch.cuda.device_count()
            if gpu >= visible:  # CUDA's own word for it is "invalid device ordinal"
                raise TrainError(
                    f"this process is local rank {gpu} and {visible} GPU{'s are' if visible > 1 else ' is'} visible: "
                    f"start at most {visible} per node (torchrun --nproc-per-node {visible}), "
                    "or hide the GPUs (CUDA_VISIBLE_DEVICES=) to train on the CPU"
                )
            torch.cuda.set_device(gpu)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return (torch.distributed.get_rank() if world > 1 else 0), world, started


def _local_gpu(rank: int) -> int:
    """This process's GPU: torchrun's LOCAL_RANK (one process per GPU on each node)."""
    return int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))


def _layer_map(cfg: TrainConfig, cache_layers: tuple[int, ...], n_student_layers: int) -> list[tuple[int, int]]:
    if cfg.attn_weight <= 0 or cfg.lam <= 0:
        return []
    if not cache_layers:
        raise TrainError("--attn-weight > 0 but the cache holds no attention summaries (cache with --attention-layers)")
    mapping = dict(cfg.attention_layer_map) if cfg.attention_layer_map else {t: t for t in cache_layers}
    unknown = [t for t in mapping if t not in cache_layers]
    if unknown:
        raise TrainError(
            f"--attention-layer-map names teacher layers {unknown} not in the cache ({list(cache_layers)})"
        )
    bad = [s for s in mapping.values() if not 0 <= s < n_student_layers]
    if bad:
        raise TrainError(f"student layers {bad} out of range: the student has {n_student_layers} layers")
    return [(cache_layers.index(t), s) for t, s in sorted(mapping.items())]


# settings a resumed run may change: they do not alter which samples come next or the math
_RESUMABLE = {"out", "resume", "save_every", "num_workers", "progress", "chunk_size", "gradient_checkpointing"}
_RESUMABLE |= {"keep_last", "precision", "trust_remote_code", "caches"}  # caches may move: their contents are compared


def _aside(ckpt: Path | None) -> str:
    """How to go on past a damaged checkpoint: resume from the one before it."""
    return f"; move {ckpt} aside to resume from the checkpoint before it" if ckpt else ""


def _read_trainer_state(ckpt: Path, cfg: TrainConfig) -> dict:
    """A checkpoint's trainer_state.json, its types checked (the resume trusts its step and data position)."""
    path = ckpt / "trainer_state.json"
    try:
        saved = parse_json(path.read_text())
    except (OSError, ValueError) as e:
        raise TrainError(f"{path}: unreadable ({one_line(e, 300)}){_aside(ckpt)}") from None
    try:
        ok = _valid_trainer_state(saved, ckpt, cfg)
    except TypeError:  # a field of another type than the checks compare
        ok = False
    if not ok:
        raise TrainError(f"{path}: not a trainer state this run can resume (step, data position, config){_aside(ckpt)}")
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


def _check_resume(ckpt: Path, saved: dict, cfg: TrainConfig, digests: list[str], student_path: str) -> None:
    """Refuse --resume with settings or caches other than the checkpoint's: the data position
    and the learning-rate schedule it saved would mean something else. The student is compared
    by the folder its name resolves to (a relative path from another directory is the same)."""
    before = saved.get("config", {})
    now = json.loads(json.dumps(asdict(cfg)))  # tuples as lists, as saved
    same = set(_RESUMABLE) | ({"student"} if saved.get("student_path") == student_path else set())
    changed = sorted(k for k in now if k not in same and k in before and before[k] != now[k])
    was = saved.get("caches_sha256", digests)
    if was != digests:  # the same caches in another order give another sample order
        changed.append("the caches' order" if sorted(was) == sorted(digests) else "the caches' contents")
    if changed:
        raise TrainError(
            f"{ckpt} was trained with other settings ({', '.join(changed)}); resume with the same ones, or "
            f"start a new run from it: --student {ckpt} --out NEW_DIR"
        )


def _check_window(layer_map: list[tuple[int, int]], windows: list[int | None], caches: list) -> None:
    """A student layer that attends within a sliding window cannot match teacher attention rows
    on keys beyond it (the KL is +inf), so if a mapped layer has one (windows[layer], None =
    full attention), the caches' sequences must fit in it."""
    mapped = [windows[s] for _, s in layer_map if windows[s] is not None]
    if not mapped:
        return
    window = min(mapped)
    longer = longer_than(window, caches)
    if longer:
        raise TrainError(
            f"{longer[0]}: sequences up to {longer[1]} tokens, but the student attends within a sliding "
            f"window of {window}: the attention loss needs caches made with --max-length <= {window}"
        )


METRICS = ("loss", "ce", "kd", "kd_domain", "kd_general", "attn")  # what DistillStep reports


def _across_ranks(
    sums: dict[str, float], counts: dict[str, int], tokens: int, device: torch.device
) -> tuple[dict[str, float], dict[str, int], int]:
    """One rank's metric sums, micro-batch counts and tokens -> those of every rank (one all-reduce)."""
    if unknown := sums.keys() - set(METRICS):
        raise RuntimeError(f"metrics {sorted(unknown)} missing from train.METRICS")
    # float64 [2, M + 1]: row 0 the sums then the tokens, row 1 the counts
    t = torch.tensor(
        [[sums.get(k, 0.0) for k in METRICS] + [float(tokens)], [float(counts.get(k, 0)) for k in METRICS] + [0.0]],
        dtype=torch.float64,
        device=device,
    )
    torch.distributed.all_reduce(t)
    held = [(i, k) for i, k in enumerate(METRICS) if t[1, i] > 0]
    return {k: float(t[0, i]) for i, k in held}, {k: int(t[1, i]) for i, k in held}, int(t[0, -1])


def _checkpoints(out: Path) -> list[Path]:
    """The complete checkpoint-N in `out` (each with its trainer_state.json), oldest first."""

    def step(p: Path) -> int:
        n = p.name.removeprefix("checkpoint-")
        return int(n) if n.isdigit() else -1

    return [p for p in sorted(out.glob("checkpoint-*"), key=step) if (p / "trainer_state.json").is_file()]


def latest_checkpoint(out: Path) -> Path | None:
    """The highest-numbered complete checkpoint-N in `out` (one with its trainer_state.json), or None."""
    ckpts = _checkpoints(out)
    return ckpts[-1] if ckpts else None


def prune_checkpoints(out: Path, keep: int) -> list[Path]:
    """Remove all but the newest `keep` complete checkpoints (-> the removed ones). Each is first
    renamed to a hidden .checkpoint-N.old (one atomic step: a kill mid-removal never leaves a
    half-deleted checkpoint-N that looks resumable), then deleted; leftovers of a killed removal go too."""
    complete = [p for p in _checkpoints(out) if p.name.removeprefix("checkpoint-").isdigit()]
    old = complete[:-keep] if keep else []
    for ckpt in old:
        gone = out / f".{ckpt.name}.old"
        shutil.rmtree(gone, ignore_errors=True)
        os.replace(ckpt, gone)
    fsync_dir(out)
    for gone in out.glob(".checkpoint-*.old"):
        shutil.rmtree(gone, ignore_errors=True)
    return old


def _fully_shard(model: nn.Module, root: nn.Module) -> None:
    """FSDP2 in place: one shard group per decoder layer (model.model.layers), the rest
    (embeddings, final norm, output head) in the group of `root`, the DistillStep whose forward
    calls the decoder and reads the head's weight directly; both need to be gathered there."""
    from torch.distributed.fsdp import fully_shard

    for layer in getattr(getattr(model, "model", None), "layers", []):
        fully_shard(layer)
    fully_shard(root)


def _full_state(model: nn.Module, *, rank0_cpu: bool = False) -> dict[str, torch.Tensor]:
    """Every rank calls: the unsharded state dict (rank0_cpu: only rank 0 gets it, on CPU)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=rank0_cpu))


def _save_sharded(
    out: Path, step: int, model: nn.Module, tok, optimizer, state: dict, cfg: TrainConfig, rank: int
) -> None:
    """_save for FSDP: every rank joins the gathers of weights and optimizer state; rank 0 writes
    the same plain checkpoint as without FSDP (optimizer state keyed by parameter name)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    weights = _full_state(model, rank0_cpu=True)
    optim = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        _save(out, step, model, tok, optimizer, state, cfg, weights=weights, fsdp_optimizer=optim)


def _save(
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


def _prune(out: Path, keep: int) -> None:
    """--keep-last after a checkpoint is on disk; a failure to delete (permissions) is one line."""
    try:
        prune_checkpoints(out, keep)
    except OSError as e:
        raise TrainError(
            f"could not remove old checkpoints in {out} for --keep-last {keep} ({one_line(e)}); the newest are "
            "kept: fix that, then rerun with --resume"
        ) from None


def _append(file, record: dict) -> None:
    """One JSON line onto a run's log (metrics.jsonl, samples.rankN.jsonl), flushed; a failed write
    (a full disk) is one line naming the file, and says that the checkpoints are kept."""
    try:
        file.write(json.dumps(record) + "\n")
        file.flush()
    except OSError as e:
        raise TrainError(
            f"could not write {file.name} at step {record['step']} ({one_line(e)}); the checkpoints before it "
            "are kept: free space or fix that, then rerun with --resume (steps after the checkpoint are redone)"
        ) from None


def _write_checkpoint(
    out: Path, step: int, tmp: Path, model, tok, optimizer, state: dict, cfg: TrainConfig, weights, fsdp_optimizer
) -> Path:
    final = out / f"checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    from teacher_cache.models import hf_progress

    with hf_progress(False):  # its "Writing model shards" bar would break the training bar (which says "saving")
        if cfg.lora_rank:  # a plain transformers model: adapters merged into their base weights
            base, merged = _merged_lora_state(model)
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
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(out)
    return final


def check_distinct(caches: list) -> list[str]:
    """The caches' digests; TrainError if one is given twice (its samples would count twice)."""
    digests = [c.digest for c in caches]
    twice = [str(c.where) for i, c in enumerate(caches) if digests[i] in digests[:i]]
    if twice:
        raise TrainError(f"{twice[0]}: the same cache is given twice (same manifest); give each --cache once")
    return digests


def _resume_point(cfg: TrainConfig, out: Path, caches: list, world: int, student_path: str) -> tuple[dict, Path | None]:
    """-> (state: step, samples per rank, elapsed, cache digests; the checkpoint to resume or None),
    after the checks: no cache twice, no run overwritten, the same settings and caches on resume."""
    digests = check_distinct(caches)
    state = {"step": 0, "samples_per_rank": 0, "elapsed_s": 0.0, "caches_sha256": digests, "world_size": world}
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
        _check_resume(ckpt, saved, cfg, digests, student_path)
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


def _load_student(load_from: str, cfg: TrainConfig, device: torch.device, attention_rows: bool, ckpt: Path | None):
    """The student in float32 on `device`, with the capturing attention when the attention loss is on."""
    from teacher_cache import attention
    from teacher_cache.models import load_causal_lm

    try:
        model = load_causal_lm(
            load_from,
            role="the student's weights",
            progress=cfg.progress,
            dtype=torch.float32,
            attn_implementation=attention.register() if attention_rows else "sdpa",
            trust_remote_code=cfg.trust_remote_code,
            use_safetensors=True,
        )
    except ValueError as e:  # every load failure (load_causal_lm); a damaged checkpoint has one before it
        raise TrainError(f"{e}{_aside(ckpt)}") from None
    return model.to(device)


def _restore_optimizer(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> None:
    """AdamW state and the RNG from ckpt/optimizer.pt (gathered by parameter name under FSDP)."""
    try:
        saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    except Exception as e:  # missing, truncated or foreign bytes
        raise TrainError(f"{ckpt / 'optimizer.pt'}: cannot load ({one_line(e, 300)}){_aside(ckpt)}") from None
    if not isinstance(saved, dict) or "rng" not in saved or not {"optimizer", "fsdp_optimizer"} & set(saved):
        raise TrainError(f"{ckpt / 'optimizer.pt'}: not a checkpoint's optimizer state{_aside(ckpt)}")
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


def train(cfg: TrainConfig) -> dict:
    """Train cfg.student on cfg.caches; returns the final state (step, samples seen, last metrics)."""
    with contextlib.ExitStack() as locks:  # --out's lock, released however the run ends
        return _train(cfg, locks)


RUN_FILE = re.compile(r"checkpoint-\d+|metrics\.jsonl|samples\.rank\d+\.jsonl|rank\d+\.json")  # what marks a run


def _check_run_dir(out: Path) -> None:
    """Refuse an --out that is a file, a teacher cache or inside one, or a folder of other files
    (a folder that already holds a run may hold anything else too: eval reports, plots)."""
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file, not a run directory")
    cache = inside_cache(out.resolve())  # teacher_cache.cache
    if cache is not None:
        raise TrainError(f"--out {out} is inside the teacher cache {cache}: use a directory of its own")
    names = sorted(os.listdir(out)) if out.is_dir() else []
    foreign = [n for n in names if not (RUN_FILE.fullmatch(n) or n.startswith("."))]  # .lock, .checkpoint-N.tmp
    if foreign and not any(RUN_FILE.fullmatch(n) for n in names):
        raise TrainError(
            f"--out {out} holds files that are not a training run's ({first_of(foreign)}): use an empty or new one"
        )


@contextlib.contextmanager
def _hold_run_dir(out: Path) -> Iterator[None]:
    """An exclusive lock on a run directory: two trainings in one --out would interleave metrics
    and checkpoints."""
    try:
        with exclusive(out / ".lock"):
            yield
    except LockedError as e:
        raise TrainError(
            f"{out} is in use by another training (pid {e.pid}); wait for it to end or use another --out"
        ) from None


def _train(cfg: TrainConfig, locks: contextlib.ExitStack) -> dict:
    from teacher_cache import attention, open_cache
    from teacher_cache.models import resolve_model
    from teacher_cache.tokenize import load_tokenizer

    # ---- setup: caches and the checks before the first step
    rank, world, started_group = _dist()
    torch.manual_seed(cfg.seed)
    caches = [open_cache(c) for c in cfg.caches]
    ref = resolve_model(cfg.student)
    tok = load_tokenizer(ref.path, ref.revision, trust_remote_code=cfg.trust_remote_code)
    wants_attention = cfg.attn_weight > 0 and cfg.lam > 0
    check_student_matches(tok, caches, attention=wants_attention)
    kind = caches[0].kind
    if cfg.lam > 0:
        check_temperature(kind, cfg.temperature)
    plan = Plan(caches, seed=cfg.seed, window=cfg.shuffle_window, domain_ratio=cfg.domain_ratio, world=world)
    template = template_differs(tok, caches)
    if template and rank == 0:
        print(f"warning: {template}", file=sys.stderr, flush=True)
    overlap = domain_overlap(caches)  # with or without --domain-ratio: both teachers train those samples
    if overlap and rank == 0:
        print(f"warning: {overlap}", file=sys.stderr, flush=True)
    if cfg.warmup_steps >= cfg.max_steps and rank == 0:
        peak = lr_at(cfg.max_steps - 1, lr=cfg.lr, warmup=cfg.warmup_steps, total=cfg.max_steps, min_ratio=1.0)
        print(
            f"warning: --warmup-steps {cfg.warmup_steps} >= --max-steps {cfg.max_steps}: the learning rate rises "
            f"through the whole run (to {peak:.3g} at the last step, of --lr {cfg.lr:g}) and never decays",
            file=sys.stderr,
            flush=True,
        )
    if cfg.domain_ratio in (0.0, 1.0) and rank == 0:  # legal (one kind only), but a cache given is never read
        domain = cfg.domain_ratio == 1.0
        unused = [str(c.where) for i, c in enumerate(caches) if (i in plan.domain_caches) != domain]
        if unused:
            side = "domain" if domain else "general"
            print(f"warning: --domain-ratio {cfg.domain_ratio:g} draws from the {side} caches only: "
                  f"{', '.join(unused)} unused", file=sys.stderr, flush=True)  # fmt: skip
    per_step = cfg.batch_size * world * cfg.grad_accum
    held = plan.short_stream(per_step)
    if rank == 0 and held is not None:  # legal (the stream cycles), but rarely what was meant
        what = "the caches hold" if cfg.domain_ratio is None else "one kind of cache (domain or general) holds"
        print(
            f"warning: a step takes {per_step} samples (batch size x ranks x grad accum) but {what} only "
            f"{held}: a step sees some samples twice",
            file=sys.stderr,
            flush=True,
        )
    out = Path(cfg.out)
    _check_run_dir(out)
    if not out.exists():  # a run that fails before its first file leaves no empty --out behind
        locks.callback(remove_if_unused, out, out / ".lock")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainError(f"--out {cfg.out}: cannot create it ({os_reason(e)})") from None
    if rank == 0:  # the other ranks write only their own samples.rankN.jsonl
        locks.enter_context(_hold_run_dir(out))

    # ---- resume point
    state, ckpt = _resume_point(cfg, out, caches, world, ref.path)
    if cfg.resume and ckpt is None and rank == 0:  # legal (a run killed before its first checkpoint), but say so
        print(f"note: no checkpoint in {out} to resume: starting at step 0", file=sys.stderr, flush=True)
    elif ckpt is not None and rank == 0:  # said even with --no-progress, whose bar would show the step
        print(f"resuming from {ckpt} (step {state['step']} of {cfg.max_steps})", file=sys.stderr, flush=True)
    if state["domain_mix"] == "per_index":  # a checkpoint from before: its order, so the resume is exact
        plan = Plan(caches, seed=cfg.seed, window=cfg.shuffle_window, domain_ratio=cfg.domain_ratio)
    load_from = str(ckpt) if ckpt else ref.path
    if world > 1:  # every rank has looked at --out before rank 0 starts writing into it
        torch.distributed.barrier()

    # ---- model
    device = torch.device("cuda", _local_gpu(rank)) if torch.cuda.is_available() else torch.device("cpu")
    model = _load_student(load_from, cfg, device, wants_attention, ckpt)
    layer_map = _layer_map(cfg, caches[0].attention_layers, model.config.num_hidden_layers)
    _check_window(layer_map, attention.layer_windows(model.config), caches)
    check_student_model(model.config.to_dict(), caches)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_rank:
        model = _lora(model, cfg.lora_rank)
    model.train()
    step_module: nn.Module = DistillStep(model, cfg, kind, layer_map)
    sharded = cfg.fsdp and world > 1
    if sharded:
        _fully_shard(model, step_module)
    elif world > 1:
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.index is not None else None
        )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        _param_groups(model, params, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), fused=None if sharded else True
    )
    if ckpt:
        _restore_optimizer(ckpt, model, optimizer, sharded)

    # ---- data, from the exact position the last run stopped at
    stream = SampleStream(
        caches, plan, rank=rank, world=world, start=state["samples_per_rank"], window=cfg.shuffle_window
    )
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=cfg.num_workers)
    rng = torch.get_rng_state()
    samples = iter(loader)  # draws a base seed from the global RNG: put back, so a resume is exact
    torch.set_rng_state(rng)
    autocast = autocast_for(device, cfg.precision)

    # ---- loop
    bar = None
    if cfg.progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=state["step"], desc="training", unit="step", file=sys.stderr)
    if rank == 0 and cfg.resume:  # drop metrics of steps after the checkpoint: they are redone
        _truncate_jsonl(out / "metrics.jsonl", state["step"])
    _truncate_jsonl(out / f"samples.rank{rank}.jsonl", state["step"])
    # both files are closed in the `finally` of the loop below
    metrics_file = open(out / "metrics.jsonl", "a") if rank == 0 else None  # noqa: SIM115
    samples_file = open(out / f"samples.rank{rank}.jsonl", "a")  # noqa: SIM115 (audit: samples per step)
    t_start = time.time() - state["elapsed_s"]
    last: dict = {}
    try:
        while state["step"] < cfg.max_steps:
            t0 = time.time()
            lr = lr_at(
                state["step"], lr=cfg.lr, warmup=cfg.warmup_steps, total=cfg.max_steps, min_ratio=cfg.min_lr_ratio
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            sums: dict[str, float] = {}
            counts: dict[str, int] = {}  # micro-batches that hold each value (kd_domain: those with domain rows)
            tokens = 0
            seen: list[str] = []
            for _ in range(cfg.grad_accum):
                rows = [_next_sample(samples) for _ in range(cfg.batch_size)]
                batch = collate(rows, plan.domain_caches, attention=bool(layer_map)).to(device)
                state["samples_per_rank"] += cfg.batch_size
                tokens += batch.tokens
                seen += batch.sample_ids
                with autocast:
                    parts = step_module(batch)
                (parts["loss"] / cfg.grad_accum).backward()
                for k, v in parts.items():
                    if v is not None:
                        sums[k] = sums.get(k, 0.0) + float(v.detach())
                        counts[k] = counts.get(k, 0) + 1
            if world > 1:  # every rank's micro-batches: a non-finite loss on one stops them all together
                sums, counts, tokens = _across_ranks(sums, counts, tokens, device)
            sums = {k: v / counts[k] for k, v in sums.items()}  # the step's mean of each
            finite = math.isfinite(sums.get("loss", 0.0))
            if not finite:  # before the step: no non-finite weights are saved
                raise TrainError(
                    f"step {state['step'] + 1}: the loss is not finite ({sums.get('loss')}); the checkpoints before "
                    "it are kept (lower --lr, or check --temperature and the caches)"
                )
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # DTensor under FSDP
            if not math.isfinite(grad_norm):  # the same on every rank (gradients are reduced): all stop
                raise TrainError(
                    f"step {state['step'] + 1}: the gradient is not finite (norm {grad_norm}) though the loss is; "
                    "the checkpoints before it are kept (lower --lr, or check the caches)"
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["elapsed_s"] = time.time() - t_start
            last = {
                "step": state["step"],
                **sums,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": tokens / max(time.time() - t0, 1e-9),
                "samples_seen": state["samples_per_rank"] * world,
                "elapsed_s": state["elapsed_s"],
            }
            _append(samples_file, {"step": state["step"], "samples": seen})
            if metrics_file is not None:
                _append(metrics_file, last)
            if bar is not None:
                shown = {"loss": f"{sums['loss']:.4f}", "tok_s": f"{last['tokens_per_s']:,.0f}"}
                bar.update(1)
                bar.set_postfix(shown)
            if state["step"] % cfg.save_every == 0 or state["step"] == cfg.max_steps:
                if bar is not None:
                    bar.set_postfix(loss=shown["loss"], saving=f"checkpoint-{state['step']}")
                if sharded:  # every rank joins the gathers, rank 0 writes
                    _save_sharded(out, state["step"], model, tok, optimizer, state, cfg, rank)
                elif rank == 0:
                    _save(out, state["step"], model, tok, optimizer, state, cfg)
                if rank == 0 and cfg.keep_last:
                    _prune(out, cfg.keep_last)
                if bar is not None:
                    bar.set_postfix(shown)
            if world > 1:
                torch.distributed.barrier()
    finally:
        if layer_map:
            attention.attach(model, [s for _, s in layer_map], None)
        if bar is not None:
            bar.close()
        for log in (metrics_file, samples_file):
            if log is not None:
                with contextlib.suppress(OSError):  # a write that failed fails its flush again: said above
                    log.close()
    if sharded:  # gathered to rank 0's CPU only (a 7B student must not be unsharded on every rank)
        full = _full_state(model, rank0_cpu=True)
        box = [_weights_digest(full) if rank == 0 else None]
        torch.distributed.broadcast_object_list(box, src=0)
        digest = box[0]
    else:
        digest = _weights_digest(model.state_dict())
    if world > 1:  # no rank tears the process group down while another still gathers
        torch.distributed.barrier()
        if started_group:
            torch.distributed.destroy_process_group()
    (out / f"rank{rank}.json").write_text(json.dumps({**state, "weights_sha256": digest}) + "\n")
    return {**state, "last": last, "checkpoint": str(out / f"checkpoint-{state['step']}"), "weights_sha256": digest}


def _param_groups(model: nn.Module, params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """AdamW groups: --weight-decay on weight matrices, none on norms, biases and the embeddings
    (decay would pull a norm's gain to 0, not to 1). One group when there is no decay, as before."""
    if weight_decay == 0:
        return [{"params": params, "weight_decay": 0.0}]
    embeddings = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    decayed = {id(p) for p in params if p.ndim >= 2 and id(p) not in embeddings}
    return [
        {"params": [p for p in params if id(p) in decayed], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0},
    ]


def _next_sample(samples):
    """The next sample; a DataLoader worker's error re-raised as its own last line (the loader
    wraps it in 'Caught X in DataLoader worker process N. Original Traceback ...')."""
    try:
        return next(samples)
    except Exception as e:
        text = str(e)
        if "Original Traceback" not in text:
            raise
        last = text.strip().splitlines()[-1]
        raise TrainError(last.split(": ", 1)[1] if ": " in last else last) from None


def _weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's bytes, in name order: equal across ranks."""
    h = hashlib.sha256()
    for name, p in sorted(state.items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _truncate_jsonl(path: Path, max_step: int) -> None:
    """Keep the lines of steps <= max_step; a torn last line (a kill or full disk mid-write) is dropped."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = []
    for i, line in enumerate(lines):
        try:
            step = parse_json(line)["step"]
        except (ValueError, KeyError, TypeError):
            if i == len(lines) - 1:
                break
            raise TrainError(f"{path}:{i + 1}: not a JSON line with a step; fix or delete that line") from None
        if isinstance(step, int) and step <= max_step:
            keep.append(line)
    path.write_text("".join(line + "\n" for line in keep))


def _merged_lora_state(model: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor]]:
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


def _lora(model: nn.Module, rank: int) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise TrainError("--lora-rank needs the peft package (pip install peft)") from None
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return get_peft_model(model, cfg)
