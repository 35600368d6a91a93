"""A training run's settings (`TrainConfig`, checked when built) and its one-line error."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from teacher_cache.settings import normalise
from teacher_cache.storage import is_url


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
    eval_caches: tuple[str, ...] = ()  # held-out caches: KL to the teacher, NLL, top-1 agreement -> eval.jsonl
    eval_every: int | None = None  # steps between evaluations; None: at every checkpoint (save_every)
    eval_samples: int | None = None  # per eval cache: its first N samples; None: all
    eval_batch_size: int | None = None  # samples per evaluation forward; None: batch_size

    @property
    def eval_interval(self) -> int:
        """Steps between held-out evaluations (with --eval-cache): --eval-every, else --save-every."""
        return self.eval_every if self.eval_every is not None else self.save_every

    @property
    def wants_attention(self) -> bool:
        """The attention loss is on (it is part of the KD term: lam > 0 too)."""
        return self.attn_weight > 0 and self.lam > 0

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
            # the CLI's ranges, for configs built in Python (save_every=0 failed after the first step)
            ("--warmup-steps", self.warmup_steps, self.warmup_steps >= 0, ">= 0"),
            ("--save-every", self.save_every, self.save_every >= 1, ">= 1"),
            ("--shuffle-window", self.shuffle_window, self.shuffle_window >= 1, ">= 1"),
            ("--num-workers", self.num_workers, self.num_workers >= 0, ">= 0"),
            ("--chunk-size", self.chunk_size, self.chunk_size >= 1, ">= 1"),
            ("--lora-rank", self.lora_rank, self.lora_rank >= 0, ">= 0 (0: no LoRA)"),
        )
        for option, value, holds, want in rules:
            if not holds:
                raise TrainError(f"{option} must be {want}, got {value:g}")
        if not self.caches:
            raise TrainError("no caches given (--cache)")
        paths = (("--student", self.student), ("--out", self.out), *(("--cache", c) for c in self.caches),
                 *(("--eval-cache", c) for c in self.eval_caches))  # fmt: skip
        blank = next((option for option, path in paths if not path.strip()), None)
        if blank is not None:  # "" is the working directory: a run written there, or a cache read from it
            raise TrainError(f"{blank} must not be empty")
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
        evals = (("--eval-every", self.eval_every), ("--eval-samples", self.eval_samples),
                 ("--eval-batch-size", self.eval_batch_size))  # fmt: skip
        if not self.eval_caches and any(value is not None for _, value in evals):
            raise TrainError(
                "--eval-every, --eval-samples and --eval-batch-size need --eval-cache (no evaluation is set)"
            )
        for option, value in evals:
            if value is not None and value < 1:
                raise TrainError(f"{option} must be >= 1, got {value}")
        if self.precision not in PRECISIONS:
            raise TrainError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


# settings a resumed run may change: they do not alter which samples come next or the math
RESUMABLE = {"out", "resume", "save_every", "num_workers", "progress", "chunk_size", "gradient_checkpointing"}


RESUMABLE |= {"keep_last", "precision", "trust_remote_code", "caches"}  # caches may move: their contents are compared
# evaluation reads the student, changes nothing
RESUMABLE |= {"eval_caches", "eval_every", "eval_samples", "eval_batch_size"}
