"""Teacher backends: one interface, two engines (vLLM and transformers).

A backend takes a batch of tokenised samples and yields, per sample and in order,
the teacher's output at the sample's target positions: full logits (which the
pipeline turns into top-k or sampled targets) or, for vLLM's stock prompt-logprobs
path, the top-k directly; plus head-averaged attention rows when asked for. No
engine object leaves its backend module.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from teacher_cache.targets import TopKTargets
from teacher_cache.tokenize import Tokenized


class EngineFailure(RuntimeError):
    """The teacher engine failed part way through a run (its process died, say): what was
    written before stays good, and the same run resumes after it."""


@dataclass
class TeacherOutput:
    """One sample's teacher output: full logits at the target positions, or engine top-k; attention rows."""

    logits: torch.Tensor | None  # float32 [P, V] at the sample's target positions
    topk: TopKTargets | None  # when the engine returns top-k itself
    attention: dict[int, torch.Tensor] | None  # layer -> float32 [P, T] head-averaged rows


class TeacherBackend(Protocol):
    """A teacher engine (hf or vLLM): same numpy/torch outputs whichever runs."""

    name: str

    def describe(self) -> dict:
        """Backend, mode, dtype, device and library versions: the manifest's `engines` entry
        (provenance only: not part of the config hash, so a resume may run other versions)."""
        ...

    def forward(self, batch: list[Tokenized]) -> Iterator[TeacherOutput]:
        """Teacher outputs for each sample of the batch, in order."""
        ...

    def close(self) -> None: ...


PROJECTION_ROWS = 512  # target rows per output-projection matmul, gathered across a batch's samples


def project_in_blocks(
    rows: Sequence[torch.Tensor], weight: torch.Tensor, block: int = PROJECTION_ROWS
) -> Iterator[torch.Tensor]:
    """Per sample hidden rows float32 [P_i, D] -> its logits float32 [P_i, V] = rows @ weight.T, in order.

    Consecutive samples share one matmul of up to `block` rows (a longer sample gets one of its
    own): a matmul per sample reads the whole [V, D] weight for ~100 rows (bench/bench_projection.py
    times both). Each sample's logits are a row slice of its block's, which it may
    overwrite; a block holds at most max(block, P_i) rows of [V] float32.
    """
    i = 0
    while i < len(rows):
        j, n = i + 1, len(rows[i])
        while j < len(rows) and n + len(rows[j]) <= block:
            n += len(rows[j])
            j += 1
        h = rows[i] if j == i + 1 else torch.cat(list(rows[i:j]))  # float32 [n, D]
        logits = h @ weight.T  # float32 [n, V]
        yield from logits.split([len(r) for r in rows[i:j]])  # float32 [P_i, V] each, contiguous
        i = j


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None
