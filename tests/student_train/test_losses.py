"""Losses against dense references computed in float64 from full teacher logits.

Notation as in student_train/losses.py: P positions, V vocab, k top-k, T keys.
"""

import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from student_train.data import sampled_to_padded
from student_train.losses import (
    attention_kl,
    chunked_ce,
    chunked_sampled_kl,
    chunked_topk_kl,
    cross_entropy,
    sampled_kl,
    sampled_kl_rows,
    topk_kl,
    topk_kl_rows,
    total_loss,
)

TEMPERATURES = [0.5, 1.0, 2.0]


# ------------------------------------------------------------ references


def logits(p: int, v: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    """Random float32 logits [p, v]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(p, v, generator=g) * scale


def cache_topk(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the cache stores: ids int64 [P, k], logprobs float32 [P, k], tail float32 [P]."""
    lp = torch.log_softmax(teacher_logits.double(), -1)  # [P, V]
    top_lp, ids = lp.topk(k, dim=-1)  # [P, k]
    outside = torch.ones_like(lp, dtype=torch.bool).scatter(-1, ids, False)  # [P, V]
    tail = torch.logsumexp(lp.masked_fill(~outside, -math.inf), -1)  # [P], -inf when k = V
    return ids, top_lp.float(), tail.float()


def kl_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sum p log(p / q) per row with 0 log 0 = 0, float64 probabilities [P, O] -> [P]."""
    p, q = p.double(), q.double()
    return torch.where(p > 0, p * (p.log() - q.log()), torch.zeros_like(p)).sum(-1)


def dense_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, t: float) -> torch.Tensor:
    """t^2 * KL(softmax(teacher / t) || softmax(student / t)) per row, float64 [P]."""
    p = torch.softmax(teacher_logits.double() / t, -1)
    q = torch.softmax(student_logits.double() / t, -1)
    return t**2 * kl_rows(p, q)


def coarse(probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[P, V] probabilities -> [P, k+1]: mass on each id, then the summed rest."""
    rest = probs.scatter(-1, ids, 0.0).sum(-1, keepdim=True)
    return torch.cat([probs.gather(-1, ids), rest], -1)


def coarse_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, ids: torch.Tensor, t: float) -> torch.Tensor:
    """Reference for topk_kl at temperature t, per row float64 [P].

    Teacher and student alike: coarsened to k+1 outcomes at temperature 1, then
    tempered as a (k+1)-outcome categorical (each bucket's mass to the power 1/t,
    renormalised). Times t^2.
    """

    def tempered(x: torch.Tensor) -> torch.Tensor:
        c = coarse(torch.softmax(x.double(), -1), ids) ** (1.0 / t)
        return c / c.sum(-1, keepdim=True)

    return t**2 * kl_rows(tempered(teacher_logits), tempered(student_logits))


def causal_attention(t: int, h: int, seed: int) -> torch.Tensor:
    """Head-averaged causal attention probabilities [T, T] from random scores [H, T, T]."""
    scores = logits(h * t, t, seed).view(h, t, t)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~causal, -math.inf), -1).mean(0)


def per_position(loss_fn, p: int) -> torch.Tensor:
    """Per-position values of a masked-mean loss, read one position at a time via the mask."""
    return torch.stack([loss_fn(F.one_hot(torch.tensor(i), p).bool()) for i in range(p)])


def all_finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(x).all()) for x in tensors)


# ----------------------------------------------------------------- top-k


@pytest.mark.parametrize("t", TEMPERATURES)
def test_topk_kl_equals_dense_kl_when_k_is_v(t: float) -> None:
    teacher, student = logits(16, 50, 0), logits(16, 50, 1).requires_grad_()
    ids, lp, tail = cache_topk(teacher, 50)
    assert torch.isinf(tail).all()
    got = topk_kl(student, ids, lp, tail, temperature=t)
    want = dense_kl(teacher, student.detach(), t).mean()
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    # gradient of the dense KL: t * (softmax(student / t) - softmax(teacher / t)) / P
    got.backward()
    want_grad = t * (torch.softmax(student.detach() / t, -1) - torch.softmax(teacher / t, -1)) / 16
    torch.testing.assert_close(student.grad, want_grad, atol=1e-6, rtol=1e-5)


def test_topk_kl_equals_dense_kl_large_vocab() -> None:
    teacher, student = logits(4, 32000, 2), logits(4, 32000, 3)
    got = topk_kl(student, *cache_topk(teacher, 32000))
    torch.testing.assert_close(got.double(), dense_kl(teacher, student, 1.0).mean(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("t", TEMPERATURES)
@pytest.mark.parametrize("k", [1, 5, 20])
def test_topk_kl_equals_coarsened_kl(k: int, t: float) -> None:
    teacher, student = logits(16, 50, 4), logits(16, 50, 5)
    ids, lp, tail = cache_topk(teacher, k)
    got = per_position(lambda m: topk_kl(student, ids, lp, tail, temperature=t, mask=m), 16)
    want = coarse_kl(teacher, student, ids, t)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert (got >= 0).all()
    if t == 1.0:  # data-processing inequality: coarsening cannot increase the KL
        assert (got.double() <= dense_kl(teacher, student, 1.0) + 1e-6).all()
        assert (got.double() < dense_kl(teacher, student, 1.0) - 1e-3).any()  # and is lossy here


@pytest.mark.parametrize("t", TEMPERATURES)
def test_topk_kl_is_zero_for_a_student_equal_to_the_teacher(t: float) -> None:
    """At any temperature the target is the teacher: a student with the teacher's logits has
    loss 0, with a tail outside the top-k (it was ~0.3 nats at
    t = 2 when only the teacher's buckets were tempered and the student's whole softmax)."""
    teacher = logits(16, 50, 12)
    got = topk_kl(teacher.clone(), *cache_topk(teacher, 5), temperature=t)
    assert abs(float(got)) < 1e-5


def test_topk_kl_coarsened_large_vocab() -> None:
    teacher, student = logits(4, 32000, 6), logits(4, 32000, 7)
    ids, lp, tail = cache_topk(teacher, 20)
    got = topk_kl(student, ids, lp, tail)
    want = coarse_kl(teacher, student, ids, 1.0).mean()
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert got <= dense_kl(teacher, student, 1.0).mean()


@settings(max_examples=30, deadline=None, database=None)
@given(
    p=st.integers(1, 6),
    v=st.integers(2, 40),
    k_frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    scale=st.floats(0.1, 8.0),
)
@example(p=6, v=33, k_frac=0.5, seed=1, scale=8.0)  # a 19-nat KL: float32 is 1.2e-5 above the float64 dense one
def test_topk_kl_between_zero_and_dense(p: int, v: int, k_frac: float, seed: int, scale: float) -> None:
    k = max(1, round(k_frac * v))
    teacher, student = logits(p, v, seed, scale), logits(p, v, seed + 1, scale)
    got = per_position(lambda m: topk_kl(student, *cache_topk(teacher, k), mask=m), p).double()
    dense = dense_kl(teacher, student, 1.0)
    assert (got >= -1e-6).all()
    assert (got <= dense + 1e-5 + 1e-6 * dense).all()  # float32 rounding grows with the KL: relative too


def test_topk_kl_student_tail_without_cancellation() -> None:
    # the student puts all but ~1e-16 of its mass on the top-k; 1 - sum(p_topk) is 0 in float32
    v, k = 50, 5
    ids = torch.arange(k).expand(3, k)
    student = torch.full((3, v), -40.0)
    student[:, :k] = 0.0
    lp = torch.log(torch.full((3, k), 0.8 / k))
    tail = torch.full((3,), math.log(0.2))
    got = topk_kl(student, ids, lp, tail)
    q_tail = (v - k) * math.exp(-40.0) / (k + (v - k) * math.exp(-40.0))
    q_top = (1 - q_tail) / k
    want = 0.8 * math.log((0.8 / k) / q_top) + 0.2 * math.log(0.2 / q_tail)
    assert math.isfinite(got.item())
    assert got.item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("t", TEMPERATURES)
def test_topk_kl_neg_inf_teacher_entries(t: float) -> None:
    # teacher has zero probability on 40 of 50 ids: with k = 20 the cache holds -inf logprobs and a -inf tail
    teacher = logits(8, 50, 8)
    teacher[:, 10:] = -math.inf
    student = logits(8, 50, 9).requires_grad_()
    for k in (5, 20, 50):
        ids, lp, tail = cache_topk(teacher, k)
        assert torch.isinf(lp).any() or k == 5
        got = topk_kl(student, ids, lp, tail, temperature=t)
        (grad,) = torch.autograd.grad(got, student)
        assert all_finite(got, grad)
        want = coarse_kl(teacher, student.detach(), ids, t).mean()
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("t", TEMPERATURES)
def test_topk_kl_padding_entries_change_nothing(t: float) -> None:
    # a row padded past its real entries: repeated ids with -inf logprob (at t != 1 the student's
    # buckets are renormalised, where a repeat must not count its id's mass twice)
    teacher, student = logits(6, 50, 10), logits(6, 50, 11)
    ids, lp, tail = cache_topk(teacher, 4)
    pad_ids = torch.cat([ids, ids[:, :1].expand(6, 3)], -1)  # [P, 7]
    pad_lp = torch.cat([lp, torch.full((6, 3), -math.inf)], -1)
    got = topk_kl(student, pad_ids, pad_lp, tail, temperature=t)
    torch.testing.assert_close(got, topk_kl(student, ids, lp, tail, temperature=t))


def test_topk_kl_mask() -> None:
    teacher, student = logits(10, 50, 12), logits(10, 50, 13).requires_grad_()
    ids, lp, tail = cache_topk(teacher, 8)
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 1], dtype=torch.bool)
    # masked rows hold garbage that would change the value if read
    lp_garbage = torch.where(mask[:, None], lp, 50.0)
    got = topk_kl(student, ids, lp_garbage, tail, mask=mask, temperature=2.0)
    want = topk_kl(student[mask], ids[mask], lp[mask], tail[mask], temperature=2.0)
    torch.testing.assert_close(got, want)
    (grad,) = torch.autograd.grad(got, student)
    assert (grad[~mask] == 0).all() and (grad[mask] != 0).any()


def test_all_masked_is_zero_with_grad() -> None:
    teacher, student = logits(4, 50, 14), logits(4, 50, 15).requires_grad_()
    none = torch.zeros(4, dtype=torch.bool)
    ids, lp, tail = cache_topk(teacher, 5)
    rows = torch.softmax(student, -1)
    losses = [
        topk_kl(student, ids, lp, tail, mask=none),
        sampled_kl(student, ids, lp.exp(), mask=none),
        attention_kl(rows, ids, lp, tail, mask=none),
        cross_entropy(student, ids[:, 0], mask=none),
        cross_entropy(student, torch.full((4,), -100)),
    ]
    for loss in losses:
        assert loss.item() == 0.0 and loss.requires_grad
        (grad,) = torch.autograd.grad(loss, student)
        assert (grad == 0).all()


def test_bad_temperature_rejected() -> None:
    teacher, student = logits(2, 10, 16), logits(2, 10, 17)
    with pytest.raises(ValueError):
        topk_kl(student, *cache_topk(teacher, 3), temperature=0.0)


# --------------------------------------------------------------- sampled


def ragged_draws(probs: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw n ids per row from probs [P, V] with replacement; return offsets [P+1], ids [N], counts int32 [N]."""
    g = torch.Generator().manual_seed(seed)
    draws = torch.multinomial(probs.float(), n, replacement=True, generator=g)  # [P, n]
    counts = torch.zeros(probs.shape, dtype=torch.int64).scatter_add_(-1, draws, torch.ones_like(draws))  # [P, V]
    rows, ids = counts.nonzero(as_tuple=True)  # row-major
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), (counts > 0).sum(-1).cumsum(0)])
    return offsets, ids, counts[rows, ids].int()


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_sampled_kl_exact_weights_is_cross_entropy(t: float) -> None:
    teacher, student = logits(8, 50, 20), logits(8, 50, 21).requires_grad_()
    p = torch.softmax(teacher, -1)  # [P, V]
    ids = torch.arange(50).expand(8, 50)
    got = sampled_kl(student, ids, p, temperature=t)
    log_q = torch.log_softmax(student.detach().double() / t, -1)
    want = t**2 * (p.double() * -log_q).sum(-1).mean()
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    # cross-entropy and KL differ by the teacher entropy: same gradient as the dense KL
    (grad,) = torch.autograd.grad(got, student)
    ref = student.detach().clone().requires_grad_()
    kl = t**2 * F.kl_div(torch.log_softmax(ref / t, -1), p, reduction="batchmean")
    (want_grad,) = torch.autograd.grad(kl, ref)
    torch.testing.assert_close(grad, want_grad, atol=1e-6, rtol=1e-5)


def test_sampled_kl_unbiased_for_cross_entropy() -> None:
    p_rows, v, n = 64, 50, 4000
    teacher, student = logits(p_rows, v, 22, 2.0), logits(p_rows, v, 23, 2.0)
    p = torch.softmax(teacher.double(), -1)
    nll = -torch.log_softmax(student.double(), -1)  # [P, V]
    ce = (p * nll).sum(-1)  # [P]
    # standard error of the mean over positions of n-draw averages
    sigma = math.sqrt(((p * nll**2).sum(-1) - ce**2).sum().item() / n) / p_rows

    ids, w = sampled_to_padded(*ragged_draws(p, n, 24), n)
    got = sampled_kl(student, ids, w).item()
    assert abs(got - ce.mean().item()) < 5 * sigma
    assert sigma < 0.01  # the check is tight enough to catch a wrong scale


def test_sampled_kl_importance_weights_unbiased() -> None:
    # draws from a uniform proposal, reweighted by p / q
    p_rows, v, n = 64, 50, 4000
    teacher, student = logits(p_rows, v, 25, 1.0), logits(p_rows, v, 26, 1.0)
    p = torch.softmax(teacher.double(), -1)
    nll = -torch.log_softmax(student.double(), -1)
    ce = (p * nll).sum(-1)
    ratio_nll = p * v * nll  # per-draw estimator under q = 1 / V
    sigma = math.sqrt(((ratio_nll**2).mean(-1) - ce**2).sum().item() / n) / p_rows

    offsets, ids, counts = ragged_draws(torch.full((p_rows, v), 1.0 / v), n, 27)
    rows = torch.repeat_interleave(torch.arange(p_rows), offsets.diff())
    teacher_lp = p.log()[rows, ids].float()
    proposal_lp = torch.full_like(teacher_lp, -math.log(v))
    pad_ids, w = sampled_to_padded(offsets, ids, counts, n, teacher_logprobs=teacher_lp, proposal_logprobs=proposal_lp)
    got = sampled_kl(student, pad_ids, w).item()
    assert abs(got - ce.mean().item()) < 5 * sigma

    _, w_norm = sampled_to_padded(
        offsets, ids, counts, n, teacher_logprobs=teacher_lp, proposal_logprobs=proposal_lp, self_normalize=True
    )
    torch.testing.assert_close(w_norm.sum(-1), torch.ones(p_rows))


def test_sampled_to_padded_round_trip() -> None:
    g = torch.Generator().manual_seed(28)
    lengths = torch.tensor([3, 0, 1, 5, 0, 2])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    n = int(lengths.sum())
    ids = torch.randint(0, 100, (n,), generator=g)
    counts = torch.randint(1, 4, (n,), generator=g, dtype=torch.int32)
    num_draws = 16
    pad_ids, w = sampled_to_padded(offsets, ids, counts, num_draws)

    assert pad_ids.shape == w.shape == (6, 5)
    assert pad_ids.dtype == torch.int64 and w.dtype == torch.float32
    # back to ragged: non-padding entries row-major, counts from weights
    keep = w > 0
    assert torch.equal(keep.sum(-1), lengths)
    assert torch.equal(pad_ids[keep], ids)
    assert torch.equal((w[keep] * num_draws).round().int(), counts)
    # against a per-row loop
    for r in range(6):
        a, b = int(offsets[r]), int(offsets[r + 1])
        assert torch.equal(pad_ids[r, : b - a], ids[a:b])
        assert (pad_ids[r, b - a :] == 0).all() and (w[r, b - a :] == 0).all()


def test_sampled_to_padded_rejects_bad_offsets() -> None:
    with pytest.raises(ValueError):
        sampled_to_padded(torch.tensor([0, 2]), torch.tensor([1, 2, 3]), torch.ones(3, dtype=torch.int32), 3)


def test_sampled_kl_padding_ignores_neg_inf_student() -> None:
    # padding id 0 where the student logit is -inf: weight 0 must not turn into 0 * inf = NaN
    student = logits(3, 10, 29)
    student[:, 0] = -math.inf
    student.requires_grad_()
    ids = torch.tensor([[1, 2, 0], [3, 0, 0], [4, 5, 6]])
    w = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    got = sampled_kl(student, ids, w)
    (grad,) = torch.autograd.grad(got, student)
    assert all_finite(got, grad[:, 1:]) and (grad[:, 0] == 0).all()
    logp = torch.log_softmax(student.detach(), -1)  # [3, 10], -inf at id 0
    expect = -(0.5 * (logp[0, 1] + logp[0, 2]) + logp[1, 3] + (0.2 * logp[2, 4] + 0.3 * logp[2, 5] + 0.5 * logp[2, 6]))
    assert float(got.detach()) == pytest.approx(float(expect) / 3, rel=1e-6)


# ------------------------------------------------------------- attention


def test_attention_kl_equals_dense_when_k_is_t() -> None:
    t = 12
    teacher_rows = causal_attention(t, 4, 30)  # [T, T]
    scores = logits(4 * t, t, 31).view(4, t, t).requires_grad_()
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    student_rows = torch.softmax(scores.masked_fill(~causal, -math.inf), -1).mean(0)  # [T, T]
    key_lp, key_ids = teacher_rows.log().topk(t, dim=-1)  # non-causal keys: -inf
    tail = torch.full((t,), -math.inf)

    got = attention_kl(student_rows, key_ids, key_lp, tail)
    want = kl_rows(teacher_rows, student_rows.detach()).mean()
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    (grad,) = torch.autograd.grad(got, scores)
    assert all_finite(grad) and (grad != 0).any()


@pytest.mark.parametrize("k", [1, 3, 6])
def test_attention_kl_equals_coarsened_kl(k: int) -> None:
    t = 12
    teacher_rows, student_rows = causal_attention(t, 4, 32), causal_attention(t, 4, 33).requires_grad_()
    key_lp, key_ids = teacher_rows.log().topk(k, dim=-1)  # early queries pad with -inf non-causal keys
    tail = teacher_rows.double().scatter(-1, key_ids, 0.0).sum(-1).log().float()  # -inf on query 0

    got = per_position(lambda m: attention_kl(student_rows, key_ids, key_lp, tail, mask=m), t)
    want = kl_rows(coarse(teacher_rows.double(), key_ids), coarse(student_rows.detach().double(), key_ids))
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert (got.double() <= kl_rows(teacher_rows, student_rows.detach()) + 1e-6).all()
    (grad,) = torch.autograd.grad(got.sum(), student_rows)
    assert all_finite(grad)


def test_attention_kl_mask_skips_empty_rows() -> None:
    # a batch-padding row: student all zeros, teacher all -inf; masked out, gradient stays finite
    t = 6
    student_rows = causal_attention(t, 2, 34)
    student_rows[-1] = 0.0
    student_rows.requires_grad_()
    key_lp, key_ids = causal_attention(t, 2, 35).log().topk(2, dim=-1)
    tail = student_rows.detach().scatter(-1, key_ids, 0.0).sum(-1).log()
    key_lp[-1], tail[-1] = -math.inf, 0.0  # garbage on the padding row
    mask = torch.ones(t, dtype=torch.bool)
    mask[-1] = False
    got = attention_kl(student_rows, key_ids, key_lp, tail, mask=mask)
    (grad,) = torch.autograd.grad(got, student_rows)
    assert all_finite(got, grad) and (grad[-1] == 0).all()


# --------------------------------------------------------------- chunked


def lm_head(p: int, v: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(p, d, generator=g), torch.randn(v, d, generator=g) / math.sqrt(d)


def grads_of(fn, hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(h, w)
    loss.backward()
    return loss.detach(), h.grad, w.grad


CHUNKS = [1, 5, 16, 37, 100]  # P = 37: 5 and 16 do not divide it


@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_chunked_topk_kl_matches_plain(chunk_size: int) -> None:
    hidden, weight = lm_head(37, 50, 16, 40)
    ids, lp, tail = cache_topk(logits(37, 50, 41), 7)
    mask = torch.rand(37, generator=torch.Generator().manual_seed(42)) > 0.3
    kw = {"temperature": 2.0, "mask": mask}
    plain = grads_of(lambda h, w: topk_kl(h @ w.T, ids, lp, tail, **kw), hidden, weight)
    chunk = grads_of(lambda h, w: chunked_topk_kl(h, w, ids, lp, tail, chunk_size=chunk_size, **kw), hidden, weight)
    for a, b in zip(chunk, plain, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert (plain[1][~mask] == 0).all() and (plain[1][mask] != 0).any()


@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_chunked_sampled_kl_matches_plain(chunk_size: int) -> None:
    hidden, weight = lm_head(37, 50, 16, 43)
    ids, w_target = sampled_to_padded(*ragged_draws(torch.softmax(logits(37, 50, 44), -1), 20, 45), 20)
    plain = grads_of(lambda h, w: sampled_kl(h @ w.T, ids, w_target, temperature=0.5), hidden, weight)
    chunk = grads_of(
        lambda h, w: chunked_sampled_kl(h, w, ids, w_target, temperature=0.5, chunk_size=chunk_size), hidden, weight
    )
    for a, b in zip(chunk, plain, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_chunked_ce_matches_torch(chunk_size: int) -> None:
    hidden, weight = lm_head(37, 50, 16, 46)
    labels = torch.randint(0, 50, (37,), generator=torch.Generator().manual_seed(47))
    labels[::4] = -100
    plain = grads_of(lambda h, w: F.cross_entropy(h @ w.T, labels, ignore_index=-100), hidden, weight)
    chunk = grads_of(lambda h, w: chunked_ce(h, w, labels, chunk_size), hidden, weight)
    for a, b in zip(chunk, plain, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cross_entropy(hidden @ weight.T, labels), plain[0])


def test_chunked_all_masked_is_zero_with_grad() -> None:
    hidden, weight = lm_head(9, 50, 8, 48)
    h = hidden.requires_grad_()
    loss = chunked_ce(h, weight, torch.full((9,), -100), 4)
    loss.backward()
    assert loss.item() == 0.0 and (h.grad == 0).all()


def max_saved_numel(fn, *inputs: torch.Tensor) -> int:
    """Largest new tensor autograd keeps for backward while running fn(); inputs don't count."""
    sizes = [0]
    input_ptrs = {x.untyped_storage().data_ptr() for x in inputs}

    def pack(x: torch.Tensor) -> torch.Tensor:
        if x.untyped_storage().data_ptr() not in input_ptrs:
            sizes.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn()
    return max(sizes)


def test_chunked_forward_keeps_no_full_logits() -> None:
    p, v, chunk_size = 64, 1000, 8
    hidden, weight = lm_head(p, v, 16, 49)
    hidden.requires_grad_(), weight.requires_grad_()
    ids, lp, tail = cache_topk(logits(p, v, 50), 10)
    labels = ids[:, 0]
    inputs = (hidden, weight, ids, lp, tail, labels)
    plain = max_saved_numel(lambda: topk_kl(hidden @ weight.T, ids, lp, tail), *inputs)
    chunked = max_saved_numel(lambda: chunked_topk_kl(hidden, weight, ids, lp, tail, chunk_size=chunk_size), *inputs)
    chunked_labels = max_saved_numel(lambda: chunked_ce(hidden, weight, labels, chunk_size), *inputs)
    assert plain >= p * v  # the probe sees the logits when they are kept
    assert chunked < chunk_size * v and chunked_labels < chunk_size * v


class PeakBytes(TorchDispatchMode):
    """Peak bytes of tensor storage created by ops and still alive, over a block."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.tracked: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in tree_flatten(out)[0]:
            if isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() not in self.tracked:
                storage = x.untyped_storage()
                ptr, size = storage.data_ptr(), storage.nbytes()
                self.tracked.add(ptr)
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, ptr, size)
        return out

    def _free(self, ptr: int, size: int) -> None:
        self.live -= size
        self.tracked.discard(ptr)


def backward_peaks(p: int, v: int, d: int, chunk_size: int) -> dict[str, int]:
    """Peak live bytes over forward + backward of plain and chunked losses on P = p positions."""
    hidden, weight = lm_head(p, v, d, 51)
    hidden.requires_grad_(), weight.requires_grad_()
    ids, lp, tail = cache_topk(logits(p, v, 52), 10)
    runs = {
        "plain": lambda: topk_kl(hidden @ weight.T, ids, lp, tail),
        "chunked": lambda: chunked_topk_kl(hidden, weight, ids, lp, tail, chunk_size=chunk_size),
        "ce": lambda: chunked_ce(hidden, weight, ids[:, 0], chunk_size),
    }
    peaks = {}
    for name, fn in runs.items():
        with PeakBytes() as probe:
            fn().backward()
        peaks[name] = probe.peak
    return peaks


def test_chunked_backward_peak_memory_bounded_by_chunk() -> None:
    v, d, chunk_size = 4000, 16, 16
    small, large = backward_peaks(128, v, d, chunk_size), backward_peaks(512, v, d, chunk_size)
    chunk_bytes, weight_bytes = chunk_size * v * 4, v * d * 4
    assert large["plain"] > 512 * v * 4  # the probe sees full logits when they exist
    for name in ("chunked", "ce"):
        assert large[name] < 8 * chunk_bytes + 3 * weight_bytes
        assert large[name] < 1.1 * small[name]  # does not grow with P


# ------------------------------------------------------------------ total


def test_total_loss() -> None:
    ce, kd, attn = torch.tensor(2.0), torch.tensor(3.0), torch.tensor(5.0)
    assert total_loss(ce, kd, attn, lam=0.25, attn_weight=0.1).item() == pytest.approx(0.75 * 2 + 0.25 * (3 + 0.5))
    assert total_loss(ce, kd, None, lam=1.0, attn_weight=0.1).item() == pytest.approx(3.0)
    with pytest.raises(ValueError):
        total_loss(ce, kd, attn, lam=1.5, attn_weight=0.0)


# ------------------------------------------------------------- targets as the cache gives them


def test_topk_kl_renormalises_targets_decoded_from_the_codec() -> None:
    """Cached log-probs are quantised, so the k values + tail of a row sum to 1 only within the
    codec's bound; the loss is the KL of that (k+1)-outcome teacher renormalised, computed here
    in float64 from the decoded numbers (a bound of 0.2 nats makes the rescaling visible)."""
    import numpy as np

    from teacher_cache import codec

    P, V, k = 24, 40, 8
    teacher = torch.log_softmax(logits(P, V, 3).double(), -1)  # [P, V]
    top = teacher.topk(k, dim=-1)
    tail = teacher.scatter(1, top.indices, -math.inf).logsumexp(-1)  # [P]
    blob = codec.encode_topk(
        top.indices.numpy(), top.values.float().numpy(), tail.float().numpy(), vocab_size=V, max_error=0.2
    )
    ids, lps, dtail = (torch.from_numpy(x) for x in codec.decode_topk(blob, vocab_size=V))
    t = torch.cat([lps, dtail[:, None]], -1).double().exp()  # [P, k+1]
    assert (t.sum(-1) - 1).abs().max() > 0.02, "decoded rows do not sum to 1"
    t = t / t.sum(-1, keepdim=True)
    student = logits(P, V, 4)
    s_all = torch.softmax(student.double(), -1)  # [P, V]
    s_top = s_all.gather(1, ids)  # [P, k]
    s = torch.cat([s_top, s_all.scatter(1, ids, 0.0).sum(-1, keepdim=True)], -1)  # [P, k+1]
    expect = (t * (t / s).log()).sum(-1).mean()
    assert float(topk_kl(student, ids, lps, dtail)) == pytest.approx(float(expect), rel=1e-5)
    assert np.isfinite(float(expect))


def test_attention_kl_normalises_both_sides() -> None:
    """Student rows scaled (a bf16 or chunked softmax need not sum to exactly 1) and teacher
    log-probs shifted by a constant give the same loss: both sides are compared as distributions."""
    P, T, k = 6, 14, 4
    rows = torch.softmax(logits(P, T, 5), -1)  # [P, T]
    teacher = torch.log_softmax(logits(P, T, 6), -1)  # [P, T]
    top = teacher.topk(k, dim=-1)
    tail = teacher.scatter(1, top.indices, -math.inf).logsumexp(-1)  # [P]
    base = attention_kl(rows, top.indices, top.values, tail)
    assert float(base) > 0.05
    assert float(attention_kl(rows * 0.5, top.indices, top.values, tail)) == pytest.approx(float(base), rel=1e-5)
    assert float(attention_kl(rows, top.indices, top.values + 0.7, tail + 0.7)) == pytest.approx(float(base), rel=1e-5)


def test_chunked_sampled_kl_with_a_mask_equals_plain() -> None:
    P, D, V, m = 13, 8, 30, 5
    g = torch.Generator().manual_seed(7)
    hidden, weight = torch.randn(P, D, generator=g), torch.randn(V, D, generator=g)
    ids = torch.randint(0, V, (P, m), generator=g)
    w = torch.rand(P, m, generator=g)
    w = w / w.sum(-1, keepdim=True)
    mask = torch.rand(P, generator=g) > 0.4
    plain = sampled_kl(hidden @ weight.T, ids, w, mask=mask, temperature=2.0)
    chunked = chunked_sampled_kl(hidden, weight, ids, w, mask=mask, temperature=2.0, chunk_size=4)
    assert float(chunked) == pytest.approx(float(plain), rel=1e-5)
    assert float(plain) != pytest.approx(float(sampled_kl(hidden @ weight.T, ids, w, temperature=2.0)), rel=1e-3)


def test_sampled_weights_use_each_rows_own_number_of_draws() -> None:
    """A batch mixing caches made with different --num-draws: each row divides by its own."""
    offsets, ids, counts = torch.tensor([0, 2, 3]), torch.tensor([5, 7, 5]), torch.tensor([3, 7, 4])
    _, w = sampled_to_padded(offsets, ids, counts, torch.tensor([10, 4]))
    assert torch.allclose(w, torch.tensor([[0.3, 0.7], [1.0, 0.0]]))


def test_attention_kl_drops_a_rounding_tail_where_the_student_rest_is_zero() -> None:
    """Caches written before the summary summed its tail directly hold ~1e-8 of rounding as the
    tail of queries whose every visible key is kept; the student's rest there is exactly 0, so
    that tail is dropped instead of giving +inf. A real tail (1e-2) there is still +inf."""
    g = torch.Generator().manual_seed(0)
    T, k = 6, 6
    scores = torch.randn(T, T, generator=g).masked_fill(torch.ones(T, T).triu(1).bool(), -math.inf)
    rows = scores.softmax(-1)  # [T, T] causal: query t sees keys 0..t, all among the k = T kept
    top = torch.topk(rows, k, dim=-1)
    lp = top.values.log()  # [T, k], -inf on future keys
    exact = attention_kl(rows, top.indices, lp, torch.full((T,), -math.inf))
    rounding = attention_kl(rows, top.indices, lp, torch.full((T,), math.log(1e-8)))
    assert math.isfinite(float(exact)) and float(rounding) == pytest.approx(float(exact), abs=1e-6)
    assert float(attention_kl(rows, top.indices, lp, torch.full((T,), math.log(1e-2)))) == math.inf


def test_a_label_outside_the_vocabulary_is_refused_not_read_as_token_0():
    """A -1 meant as "ignore" (with the default ignore_index -100) gave the loss of token 0, silently;
    F.cross_entropy raises. chunked_ce, which the trainer calls, checks the same."""
    logits = torch.randn(3, 10)
    with pytest.raises(ValueError, match=r"1 labels outside \[0, 10\) \(the first: -1\); mark positions to skip"):
        cross_entropy(logits, torch.tensor([2, -1, 5]))
    with pytest.raises(ValueError, match=r"the first: 10\)"):
        chunked_ce(torch.randn(3, 4), torch.randn(10, 4), torch.tensor([2, 10, 5]), 2)
    ok = cross_entropy(logits, torch.tensor([2, -1, 5]), ignore_index=-1)  # skipped, as asked
    assert ok == pytest.approx(float(F.cross_entropy(logits, torch.tensor([2, -100, 5]))))
    masked = cross_entropy(logits, torch.tensor([2, -7, 5]), mask=torch.tensor([True, False, True]))
    assert masked == pytest.approx(float(ok))  # a masked position's label is never read


def test_settings_outside_their_range_are_refused():
    logits, ids = torch.randn(2, 6), torch.tensor([[0, 1], [2, 3]])
    lps, tail = torch.log(torch.full((2, 2), 0.25)), torch.log(torch.full((2,), 0.5))
    with pytest.raises(ValueError, match="temperature must be finite and > 0, got inf"):
        topk_kl(logits, ids, lps, tail, temperature=math.inf)
    with pytest.raises(ValueError, match="attn_weight must be finite and >= 0, got -1"):
        total_loss(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0), lam=0.5, attn_weight=-1)


def test_sampled_weights_refuse_zero_draws():
    """num_draws=0 gave infinite weights without a word."""
    offsets, ids, counts = torch.tensor([0, 1]), torch.tensor([3]), torch.tensor([2], dtype=torch.int32)
    for draws in (0, torch.tensor([0])):
        with pytest.raises(ValueError, match="num_draws must be >= 1"):
            sampled_to_padded(offsets, ids, counts, draws)
    assert sampled_to_padded(offsets, ids, counts, torch.tensor([4]))[1].tolist() == [[0.5]]


def test_inputs_of_the_wrong_shape_or_kind_are_refused_not_misread():
    """Batched [B, P, V] logits went through cross_entropy as classes on dim 1, a [P, 1] mask
    broadcast to [P, P] (the loss P times too large), and a NaN teacher row was taken for a row
    of no mass (dropped from the sum but counted in the mean): each gave a wrong number, silently."""
    torch.manual_seed(0)
    P, V, D, k = 6, 50, 8, 4
    logits, labels = torch.randn(P, V), torch.randint(0, V, (P,))
    hidden, weight = torch.randn(P, D), torch.randn(V, D)
    ids = torch.stack([torch.randperm(V)[:k] for _ in range(P)])  # [P, k]
    teacher = torch.log_softmax(torch.randn(P, V), -1)
    lps, tail = teacher.gather(-1, ids), torch.log1p(-teacher.gather(-1, ids).exp().sum(-1).clamp(max=1 - 1e-6))
    for call, said in (
        (lambda: cross_entropy(logits[None], labels[None]), r"student_logits must be \[P, V\]"),
        (lambda: chunked_ce(hidden[None], weight, labels[None], 4), r"labels must be \[P\]"),
        (lambda: chunked_ce(hidden[None], weight, labels, 4), r"hidden must be \[P, D\]"),
        (lambda: topk_kl(logits, ids, lps, tail, mask=torch.ones(P, 1, dtype=torch.bool)), r"got torch.bool \[6, 1\]"),
        (lambda: topk_kl(logits, ids, lps, tail, mask=torch.ones(P)), r"got torch.float32 \[6\]"),
        (lambda: cross_entropy(logits, labels, mask=[True] * P), r"mask must be a bool tensor \[P\] = \[6\], got list"),
        (lambda: chunked_topk_kl(hidden, weight, ids, lps, tail, mask=torch.ones(3, dtype=torch.bool)), r"\[3\]"),
    ):
        with pytest.raises(ValueError, match=said):
            call()
    assert torch.isfinite(topk_kl(logits, ids, lps, tail))
    bad = lps.clone()
    bad[0] = math.nan
    assert torch.isnan(topk_kl(logits, ids, bad, tail))  # as sampled_kl: a NaN teacher is never a number
    bad_tail = tail.clone()
    bad_tail[0] = math.nan
    assert torch.isnan(topk_kl(logits, ids, lps, bad_tail))


def test_batched_or_mismatched_inputs_are_refused_by_name():
    """README: the losses take flattened positions and refuse other shapes. The KL losses checked
    none: batched [B, P, ...] inputs failed deep in torch (a broadcast or index error naming no
    argument), sampled_kl complained of a mask it was not given, sampled_kl_rows returned [B, P],
    and ids of other positions than the logits' were an index error."""
    torch.manual_seed(0)
    B, P, V, D, k, T = 2, 5, 40, 8, 3, 7
    z, hidden, weight = torch.randn(B, P, V), torch.randn(B, P, D), torch.randn(V, D)
    teacher = torch.log_softmax(torch.randn(B, P, V), -1).topk(k)  # [B, P, k]
    ids, lps = teacher.indices, teacher.values
    tail = torch.log1p(-lps.exp().sum(-1).clamp(max=1 - 1e-6))  # [B, P]
    rows = torch.softmax(torch.randn(B, P, T), -1)  # [B, P, T]
    keys, key_lps = torch.randint(0, T, (B, P, k)), torch.full((B, P, k), -2.0)
    for call, said in (
        (
            lambda: topk_kl(z, ids, lps, tail),
            r"student_logits must be \[P, V\] \(positions flattened\), got shape \[2, 5, 40\]",
        ),
        (lambda: topk_kl(z[0], ids, lps, tail), r"topk_ids must be \[P, k\] \(positions flattened, P = 5, V = 40\)"),
        (lambda: topk_kl(z[0, :3], ids[0], lps[0], tail[0]), r"topk_ids must be \[P, k\] \(positions flattened, P = 3"),
        (
            lambda: topk_kl(z[0], ids[0], lps[0, :, :2], tail[0]),
            r"topk_logprobs must be \[P, k\] .*k = 3\), got shape \[5, 2\]",
        ),
        (lambda: topk_kl(z[0], ids[0], lps[0], tail[0, :, None]), r"tail_logprob must be \[P\]"),
        (lambda: topk_kl_rows(z, ids, lps, tail), r"student_logits must be \[P, V\]"),
        (lambda: sampled_kl(z, ids, lps.exp()), r"student_logits must be \[P, V\]"),
        (lambda: sampled_kl_rows(z, ids, lps.exp()), r"student_logits must be \[P, V\]"),
        (lambda: sampled_kl(z[0], ids[0, :, 0], lps[0, :, 0].exp()), r"ids must be \[P, m\]"),
        (lambda: attention_kl(rows, keys, key_lps, tail), r"student_rows must be \[P, T\]"),
        (lambda: attention_kl(rows[0], keys[0], key_lps[0], tail[0, :4]), r"tail_logprob must be \[P\]"),
        (lambda: chunked_topk_kl(hidden[0], weight, ids, lps, tail), r"topk_ids must be \[P, k\]"),
        (
            lambda: chunked_topk_kl(hidden[0], weight[:, :4], ids[0], lps[0], tail[0]),
            r"lm_head_weight must be \[V, D\]",
        ),
        (lambda: chunked_sampled_kl(hidden[0], weight, ids, lps.exp()), r"ids must be \[P, m\]"),
        (lambda: cross_entropy(z[0], ids[0, :4, 0]), r"labels must be \[P\] \(positions flattened, P = 5"),
    ):
        with pytest.raises(ValueError, match=said):
            call()
    flat = (z[0], ids[0], lps[0], tail[0])
    assert torch.isfinite(topk_kl(*flat)) and topk_kl_rows(*flat).shape == (P,)
    assert torch.isfinite(chunked_topk_kl(hidden[0], weight, *flat[1:], chunk_size=2))
    assert torch.isfinite(sampled_kl(z[0], ids[0], lps[0].exp())) and torch.isfinite(
        attention_kl(rows[0], keys[0], key_lps[0], tail[0])
    )


def test_a_cached_samples_numpy_arrays_are_refused_by_name():
    """A CachedSample's arrays are numpy: passed as they are, the losses failed in their own shape
    check with "'numpy.ndarray' object has no attribute 'dim'"."""
    z = logits(4, 10, seed=0)
    teacher = torch.log_softmax(logits(4, 10, seed=1), -1).topk(3)
    ids, lps = teacher.indices, teacher.values
    tail = torch.log1p(-lps.exp().sum(-1))
    for call, said in (
        (lambda: topk_kl(z, ids.numpy(), lps, tail), "topk_ids must be a torch.Tensor, got ndarray"),
        (lambda: topk_kl(z, ids, lps, tail.numpy()), "tail_logprob must be a torch.Tensor, got ndarray"),
        (lambda: sampled_kl(z, ids, lps.exp().numpy()), "weights must be a torch.Tensor, got ndarray"),
        (lambda: cross_entropy(z, ids[:, 0].tolist()), "labels must be a torch.Tensor, got list"),
    ):
        with pytest.raises(TypeError, match=said):
            call()
