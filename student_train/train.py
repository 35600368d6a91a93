"""Stage two: train a student from cached teacher targets. Readable top to bottom.

setup (caches, checks, run directory, resume point, student, optimizer) -> loop of steps
(micro-batches: forward, losses, backward -> clip -> AdamW) -> log -> checkpoint. The teacher
is never loaded: only `teacher_cache.open_cache` and the student are. Settings: config.py;
checkpoints and resume: checkpoints.py; torchrun ranks: distributed.py.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from student_train import distributed, losses
from student_train.checkpoints import (
    aside,
    latest_checkpoint,
    prune,
    restore_optimizer,
    resume_point,
    save,
    save_sharded,
    sweep_partial_checkpoints,
    weights_digest,
)
from student_train.checks import (
    attention_layer_map,
    check_student_matches,
    check_student_model,
    check_temperature,
    domain_overlap,
    repeated_samples,
    template_differs,
)
from student_train.config import TrainConfig, TrainError
from student_train.data import Batch, Plan, collate, load_samples
from student_train.evaluate import HeldOut, position_stats
from teacher_cache.cache import inside_cache
from teacher_cache.errors import first_of, one_line, os_reason, parse_json
from teacher_cache.progress import bar as progress_bar
from teacher_cache.progress import log
from teacher_cache.shards import ShardError
from teacher_cache.storage import LockedError, StorageError, exclusive, remove_if_unused, write_atomic

# the API (TrainConfig and TrainError live in config.py); the rest is the loop's
__all__ = ["DistillStep", "TrainConfig", "TrainError", "latest_checkpoint", "lr_at", "train"]


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

    def forward(self, batch: Batch, stats_of: Callable | None = None) -> dict[str, torch.Tensor | None]:
        """Every loss of the batch; with `stats_of` (evaluate.position_stats), {"stats": what it
        gives for the model and batch} instead (held-out evaluation: under FSDP it must come
        through this module, which gathers the head and embeddings)."""
        from teacher_cache import attention

        if stats_of is not None:
            return {"stats": stats_of(self.model, batch)}
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
        raise TrainError(f"{e}{aside(ckpt)}") from None
    return model.to(device)


def train(cfg: TrainConfig) -> dict:
    """Train cfg.student on cfg.caches. Returns a dict: the trainer state the last checkpoint saved
    ("step", "samples_per_rank", "elapsed_s", ...), "last" (the metrics of the last step this call
    ran, as its metrics.jsonl line; {} if it ran none), "checkpoint" (that checkpoint's folder, a
    str) and "weights_sha256"."""
    # the run seeds torch's RNG: the caller's (a notebook's) CPU RNG is put back after (not the GPUs':
    # saving those would start a CUDA context on every GPU in every rank)
    with torch.random.fork_rng(devices=[]), contextlib.ExitStack() as locks:  # --out's lock, however it ends
        return _train(cfg, locks)


RUN_FILE = re.compile(r"checkpoint-\d+|(metrics|eval)\.jsonl|samples\.rank\d+\.jsonl|rank\d+\.json")  # what marks a run


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
    from teacher_cache import open_cache
    from teacher_cache.models import resolve_model
    from teacher_cache.tokenize import load_tokenizer

    # ---- setup: caches and the checks before the first step
    rank, world, started_group = distributed.start()
    torch.manual_seed(cfg.seed)
    caches = [open_cache(c) for c in cfg.caches]
    ref = resolve_model(cfg.student)
    tok = load_tokenizer(ref.path, ref.revision, trust_remote_code=cfg.trust_remote_code)
    wants_attention = cfg.wants_attention
    check_student_matches(tok, caches, attention=wants_attention)
    if cfg.lam > 0:
        check_temperature(caches[0].kind, cfg.temperature)
    plan = Plan(caches, seed=cfg.seed, window=cfg.shuffle_window, domain_ratio=cfg.domain_ratio, world=world)
    held_out = HeldOut(cfg.eval_caches, cfg.eval_samples, tok) if cfg.eval_caches else None
    warnings = _start_warnings(cfg, caches, plan, tok, world) + (held_out.not_held_out(caches) if held_out else [])
    out = _open_run_dir(cfg, locks, rank)

    # ---- resume point
    state, ckpt = resume_point(cfg, out, caches, world, ref.path)
    for warning in warnings:  # once --out and the resume are accepted: a refused run says only why
        if rank == 0:
            log(f"warning: {warning}")
    if cfg.resume and ckpt is None and rank == 0:  # legal (a run killed before its first checkpoint), but say so
        log(f"note: no checkpoint in {out} to resume: starting at step 0")
    elif ckpt is not None and rank == 0:  # said even with --no-progress, whose bar would show the step
        log(f"resuming from {ckpt} (step {state['step']} of {cfg.max_steps})")
    if state["domain_mix"] == "per_index":  # a checkpoint from before: its order, so the resume is exact
        plan = Plan(caches, seed=cfg.seed, window=cfg.shuffle_window, domain_ratio=cfg.domain_ratio)
    if world > 1:  # every rank has looked at --out before rank 0 starts writing into it
        torch.distributed.barrier()

    # ---- student, optimizer, then the data from the exact position the last run stopped at
    student = _build_student(cfg, str(ckpt) if ckpt else ref.path, ckpt, caches, rank, world, wants_attention)
    if held_out is not None:
        check_student_model(student.model.config.to_dict(), held_out.caches)
    samples = _samples(cfg, caches, plan, rank, world, state["samples_per_rank"])

    # ---- loop
    bar = progress_bar(cfg.max_steps, "training", "step", initial=state["step"]) if cfg.progress and rank == 0 else None
    logs = _RunLogs(out, rank, state["step"], resume=cfg.resume, evaluating=held_out is not None)
    t_start = time.time() - state["elapsed_s"]
    last: dict = {}
    try:
        while state["step"] < cfg.max_steps:
            last, seen = _step(cfg, student, samples, plan, state, world, t_start)
            logs.append(last, seen)
            if bar is not None:
                _show(bar, last)
                bar.update(1)  # draws the step's postfix with it (at most every 30 s into a log)
            last_step = state["step"] == cfg.max_steps
            if state["step"] % cfg.save_every == 0 or last_step:
                if bar is not None:
                    _show(bar, last, saving=f"checkpoint-{state['step']}")
                _checkpoint(out, cfg, student, tok, state, rank)
                if bar is not None:
                    _show(bar, last)
            # after the checkpoint: an evaluation that fails (a damaged or unreachable eval cache,
            # out of memory) loses no training
            if held_out is not None and (state["step"] % cfg.eval_interval == 0 or last_step):
                _evaluate(held_out, cfg, student, rank, world, bar, logs, last)
            if world > 1:
                torch.distributed.barrier()
    except (ShardError, StorageError) as e:  # a cache read failed mid-run (a damaged shard, the network)
        raise type(e)(f"{one_line(e)}; {resume_advice(out)}") from None
    finally:
        student.detach_rows()
        if bar is not None:
            bar.close()
        logs.close()
    digest = _final_digest(student, rank)
    if world > 1:  # no rank tears the process group down while another still gathers
        torch.distributed.barrier()
        if started_group:
            torch.distributed.destroy_process_group()
    (out / f"rank{rank}.json").write_text(json.dumps({**state, "weights_sha256": digest}) + "\n")
    return {**state, "last": last, "checkpoint": str(out / f"checkpoint-{state['step']}"), "weights_sha256": digest}


def _start_warnings(cfg: TrainConfig, caches: list, plan: Plan, tok, world: int) -> list[str]:
    """What is legal but rarely meant, said before the first step (rank 0 prints them)."""
    said = []
    if template := template_differs(tok, caches):
        said.append(template)
    if overlap := domain_overlap(caches):  # with or without --domain-ratio: both teachers train those samples
        said.append(overlap)
    if repeated := repeated_samples(caches):
        said.append(repeated)
    if cfg.warmup_steps >= cfg.max_steps:
        peak = lr_at(cfg.max_steps - 1, lr=cfg.lr, warmup=cfg.warmup_steps, total=cfg.max_steps, min_ratio=1.0)
        said.append(
            f"--warmup-steps {cfg.warmup_steps} >= --max-steps {cfg.max_steps}: the learning rate rises "
            f"through the whole run (to {peak:.3g} at the last step, of --lr {cfg.lr:g}) and never decays"
        )
    if cfg.domain_ratio in (0.0, 1.0):  # one kind only: a cache given is never read
        domain = cfg.domain_ratio == 1.0
        unused = [str(c.where) for i, c in enumerate(caches) if (i in plan.domain_caches) != domain]
        if unused:
            side = "domain" if domain else "general"
            said.append(
                f"--domain-ratio {cfg.domain_ratio:g} draws from the {side} caches only: {', '.join(unused)} unused"
            )
    per_step = cfg.batch_size * world * cfg.grad_accum
    held = plan.short_stream(per_step)
    if held is not None:  # the stream cycles
        what = "the caches hold" if cfg.domain_ratio is None else "one kind of cache (domain or general) holds"
        said.append(
            f"a step takes {per_step} samples (batch size x ranks x grad accum) but {what} only "
            f"{held}: a step sees some samples twice"
        )
    return said


def _open_run_dir(cfg: TrainConfig, locks: contextlib.ExitStack, rank: int) -> Path:
    """--out checked, created and (rank 0) locked until the run ends; a run that fails before its
    first file leaves no empty --out behind."""
    out = Path(cfg.out)
    _check_run_dir(out)
    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainError(f"--out {cfg.out}: cannot create it ({os_reason(e)})") from None
    if rank == 0:  # the other ranks write only their own samples.rankN.jsonl
        locks.enter_context(_hold_run_dir(out))
        if made:  # removed (if it holds nothing but the lock) before the lock is let go; a run
            # refused the lock removes nothing: the folder is the holder's, even if both made it
            locks.callback(remove_if_unused, out, out / ".lock")
        sweep_partial_checkpoints(out)  # a killed run's, now that no other run can be writing one
    return out


@dataclass
class _Student:
    """The student as the loop drives it."""

    model: nn.Module  # the transformers model (a peft model with --lora-rank)
    step: nn.Module  # DistillStep around it: forward plus losses (in DDP across unsharded ranks)
    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]  # the trained ones
    layer_map: list[tuple[int, int]]  # (index in the caches' attention layers, student layer)
    sharded: bool  # FSDP2 across ranks
    device: torch.device
    autocast: torch.autocast  # --precision on this device

    def detach_rows(self) -> None:
        """Take the attention-row capture off the student's layers (DistillStep attaches it each step)."""
        from teacher_cache import attention

        if self.layer_map:
            attention.attach(self.model, [s for _, s in self.layer_map], None)


def _build_student(
    cfg: TrainConfig, load_from: str, ckpt: Path | None, caches: list, rank: int, world: int, wants_attention: bool
) -> _Student:
    """The student loaded, checked against the caches, wrapped for the ranks, with its AdamW
    (state and RNG restored from ckpt on a resume)."""

    device = torch.device("cuda", distributed.local_gpu(rank)) if torch.cuda.is_available() else torch.device("cpu")
    model = _load_student(load_from, cfg, device, wants_attention, ckpt)
    layer_map = attention_layer_map(cfg.attention_layer_map, caches, model.config) if wants_attention else []
    check_student_model(model.config.to_dict(), caches)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_rank:
        model = _lora(model, cfg.lora_rank)
    model.train()
    step: nn.Module = DistillStep(model, cfg, caches[0].kind, layer_map)
    sharded = cfg.fsdp and world > 1
    if sharded:
        distributed.fully_shard(model, step)
    elif world > 1:
        step = nn.parallel.DistributedDataParallel(step, device_ids=None if device.index is None else [device.index])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        _param_groups(model, params, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), fused=None if sharded else True
    )
    if ckpt:
        restore_optimizer(ckpt, model, optimizer, sharded)
    return _Student(model, step, optimizer, params, layer_map, sharded, device, autocast_for(device, cfg.precision))


def _samples(cfg: TrainConfig, caches: list, plan: Plan, rank: int, world: int, start: int) -> Iterator:
    """This rank's samples from its `start`-th on (a resume continues where the checkpoint stopped)."""
    window = cfg.shuffle_window
    return load_samples(caches, plan, rank=rank, world=world, start=start, window=window, num_workers=cfg.num_workers)


def _step(
    cfg: TrainConfig, student: _Student, samples: Iterator, plan: Plan, state: dict, world: int, t_start: float
) -> tuple[dict, list[str]]:
    """One optimizer step over cfg.grad_accum micro-batches; advances `state` and returns (the
    step's metrics line, the ids of the samples it read). A loss or gradient that is not finite
    stops the run before the update."""
    t0 = time.time()
    lr = lr_at(state["step"], lr=cfg.lr, warmup=cfg.warmup_steps, total=cfg.max_steps, min_ratio=cfg.min_lr_ratio)
    for group in student.optimizer.param_groups:
        group["lr"] = lr
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}  # micro-batches that hold each value (kd_domain: those with domain rows)
    tokens = 0
    seen: list[str] = []
    for _ in range(cfg.grad_accum):
        rows = [_next_sample(samples) for _ in range(cfg.batch_size)]
        batch = collate(rows, plan.domain_caches, attention=bool(student.layer_map)).to(student.device)
        state["samples_per_rank"] += cfg.batch_size
        tokens += batch.tokens
        seen += batch.sample_ids
        with student.autocast:
            parts = student.step(batch)
        (parts["loss"] / cfg.grad_accum).backward()
        for k, v in parts.items():
            if v is not None:
                sums[k] = sums.get(k, 0.0) + float(v.detach())
                counts[k] = counts.get(k, 0) + 1
    if world > 1:  # every rank's micro-batches: a non-finite loss on one stops them all together
        sums, counts, tokens = distributed.across_ranks(sums, counts, tokens, student.device)
    sums = {k: v / counts[k] for k, v in sums.items()}  # the step's mean of each
    if not math.isfinite(sums.get("loss", 0.0)):  # before the step: no non-finite weights are saved
        raise TrainError(
            f"step {state['step'] + 1}: the loss is not finite ({sums.get('loss')}); the checkpoints before "
            "it are kept (lower --lr, or check --temperature and the caches)"
        )
    norm = torch.nn.utils.clip_grad_norm_(student.params, cfg.clip)
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # DTensor under FSDP
    if not math.isfinite(grad_norm):  # the same on every rank (gradients are reduced): all stop
        raise TrainError(
            f"step {state['step'] + 1}: the gradient is not finite (norm {grad_norm}) though the loss is; "
            "the checkpoints before it are kept (lower --lr, or check the caches)"
        )
    student.optimizer.step()
    student.optimizer.zero_grad(set_to_none=True)
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
    return last, seen


def _show(bar, last: dict, **doing: str) -> None:
    """The training bar's postfix: the step's loss, and its tokens/s or what it is doing now
    (saving=checkpoint-N, evaluating=...)."""
    shown = {"loss": f"{last['loss']:.4f}"}
    shown.update(doing or {"tok_s": f"{last['tokens_per_s']:,.0f}"})
    bar.set_postfix(shown, refresh=bool(doing))  # what it is doing is said at once; the rest waits for update()


def _evaluate(held_out: HeldOut, cfg: TrainConfig, student: _Student, rank: int, world: int, bar, logs, last) -> None:
    """Measure the held-out caches on the student as it is after this step: a line of eval.jsonl
    (rank 0) and, with the bar, a line on the terminal."""
    if bar is not None:
        _show(bar, last, evaluating=f"{len(held_out.items)} held-out samples")
    student.detach_rows()  # the training step's row capture must not see the evaluation's forwards
    stats_of = functools.partial(position_stats, kind=held_out.kind)  # at temperature 1, as student-train eval
    if student.sharded:  # through the sharded root (it gathers the head and embeddings), on every rank in step
        forward = lambda b: student.step(b, stats_of=stats_of)["stats"]  # noqa: E731
    else:  # the model itself: a DDP wrapper's forward would sync buffers across ranks
        forward = functools.partial(stats_of, student.model)
    batch_size = cfg.eval_batch_size or cfg.batch_size
    report = held_out.measure(student.model, forward, batch_size=batch_size, device=student.device,
                              autocast=student.autocast, rank=rank, world=world, lockstep=student.sharded)  # fmt: skip
    logs.append_eval({"step": last["step"], **report})
    if bar is not None:
        _show(bar, last)  # drawn again under the line below
        a = report["all"]
        bar.write(f"step {last['step']}: held-out KL to the teacher {a['kl_to_teacher']:.4f}, NLL {a['nll']:.4f}, "
                  f"top-1 agreement {a['top1_agreement']:.3f} ({a['samples']} samples)")  # fmt: skip


def _checkpoint(out: Path, cfg: TrainConfig, student: _Student, tok, state: dict, rank: int) -> None:
    """checkpoint-STEP written (under FSDP every rank joins the gathers, rank 0 writes), then --keep-last."""
    if student.sharded:
        save_sharded(out, state["step"], student.model, tok, student.optimizer, state, cfg, rank)
    elif rank == 0:
        save(out, state["step"], student.model, tok, student.optimizer, state, cfg)
    if rank == 0 and cfg.keep_last:
        prune(out, cfg.keep_last)


def _final_digest(student: _Student, rank: int) -> str:
    """sha256 of the trained weights, the same on every rank (under FSDP gathered to rank 0's CPU
    only, then broadcast: a 7B student must not be unsharded on every rank)."""
    if not student.sharded:
        return weights_digest(student.model.state_dict())
    full = distributed.full_state(student.model, rank0_cpu=True)
    box = [weights_digest(full) if rank == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


class _RunLogs:
    """metrics.jsonl (rank 0) and samples.rankN.jsonl (the sample ids of each step), first cut
    back to `step` (the steps after the checkpoint are redone), then appended one line per step."""

    def __init__(self, out: Path, rank: int, step: int, *, resume: bool, evaluating: bool = False) -> None:
        if rank == 0 and resume:
            _truncate_jsonl(out / "metrics.jsonl", step)
            _truncate_jsonl(out / "eval.jsonl", step)
        _truncate_jsonl(out / f"samples.rank{rank}.jsonl", step)
        self.metrics = open(out / "metrics.jsonl", "a") if rank == 0 else None  # noqa: SIM115 (closed by close())
        self.samples = open(out / f"samples.rank{rank}.jsonl", "a")  # noqa: SIM115
        self.eval = open(out / "eval.jsonl", "a") if rank == 0 and evaluating else None  # noqa: SIM115

    def append_eval(self, report: dict) -> None:
        if self.eval is not None:
            _append(self.eval, report)

    def append(self, last: dict, seen: list[str]) -> None:
        _append(self.samples, {"step": last["step"], "samples": seen})
        if self.metrics is not None:
            _append(self.metrics, last)

    def close(self) -> None:
        for file in (self.metrics, self.samples, self.eval):
            if file is not None:
                with contextlib.suppress(OSError):  # a write that failed fails its flush again: said already
                    file.close()


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
    wraps it in 'Caught X in DataLoader worker process N. Original Traceback ...'), a cache's
    ShardError or StorageError as one still."""
    try:
        return next(samples)
    except Exception as e:
        text = str(e)
        if "Original Traceback" not in text:
            raise
        last = text.strip().splitlines()[-1]
        message = last.split(": ", 1)[1] if ": " in last else last
        if isinstance(e, (ShardError, StorageError)):  # the loader re-raised the worker's type: kept
            raise type(e)(message) from None
        raise TrainError(message) from None


def resume_advice(out: Path) -> str:
    """What a stopped training leaves, for its message: the checkpoint a resume starts from, if any."""
    latest = latest_checkpoint(out) if out.is_dir() else None
    if latest is None:
        return "no checkpoint was written yet: the same command with --resume starts again at step 0"
    return f"{latest.name} is the latest checkpoint; the same command with --resume continues from it"


def _append(file, record: dict) -> None:
    """One JSON line onto a run's log (metrics.jsonl, samples.rankN.jsonl), flushed; a failed write
    (a full disk) is one line naming the file, and says that the checkpoints are kept."""
    try:
        file.write(json.dumps(record) + "\n")
        file.flush()
    except OSError as e:
        kept = (
            "the checkpoints before it are kept"
            if latest_checkpoint(Path(file.name).parent)
            else "no checkpoint was written yet (--resume starts again at step 0)"
        )
        raise TrainError(
            f"could not write {file.name} at step {record['step']} ({one_line(e)}); {kept}: free space or fix "
            "that, then rerun with --resume (steps after the checkpoint are redone)"
        ) from None


def _truncate_jsonl(path: Path, max_step: int) -> None:
    """Keep the lines of steps <= max_step; a torn last line (a kill or full disk mid-write) is dropped."""
    if not path.is_file():
        return
    raw = path.read_text()
    lines = [line for line in raw.splitlines() if line.strip()]
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
    if len(keep) < len(lines) or not raw.endswith("\n"):
        write_atomic(path, "".join(line + "\n" for line in keep).encode())  # a kill mid-way keeps the old file


def _lora(model: nn.Module, rank: int) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise TrainError("--lora-rank needs the peft package (pip install peft)") from None
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return get_peft_model(model, cfg)
