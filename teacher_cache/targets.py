"""Teacher logits at target positions -> what the cache keeps (pure torch math).

Top-k: the k most likely ids with their log-probs at temperature 1, plus the log of
the mass outside them (the tail). Sampled (Anshumann et al., 2025): num_draws draws
with replacement from the teacher distribution, kept as distinct ids with counts.

Notation: P target positions, V vocab, k top-k, T keys (attention), n draws per
position (num_draws), N distinct sampled ids over all positions (ragged: each
position holds between 1 and min(n, V) of them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class TopKTargets:
    ids: np.ndarray  # int64 [P, k], by descending log-prob
    logprobs: np.ndarray  # float32 [P, k], natural log, temperature 1
    tail_logprob: np.ndarray  # float32 [P], log of the mass outside the top-k (-inf if none)


@dataclass
class SampledTargets:
    offsets: np.ndarray  # int64 [P + 1]; position p owns ids[offsets[p]:offsets[p + 1]]
    ids: np.ndarray  # int64 [N], ascending within a position
    counts: np.ndarray  # int32 [N], summing to num_draws at every position
    num_draws: int  # n, the same at every position


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate near both ends (Maechler 2012)."""
    x = x.clamp(max=0.0)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def tail_from_topk(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(exp(topk))) per row; topk_logprobs float32 [P, k] -> [P]."""
    return log1mexp(torch.logsumexp(topk_logprobs.double(), dim=-1)).float()  # summed in float64, float32 [P]


def topk_from_logits(logits: torch.Tensor, k: int, *, inplace: bool = False) -> TopKTargets:
    """logits float [P, V] -> top-k log-probs and the tail, in one exp pass over [P, V].

    Top-k is taken on the logits (log-softmax keeps the order). The mass outside the
    top-k is summed relative to the largest logit outside it, so that sum's largest term
    is exactly 1 and the tail stays exact however small it is; the normaliser combines
    it with the top-k in fp64. `inplace=True` reuses `logits` as scratch (no [P, V] copy).
    """
    z = logits.float()  # float32 [P, V]; a copy unless already float32
    if not inplace and z is logits:
        z = z.clone()
    P, V = z.shape
    k = min(k, V)
    top = torch.topk(z, min(k + 1, V), dim=-1, sorted=True)  # values float32, indices int64 [P, k(+1)]
    vals = top.values[:, :k].double()  # float64 [P, k]
    if k < V:
        m = top.values[:, k : k + 1]  # float32 [P, 1] largest logit outside the top-k
        shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # an all -inf complement has no mass
        rest = z.sub_(shift).exp_()  # float32 [P, V] scratch; top-k entries may overflow here ...
        rest.scatter_(-1, top.indices[:, :k], 0.0)  # ... and are zeroed: the complement only
        log_rest = shift[:, 0].double() + torch.log(rest.sum(-1).double())  # float64 [P]
    else:
        log_rest = torch.full((P,), -torch.inf, dtype=torch.float64, device=z.device)  # float64 [P], no mass
    lse = torch.logaddexp(torch.logsumexp(vals, dim=-1), log_rest)  # float64 [P] log partition function
    return TopKTargets(
        ids=top.indices[:, :k].to(torch.int64).cpu().numpy(),  # int64 [P, k]
        logprobs=(vals - lse[:, None]).float().cpu().numpy(),  # float32 [P, k]
        tail_logprob=(log_rest - lse).float().cpu().numpy(),  # float32 [P]
    )


SAMPLE_ROWS = 64  # positions drawn from at a time: their float64 probabilities, 64 MB at a 128k vocab


def sampled_from_logits(logits: torch.Tensor, num_draws: int, generator: torch.Generator) -> SampledTargets:
    """logits float [P, V] -> num_draws draws per position, as distinct ids with counts.

    Drawn from float64 probabilities: torch.multinomial sums a row's probabilities in its dtype,
    and a float32 running sum rounds off part of every small one added after a likely id (12 % of
    a 0.01 tail behind a 0.99 id on a 49k vocab; ~8 % of SmolLM2's mass below 1e-6). Rows go
    SAMPLE_ROWS at a time: the generator serves rows in order, so the draws are those of one call.
    """
    P = logits.shape[0]
    parts = [
        torch.multinomial(  # int64 [rows, n]
            torch.softmax(logits[i : i + SAMPLE_ROWS].double(), dim=-1).cpu(),  # float64 [rows, V]
            num_draws,
            replacement=True,
            generator=generator,
        )
        for i in range(0, P, SAMPLE_ROWS)
    ]
    draws = torch.cat(parts) if parts else torch.empty((0, num_draws), dtype=torch.int64)  # int64 [P, n]
    draws, _ = torch.sort(draws, dim=-1)  # int64 [P, n], ascending within a position
    new = torch.ones_like(draws, dtype=torch.bool)  # bool [P, n] first of a run of equal ids
    new[:, 1:] = draws[:, 1:] != draws[:, :-1]
    flat_new = new.reshape(-1)  # bool [P * n]
    ids = draws.reshape(-1)[flat_new]  # int64 [N] distinct per position, ascending
    starts = torch.nonzero(flat_new).squeeze(1)  # int64 [N] flat index of each run start
    ends = torch.cat([starts[1:], torch.tensor([P * num_draws])])  # int64 [N] flat index past each run
    counts = (ends - starts).to(torch.int32)  # int32 [N]
    per_pos = new.sum(dim=-1)  # int64 [P] distinct ids per position
    offsets = torch.zeros(P + 1, dtype=torch.int64)  # int64 [P + 1]
    offsets[1:] = torch.cumsum(per_pos, 0)
    return SampledTargets(offsets.numpy(), ids.numpy(), counts.numpy(), num_draws)


def attention_summary(rows: torch.Tensor, k: int) -> TopKTargets:
    """Head-averaged attention rows float [P, T] (sum 1 over keys) -> top-k keys + tail mass."""
    k = min(k, rows.shape[-1])
    top = torch.topk(rows.float(), k, dim=-1, sorted=True)  # values float32, indices int64 [P, k]
    # the keys not kept, summed directly (not 1 - kept, whose rounding left a tail of ~1e-8 where
    # every key a query can see is kept, and the student's rest there is exactly 0: an infinite KL)
    rest = rows.double().scatter(-1, top.indices, 0.0).sum(-1)  # float64 [P]
    with torch.no_grad():
        tail = torch.where(rest > 0, torch.log(rest), torch.full_like(rest, -torch.inf)).float()  # float32 [P]
    return TopKTargets(
        ids=top.indices.to(torch.int64).cpu().numpy(),  # int64 [P, k] key positions
        logprobs=torch.log(top.values.float()).cpu().numpy(),  # float32 [P, k]
        tail_logprob=tail.cpu().numpy(),  # float32 [P]
    )
