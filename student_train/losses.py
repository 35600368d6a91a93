"""Distillation losses against cached sparse teacher targets.

Every loss is a pure function of student tensors and cached teacher arrays that
returns a float32 scalar: the mean over unmasked target positions, and 0 (still
attached to the graph, so ``backward()`` works) when every position is masked.
Inputs of any float dtype are upcast to float32 before any exp/log.

Notation: P target positions, V vocab, k top-k, m sampled ids per position
(padded), T keys (tokens), D hidden size.
``mask bool [P]`` is True where a position counts.

Top-k and attention targets are compared as distributions over k+1 outcomes:
the k cached ids and one "tail" bucket holding everything else. The student is
coarsened exactly (its tail is the log-sum-exp over the complement, never
``log(1 - sum)``), so each value is a true KL between two (k+1)-outcome
distributions: exact at k = V, and a lower bound on the dense KL otherwise
(data-processing inequality, at temperature 1). A temperature tempers both
coarsened distributions alike (``topk_kl``).

Cache ids may repeat only on padding entries whose teacher logprob is -inf;
such entries carry no teacher mass and contribute nothing.
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
ROUNDING_TAIL = math.log(1e-3)  # attention_kl: a smaller tail beside a student rest of exactly 0 is rounding

RowsFn = Callable[..., Tensor]  # (logits [c, V], *per-row args) -> per-row loss float32 [c]


# ---------------------------------------------------------------- helpers


def _check_mask(mask: Tensor, positions: int) -> None:
    """A mask must be bool [P]: a [P, 1] one broadcast against [P] rows silently, counting each P times."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (positions,):
        got = f"{mask.dtype} {list(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a bool tensor [P] = [{positions}], got {got}")


def _check_shapes(**inputs: tuple[Tensor, str]) -> None:
    """Each input as ``name=(tensor, "P, k")``: flattened positions, of its documented dims, one size
    per letter across the inputs. A batched [B, P, ...] tensor was taken apart wrongly, or failed
    deep in torch (a broadcast or an index error) that named none of them."""
    sizes: dict[str, int] = {}
    for name, (t, dims) in inputs.items():
        if not isinstance(t, Tensor):  # a CachedSample's numpy array: torch.from_numpy(...) first
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        letters = dims.split(", ")
        if t.dim() != len(letters) or any(sizes.get(d, n) != n for d, n in zip(letters, t.shape, strict=True)):
            known = "".join(f", {d} = {n}" for d, n in sizes.items())
            raise ValueError(f"{name} must be [{dims}] (positions flattened{known}), got shape {list(t.shape)}")
        sizes.update(zip(letters, t.shape, strict=True))


def _topk_inputs(ids: Tensor, logprobs: Tensor, tail: Tensor) -> dict[str, tuple[Tensor, str]]:
    return {"topk_ids": (ids, "P, k"), "topk_logprobs": (logprobs, "P, k"), "tail_logprob": (tail, "P")}


def _sampled_inputs(ids: Tensor, weights: Tensor) -> dict[str, tuple[Tensor, str]]:
    return {"ids": (ids, "P, m"), "weights": (weights, "P, m")}


def _masked_mean(per_pos: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``per_pos float32 [P]`` where ``mask bool [P]``; 0 with grad if none count."""
    if mask is None:
        mask = torch.ones_like(per_pos, dtype=torch.bool)
    _check_mask(mask, per_pos.shape[0])
    total = torch.where(mask, per_pos, 0.0).sum()  # where, not *, so masked inf/NaN rows drop out
    return total / mask.sum().clamp_min(1)


def _log_normalize(logits: Tensor) -> Tensor:
    """log_softmax over the last dim that keeps an all -inf row at -inf (zero mass) instead of NaN."""
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # [P, 1]
    lse = torch.where(lse == -math.inf, 0.0, lse)
    return logits - lse


def _bucket_kl(t_logp: Tensor, s_logp: Tensor) -> Tensor:
    """KL(t || s) per row for log-probs ``[P, O]`` over O outcomes -> float32 [P].

    Outcomes with teacher log-prob -inf contribute exactly 0 (0 log 0 = 0) and pass
    no gradient, even where the student log-prob is -inf too.
    """
    has_mass = t_logp != -math.inf  # [P, O]; a NaN teacher value counts (the loss is NaN), never dropped
    t_safe = torch.where(has_mass, t_logp, 0.0)
    s_safe = torch.where(has_mass, s_logp, 0.0)
    return torch.where(has_mass, t_safe.exp() * (t_safe - s_safe), 0.0).sum(-1)


def _log_mass_outside(z: Tensor, ids: Tensor) -> Tensor:
    """log sum_{j not in ids} exp(z_j) for ``z float32 [P, V]``, ``ids int64 [P, k]`` -> [P].

    Sums the complement directly, so it stays accurate when ids hold nearly all
    the mass (where log(1 - sum p_ids) cancels catastrophically). An empty or
    all -inf complement gives -inf with a finite (zero) gradient.
    """
    outside = z.scatter(-1, ids, -math.inf)  # [P, V]
    empty = outside.amax(-1, keepdim=True) == -math.inf  # [P, 1]
    lse = torch.logsumexp(torch.where(empty, 0.0, outside), dim=-1)  # [P]
    return torch.where(empty.squeeze(-1), -math.inf, lse)


# Where the student puts more than this log-mass on the cached ids, log(1 - sum) cancels
# (float32), and the tail is summed over the complement instead.
_NEAR_ONE = -0.01


def _repeats(ids: Tensor) -> Tensor:
    """bool [P, k]: True on each later copy of an id already in its row (``ids int64 [P, k]``)."""
    sorted_ids, order = ids.sort(dim=-1)  # [P, k]
    return torch.zeros_like(ids, dtype=torch.bool).scatter(-1, order[:, 1:], sorted_ids[:, 1:] == sorted_ids[:, :-1])


def _student_tail(z: Tensor, lse: Tensor, s_top: Tensor, ids: Tensor) -> Tensor:
    """log of the student's mass outside ``ids`` per row -> [P]; ``z [P, V]``, ``lse [P]``, ``s_top [P, k]``
    with a repeated id's later copies at -inf (``_repeats``), so each id's mass counts once.

    log1mexp of the kept mass costs O(k) per row; only rows where that cancels (kept mass
    above 1 - 1%) pay for the exact O(V) complement sum. Relative error <= ~1e-3 either way.
    """
    kept = torch.logsumexp(s_top, dim=-1)  # [P] log mass on the distinct ids
    near_one = kept > _NEAR_ONE  # [P]
    x = torch.where(near_one, -1.0, kept)  # keep the cheap branch's gradient finite on rows it does not serve
    tail = torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))  # log1mexp, [P]
    rows = near_one.nonzero().squeeze(-1)  # [r]
    if rows.numel():
        exact = _log_mass_outside(z[rows], ids[rows]) - lse[rows]  # [r]
        tail = tail.index_put((rows,), exact)
    return tail


def _tempered(logits: Tensor, temperature: float) -> Tensor:
    """float32 logits / temperature; at temperature 1 no division (a [P, V] pass forward and back)."""
    z = logits.float()
    return z if temperature == 1.0 else z / temperature


def _check_temperature(temperature: float) -> None:
    if not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")


# ------------------------------------------------------- per-row losses


def _topk_kl_rows(
    logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, tail_logprob: Tensor, temperature: float
) -> Tensor:
    """temperature^2 * KL over k+1 outcomes per row -> float32 [P]; see ``topk_kl``."""
    z = logits.float()  # float32 [P, V]
    lse = torch.logsumexp(z, dim=-1)  # [P]
    # padding repeats of an id (teacher mass -inf) hold no student mass either: each id counts once
    s_top = (z.gather(-1, topk_ids) - lse[:, None]).masked_fill(_repeats(topk_ids), -math.inf)  # [P, k]
    s_tail = _student_tail(z, lse, s_top, topk_ids)  # [P]
    s_logp = torch.cat([s_top, s_tail[:, None]], dim=-1)  # [P, k+1], temperature 1
    t_raw = torch.cat([topk_logprobs.float(), tail_logprob.float()[:, None]], dim=-1)  # [P, k+1], temperature 1
    t_logp = _log_normalize(t_raw / temperature)  # [P, k+1]; quantised values sum to 1 only within the codec's bound
    if temperature != 1.0:  # the student's coarsened distribution tempered as the teacher's
        s_logp = _log_normalize(s_logp / temperature)
    return temperature**2 * _bucket_kl(t_logp, s_logp)


def _sampled_rows(logits: Tensor, ids: Tensor, weights: Tensor, temperature: float) -> Tensor:
    """temperature^2 * sum_i w_i * -log softmax(logits / temperature)[ids_i] per row -> float32 [P]."""
    z = _tempered(logits, temperature)  # float32 [P, V]
    s_logp = z.gather(-1, ids) - torch.logsumexp(z, dim=-1, keepdim=True)  # [P, m]
    w = weights.float()  # [P, m]
    return temperature**2 * torch.where(w != 0, -w * s_logp, 0.0).sum(-1)


def _check_labels(labels: Tensor, keep: Tensor, vocab: int, ignore_index: int) -> None:
    """Refuse a kept label outside the vocabulary: a -1 meant as "ignore" (with another
    ignore_index) was read as token 0, silently (F.cross_entropy raises). One host sync."""
    bad = keep & ((labels < 0) | (labels >= vocab))  # [P]
    if bool(bad.any()):
        raise ValueError(
            f"{int(bad.sum())} labels outside [0, {vocab}) (the first: {int(labels[bad][0])}); mark positions "
            f"to skip with ignore_index={ignore_index} or mask"
        )


def _ce_rows(logits: Tensor, labels: Tensor) -> Tensor:
    """-log softmax(logits)[label] per row -> float32 [P]; ignored labels read id 0."""
    z = logits.float()  # [P, V]
    safe = labels.clamp_min(0)[:, None]  # [P, 1]
    return torch.logsumexp(z, dim=-1) - z.gather(-1, safe).squeeze(-1)


def _attention_kl_rows(student_rows: Tensor, key_ids: Tensor, key_logprobs: Tensor, tail_logprob: Tensor) -> Tensor:
    """KL over k keys + rest per row -> float32 [P]; see ``attention_kl``."""
    q = student_rows.float()  # [P, T]
    total = q.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)  # [P, 1]
    q_keys = q.gather(-1, key_ids)  # [P, k]
    q_rest = q.scatter(-1, key_ids, 0.0).sum(-1, keepdim=True)  # [P, 1], summed directly: no 1 - sum
    q_mass = torch.cat([q_keys, q_rest], dim=-1) / total  # [P, k+1]
    tail = tail_logprob.float()  # [P]
    # a tiny teacher tail where the student's rest is exactly 0 (every key the query sees is kept)
    # is rounding, which caches written before the tail was summed directly hold: dropped
    tail = torch.where((q_rest[:, 0] == 0) & (tail < ROUNDING_TAIL), -math.inf, tail)
    t_raw = torch.cat([key_logprobs.float(), tail[:, None]], dim=-1)  # [P, k+1]
    t_logp = _log_normalize(t_raw)  # [P, k+1]
    # log only where the teacher has mass and the student is nonzero, so that no
    # 0/0 reaches the gradient; teacher mass on a student zero is a true +inf
    use = (t_logp > -math.inf) & (q_mass > 0)
    s_logp = torch.where(use, torch.log(torch.where(use, q_mass, 1.0)), -math.inf)
    return _bucket_kl(t_logp, s_logp)


# ----------------------------------------------------------- public losses


def topk_kl(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logprob: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Forward KL(teacher || student) over the k cached ids plus one tail bucket.

    Args:
        student_logits: float [P, V], any float dtype (upcast to float32).
        topk_ids: int64 [P, k] teacher top-k ids.
        topk_logprobs: float32 [P, k] teacher log-probs at temperature 1; may hold -inf.
        tail_logprob: float32 [P] log of teacher mass outside topk_ids; may be -inf.
        temperature: teacher and student are both coarsened to the k+1 outcomes
            at temperature 1, then tempered alike as (k+1)-outcome categoricals
            (each outcome's log-mass / temperature, renormalised), so the loss is 0
            when the student equals the teacher. The cache holds one number for the
            tail, so it is tempered as one bucket: within the k ids the ratios are
            those of the dense tempered softmax, but the tail's share is not (for
            temperature > 1 it gets less than sum p^(1/t), for < 1 more); at k = V
            (tail -inf) this is the dense tempered KL. The result is multiplied by
            temperature^2 (Hinton) so gradients keep their scale.
        mask: bool [P], True where a position counts.

    Returns:
        float32 scalar, mean over unmasked positions (0 with grad if none).
    """
    per_pos = topk_kl_rows(student_logits, topk_ids, topk_logprobs, tail_logprob, temperature=temperature)  # [P]
    return _masked_mean(per_pos, mask)


def topk_kl_rows(
    student_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, tail_logprob: Tensor, *, temperature: float = 1.0
) -> Tensor:
    """``topk_kl`` per position, not averaged: float32 [P] (evaluation sums it by group)."""
    _check_temperature(temperature)
    _check_shapes(student_logits=(student_logits, "P, V"), **_topk_inputs(topk_ids, topk_logprobs, tail_logprob))
    return _topk_kl_rows(student_logits, topk_ids, topk_logprobs, tail_logprob, temperature)


def sampled_kl_rows(student_logits: Tensor, ids: Tensor, weights: Tensor, *, temperature: float = 1.0) -> Tensor:
    """``sampled_kl`` per position, not averaged: float32 [P]."""
    _check_temperature(temperature)
    _check_shapes(student_logits=(student_logits, "P, V"), **_sampled_inputs(ids, weights))
    return _sampled_rows(student_logits, ids, weights, temperature)


def sampled_kl(
    student_logits: Tensor,
    ids: Tensor,
    weights: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Sparse Logit Sampling loss: ``sum_i w_i * -log_softmax(student / temperature)[ids_i]``.

    If ``E[w]`` over the draws is the teacher distribution p (weights from
    ``student_train.data.sampled_to_padded``: counts / num_draws for draws from p,
    times p/q for draws from a proposal q), this is an unbiased estimate of the
    cross-entropy H(p, q_student) = KL(p || q_student) + H(p). H(p) does not depend
    on the student, so its gradient is an unbiased estimate of the KL gradient, but
    its value is not a KL (not 0 at the optimum). With exact teacher probabilities
    over all ids as weights it equals the cross-entropy exactly.

    Args:
        student_logits: float [P, V], any float dtype (upcast to float32).
        ids: int64 [P, m] sampled ids, padding anywhere (any valid id).
        weights: float32 [P, m], 0 on padding.
        temperature: tempers the student only (``logits / temperature``), times
            temperature^2; the target is whatever the weights estimate, so pass
            weights for the tempered teacher when tempering (e.g.
            ``sampled_to_padded(..., teacher_logprobs=lp / t, proposal_logprobs=lp,
            self_normalize=True)`` re-tempers draws made from the teacher).
        mask: bool [P], True where a position counts.

    Returns:
        float32 scalar, mean over unmasked positions (0 with grad if none).
    """
    per_pos = sampled_kl_rows(student_logits, ids, weights, temperature=temperature)  # [P]
    return _masked_mean(per_pos, mask)


def attention_kl(
    student_rows: Tensor,
    key_ids: Tensor,
    key_logprobs: Tensor,
    tail_logprob: Tensor,
    *,
    mask: Tensor | None = None,
) -> Tensor:
    """KL(teacher || student) between attention rows over k cached keys plus the rest.

    For one layer: the teacher summary is the head-averaged attention row of
    each target query, kept as its top-k keys and the log of the remaining mass.

    Args:
        student_rows: float [P, T] head-averaged student attention probabilities
            (not logits), 0 on non-causal keys; each row is renormalised by its
            sum. A key where the teacher has mass and the student has exactly 0
            gives +inf, the true KL (compute student attention in float32 if
            low-precision underflow is a concern).
        key_ids: int64 [P, k] key positions (< T). Padding (fewer than k causal
            keys) must carry logprob -inf and either repeat a key already in the
            row or point at a key where the student row is 0.
        key_logprobs: float32 [P, k] teacher log weights; may hold -inf.
        tail_logprob: float32 [P] log of the teacher mass on all other keys; may be -inf.
            Below ROUNDING_TAIL (mass 1e-3) it is ignored on rows where the student's rest is
            exactly 0: every key the query can see is kept, so it is float rounding.
        mask: bool [P], True where a position counts.

    Returns:
        float32 scalar, mean over unmasked positions (0 with grad if none).
    """
    _check_shapes(
        student_rows=(student_rows, "P, T"),
        key_ids=(key_ids, "P, k"),
        key_logprobs=(key_logprobs, "P, k"),
        tail_logprob=(tail_logprob, "P"),
    )
    per_pos = _attention_kl_rows(student_rows, key_ids, key_logprobs, tail_logprob)  # [P]
    return _masked_mean(per_pos, mask)


def cross_entropy(
    student_logits: Tensor, labels: Tensor, *, mask: Tensor | None = None, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Next-token cross-entropy on ``labels int64 [P]`` for ``student_logits float [P, V]``.

    Positions with ``labels == ignore_index`` or ``mask`` False are skipped; unlike
    ``F.cross_entropy`` this returns 0 (not NaN) when every position is skipped.
    """
    _check_shapes(student_logits=(student_logits, "P, V"), labels=(labels, "P"))
    if mask is not None:
        _check_mask(mask, labels.shape[0])
    keep = labels != ignore_index if mask is None else mask & (labels != ignore_index)  # [P]
    _check_labels(labels, keep, student_logits.shape[-1], ignore_index)
    return _masked_mean(_ce_rows(student_logits, labels), keep)


def total_loss(ce: Tensor, kd: Tensor, attn: Tensor | None, *, lam: float, attn_weight: float) -> Tensor:
    """``(1 - lam) * ce + lam * (kd + attn_weight * attn)``; ``attn=None`` counts as 0."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    if not 0.0 <= attn_weight < math.inf:
        raise ValueError(f"attn_weight must be finite and >= 0, got {attn_weight}")
    distill = kd if attn is None else kd + attn_weight * attn
    return (1.0 - lam) * ce + lam * distill


# ------------------------------------------------------------- chunked


def _chunked_mean(
    rows_fn: RowsFn,
    hidden: Tensor,
    lm_head_weight: Tensor,
    row_args: tuple[Tensor, ...],
    mask: Tensor,
    chunk_size: int,
) -> Tensor:
    """Masked mean of ``rows_fn(hidden @ lm_head_weight.T, *row_args)`` one chunk of rows at a time.

    Each chunk runs under non-reentrant activation checkpointing: the forward
    keeps no [chunk, V] tensor, and backward recomputes one chunk's logits at a
    time, so peak memory is a few chunk_size x V float32 buffers (not P x V).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    def chunk_sum(h: Tensor, w: Tensor, keep: Tensor, *args: Tensor) -> Tensor:
        logits = h @ w.T  # [c, V] in the model dtype; rows_fn upcasts
        return torch.where(keep, rows_fn(logits, *args), 0.0).sum()

    num_rows = hidden.shape[0]
    sums = [
        checkpoint(
            chunk_sum,
            hidden[s : s + chunk_size],  # [c, D]
            lm_head_weight,  # [V, D]
            mask[s : s + chunk_size],  # [c]
            *(a[s : s + chunk_size] for a in row_args),
            use_reentrant=False,
            preserve_rng_state=False,  # nothing random inside
        )
        for s in range(0, num_rows, chunk_size)
    ]
    total = torch.stack(sums).sum() if sums else hidden.float().sum() * 0.0
    return total / mask.sum().clamp_min(1)


def _full_mask(mask: Tensor | None, hidden: Tensor) -> Tensor:
    if mask is None:
        return torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    _check_mask(mask, hidden.shape[0])
    return mask


def chunked_topk_kl(
    hidden: Tensor,
    lm_head_weight: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logprob: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """``topk_kl(hidden @ lm_head_weight.T, ...)`` without materialising [P, V] logits.

    ``hidden [P, D]`` are the final (normed) hidden states at the target
    positions and ``lm_head_weight [V, D]`` the output projection; other
    arguments as in ``topk_kl``. Same value and gradients, peak memory
    O(chunk_size x V).
    """
    _check_temperature(temperature)
    head = {"hidden": (hidden, "P, D"), "lm_head_weight": (lm_head_weight, "V, D")}
    _check_shapes(**head, **_topk_inputs(topk_ids, topk_logprobs, tail_logprob))

    def rows_fn(logits: Tensor, ids: Tensor, logprobs: Tensor, tail: Tensor) -> Tensor:
        return _topk_kl_rows(logits, ids, logprobs, tail, temperature)

    args = (topk_ids, topk_logprobs, tail_logprob)
    return _chunked_mean(rows_fn, hidden, lm_head_weight, args, _full_mask(mask, hidden), chunk_size)


def chunked_sampled_kl(
    hidden: Tensor,
    lm_head_weight: Tensor,
    ids: Tensor,
    weights: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """``sampled_kl(hidden @ lm_head_weight.T, ...)`` chunk by chunk; see ``chunked_topk_kl``."""
    _check_temperature(temperature)
    _check_shapes(hidden=(hidden, "P, D"), lm_head_weight=(lm_head_weight, "V, D"), **_sampled_inputs(ids, weights))

    def rows_fn(logits: Tensor, ids_c: Tensor, weights_c: Tensor) -> Tensor:
        return _sampled_rows(logits, ids_c, weights_c, temperature)

    return _chunked_mean(rows_fn, hidden, lm_head_weight, (ids, weights), _full_mask(mask, hidden), chunk_size)


def chunked_ce(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    chunk_size: int = 1024,
    *,
    mask: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """``cross_entropy(hidden @ lm_head_weight.T, labels)`` chunk by chunk; see ``chunked_topk_kl``."""
    _check_shapes(labels=(labels, "P"), hidden=(hidden, "P, D"), lm_head_weight=(lm_head_weight, "V, D"))
    keep = _full_mask(mask, hidden) & (labels != ignore_index)  # [P]
    _check_labels(labels, keep, lm_head_weight.shape[0], ignore_index)
    return _chunked_mean(_ce_rows, hidden, lm_head_weight, (labels,), keep, chunk_size)
