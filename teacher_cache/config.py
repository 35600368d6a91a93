"""A cache run's settings (`RunConfig`, checked when built; recorded in the manifest) and its
one-line error."""

from __future__ import annotations

import os
from dataclasses import dataclass

from teacher_cache import codec
from teacher_cache.manifest import MAX_NUM_DRAWS
from teacher_cache.settings import normalise
from teacher_cache.shards import CHUNK_BYTES, MAX_CHUNK_BYTES
from teacher_cache.storage import is_url


def same_file(data: str) -> str:
    """A --data path made absolute, so that two spellings of one local file compare equal and the
    manifest says where it was, whatever the working directory (URLs as given)."""
    return data if is_url(data) else os.path.abspath(data)


class RunError(RuntimeError):
    """A run that cannot start or continue; the message is one line for the user."""


@dataclass(frozen=True)
class RunConfig:
    """Everything a cache run depends on (the CLI's options); recorded in the manifest.

    Checked as the CLI checks its options, with its messages. A setting the others leave unused
    and that changes nothing in the cache (`top_k` with sampled targets, `num_draws` with top-k,
    `logprob_error` with sampled targets and no attention layers, `attention_top_k` with none) is
    accepted at any value, so one dict of settings can make either kind; `seed` with top-k targets
    draws nothing but is hashed, so a value other than 0 is refused, as the CLI refuses `--seed`."""

    teacher: str  # preset name or checkpoint directory
    data: tuple[str, ...]  # JSONL / Parquet files or fsspec URLs
    out: str  # cache directory or fsspec URL (s3://bucket/prefix, ...)
    backend: str = "auto"  # auto | vllm | hf
    vllm_mode: str = "hidden"  # hidden (fast) | prompt_logprobs (stock reference)
    tensor_parallel_size: int = 1  # vllm: the teacher split across this many GPUs (CPU: core groups)
    targets: str = "topk"  # topk | sampled
    top_k: int = 32
    num_draws: int = 50  # sampled targets: draws per position
    logprob_error: float = codec.MAX_ERROR  # top-k and attention log-probs: bound in nats (codec step / 2)
    attention_layers: tuple[int, ...] = ()
    attention_top_k: int = 16
    max_length: int = 2048
    batch_size: int = 16  # samples per teacher forward
    shard_size: int = 256  # samples per shard
    chunk_bytes: int = CHUNK_BYTES  # a sha256 per this many shard bytes: readers check while streaming
    only_domain: str | None = None
    exclude_domain: str | tuple[str, ...] | None = None  # one domain, or several (a reference beside experts)
    skip_bad: bool = False
    worker_index: int = 0
    num_workers: int = 1
    seed: int = 0
    source: str | None = None  # tag on every row; defaults to the teacher's name
    trust_remote_code: bool = False
    progress: bool = True

    @property
    def excluded(self) -> tuple[str, ...]:
        """The --exclude-domain domains, in order given."""
        d = self.exclude_domain
        return () if d is None else (d,) if isinstance(d, str) else tuple(d)

    @property
    def exclude_header(self) -> str | list[str] | None:
        """exclude_domain as the manifest records it: a string for one domain (as before several
        were allowed, so such a cache's config hash is unchanged), a sorted list for several."""
        d = sorted(set(self.excluded))
        return None if not d else d[0] if len(d) == 1 else d

    def __post_init__(self) -> None:
        normalise(self)  # built from Python: a Path, or one data file not in a tuple, is fine
        checks = [
            (self.backend in ("auto", "vllm", "hf"), f"unknown backend {self.backend!r} (auto, vllm, hf)"),
            (
                self.vllm_mode in ("hidden", "prompt_logprobs"),
                f"unknown vllm mode {self.vllm_mode!r} (hidden, prompt_logprobs)",
            ),
            (self.targets in ("topk", "sampled"), f"unknown target kind {self.targets!r} (topk, sampled)"),
            (self.top_k >= 1, "--top-k must be >= 1"),
            (1 <= self.num_draws <= MAX_NUM_DRAWS, f"--num-draws must be in [1, {MAX_NUM_DRAWS}]"),
            (self.attention_top_k >= 1, "--attention-top-k must be >= 1"),
            (self.max_length >= 2, "--max-length must be >= 2"),
            (self.batch_size >= 1 and self.shard_size >= 1, "--batch-size and --shard-size must be >= 1"),
            (4096 <= self.chunk_bytes <= MAX_CHUNK_BYTES, f"--chunk-bytes must be in [4096, {MAX_CHUNK_BYTES}]"),
            (
                self.num_workers >= 1 and 0 <= self.worker_index < self.num_workers,
                "--worker-index must be in [0, --num-workers)",
            ),
            (bool(self.data), "no data files given"),
            (len({same_file(d) for d in self.data}) == len(self.data), "--data names a file twice"),
            (self.seed >= 0, f"--seed must be >= 0, got {self.seed}"),
            # hashed (data.seed) though top-k draws nothing: a cache the CLI, which refuses --seed
            # with top-k, could never resume or finish (its other workers' settings differ)
            (self.targets == "sampled" or self.seed == 0, "--seed has no effect with --targets topk"),
            (not (self.only_domain and self.excluded), "--only-domain and --exclude-domain exclude each other"),
            (all(a >= 0 for a in self.attention_layers), "attention layers must be >= 0"),
            (len(set(self.attention_layers)) == len(self.attention_layers), "--attention-layers lists a layer twice"),
            (
                self.backend != "hf" or self.vllm_mode == "hidden",
                "--vllm-mode applies to the vllm backend only, not --backend hf",
            ),
            (self.tensor_parallel_size >= 1, "--tensor-parallel-size must be >= 1"),
            (
                self.backend != "hf" or self.tensor_parallel_size == 1,
                "--tensor-parallel-size applies to the vllm backend only, not --backend hf",
            ),
            (
                not (self.targets == "sampled" and self.vllm_mode == "prompt_logprobs"),
                "sampled targets need full logits: use --vllm-mode hidden or --backend hf",
            ),
            *(
                (value is None or bool(value.strip()), f"{option} must not be empty")
                for option, value in (
                    ("--teacher", self.teacher),
                    ("--out", self.out),
                    *(("--data", d) for d in self.data),
                    ("--only-domain", self.only_domain),
                    *(("--exclude-domain", d) for d in self.excluded),
                    ("--source", self.source),
                )
            ),
        ]
        for ok, why in checks:
            if not ok:
                raise RunError(why)
        try:
            units = codec.step_units(self.logprob_error)
        except ValueError as e:
            raise RunError(f"--logprob-error: {e}") from None
        # the bound as the CLI parses it: np.float32(0.02) is 0.019999999552965164, a bound the
        # manifest would record as another setting (no resume with --logprob-error 0.02, no merge)
        object.__setattr__(self, "logprob_error", units / 200)
