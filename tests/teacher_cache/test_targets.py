"""Logits -> cached targets, against a float64 dense reference."""

from __future__ import annotations

import decimal
from decimal import Decimal

import numpy as np
import pytest
import torch

from teacher_cache.targets import attention_summary, log1mexp, sampled_from_logits, tail_from_topk, topk_from_logits


def exact_log1m(kept: list[Decimal]) -> float:
    """log(1 - sum(kept)) in 800-digit decimal arithmetic (1 - 1e-700 must not round to 1)."""
    with decimal.localcontext() as ctx:
        ctx.prec = 800
        return float((1 - sum(kept)).ln())


def exact_exp(x: float) -> Decimal:
    with decimal.localcontext() as ctx:
        ctx.prec = 800
        return Decimal(float(x)).exp()


def reference(logits: torch.Tensor, k: int):
    lp = torch.log_softmax(logits.double(), -1)  # [P, V]
    top = lp.topk(k, -1)
    tail = lp.scatter(-1, top.indices, -torch.inf).logsumexp(-1)
    return top.indices, top.values, tail


@pytest.mark.parametrize("V,k", [(50, 1), (50, 8), (50, 49), (50, 50), (32000, 32)])
@pytest.mark.parametrize("scale", [0.5, 5.0, 60.0])  # flat, realistic, and extremely peaked rows
def test_topk_matches_dense_reference(V, k, scale):
    g = torch.Generator().manual_seed(V * 7 + k)
    logits = torch.randn(40, V, generator=g) * scale
    before = logits.clone()
    got = topk_from_logits(logits, k)
    assert torch.equal(logits, before), "inplace=False must leave the logits alone"
    ids, lps, tail = reference(logits, k)
    np.testing.assert_array_equal(got.ids, ids.numpy())
    np.testing.assert_allclose(got.logprobs, lps.numpy(), rtol=1e-5, atol=1e-5)
    finite = torch.isfinite(tail)
    np.testing.assert_array_equal(np.isfinite(got.tail_logprob), finite.numpy())
    # the tail is accurate relative to itself, even at exp(tail) ~ 1e-300
    np.testing.assert_allclose(got.tail_logprob[finite.numpy()], tail[finite].numpy(), rtol=1e-4, atol=1e-4)


def test_inplace_and_masked_vocabulary():
    logits = torch.randn(6, 30)
    logits[:, 10:] = -torch.inf  # only 10 tokens possible
    want = topk_from_logits(logits, 12)
    got = topk_from_logits(logits.clone(), 12, inplace=True)
    np.testing.assert_array_equal(got.logprobs, want.logprobs)
    assert np.all(np.isneginf(want.tail_logprob)) and np.all(np.isneginf(want.logprobs[:, 10:]))
    np.testing.assert_allclose(np.exp(want.logprobs[:, :10].astype(np.float64)).sum(1), 1.0, atol=1e-6)


def test_sampled_counts_are_distinct_sorted_and_complete():
    logits = torch.randn(25, 100) * 3
    s = sampled_from_logits(logits, 50, torch.Generator().manual_seed(0))
    assert s.offsets[0] == 0 and s.offsets[-1] == len(s.ids) == len(s.counts)
    for p in range(25):
        ids = s.ids[s.offsets[p] : s.offsets[p + 1]]
        assert np.all(np.diff(ids) > 0) and s.counts[s.offsets[p] : s.offsets[p + 1]].sum() == 50
    again = sampled_from_logits(logits, 50, torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(s.ids, again.ids)


def test_attention_summary_keeps_mass():
    rows = torch.softmax(torch.randn(7, 20), -1)
    a = attention_summary(rows, 5)
    np.testing.assert_allclose(np.exp(a.logprobs).sum(1) + np.exp(a.tail_logprob), 1.0, atol=1e-5)
    np.testing.assert_array_equal(a.ids, rows.topk(5).indices.numpy())


def test_k_larger_than_the_vocabulary_keeps_every_token_through_the_codec():
    """--top-k 64 on a 50-token vocabulary: every token is kept (k = 50), the tail is empty
    (-inf), and the codec round-trips that block within its bound."""
    from teacher_cache import codec

    logits = torch.randn(9, 50, generator=torch.Generator().manual_seed(3)) * 3
    got = topk_from_logits(logits, 64)
    assert got.ids.shape == got.logprobs.shape == (9, 50) and np.isneginf(got.tail_logprob).all()
    np.testing.assert_array_equal(np.sort(got.ids, axis=1), np.tile(np.arange(50), (9, 1)))
    ids, lps, tail = codec.decode_topk(
        codec.encode_topk(got.ids, got.logprobs, got.tail_logprob, vocab_size=50), vocab_size=50
    )
    np.testing.assert_array_equal(ids, got.ids)
    near = got.logprobs >= got.logprobs[:, :1] - 10
    assert np.abs(lps - got.logprobs)[near].max() <= 0.02 + 1e-6 and np.isneginf(tail).all()


def test_sampled_counts_follow_the_teacher_distribution():
    """Over many positions sharing one distribution, each id's share of the draws matches its
    softmax probability within 5 standard errors (uniform draws, or the wrong temperature, fail)."""
    V, P, N = 12, 400, 50
    logits = torch.linspace(3.0, -3.0, V).repeat(P, 1)  # [P, V] one distribution, probabilities 0.3 .. 0.0008
    got = sampled_from_logits(logits, N, torch.Generator().manual_seed(0))
    freq = np.bincount(got.ids, weights=got.counts, minlength=V) / (P * N)  # [V]
    p = torch.softmax(logits[0].double(), -1).numpy()  # [V]
    se = np.sqrt(p * (1 - p) / (P * N))
    assert np.all(np.abs(freq - p) <= 5 * se + 1e-12), np.abs(freq - p) / se


def test_sampled_draws_keep_the_rare_ids_behind_a_likely_one():
    """A 0.01 tail spread over 49151 ids after a 0.99 id (id 0, as a vocabulary's order puts it):
    the tail's share of the draws is its probability within 5 standard errors (drawing from float32
    probabilities gave 0.0088: torch.multinomial's float32 running sum rounded part of each rare id
    off). Rows past SAMPLE_ROWS draw as in one call."""
    V, P, N = 49152, 20, 20000
    logits = torch.zeros(P, V)  # [P, V]
    logits[:, 0] = np.log(0.99 * (V - 1) / 0.01)
    got = sampled_from_logits(logits, N, torch.Generator().manual_seed(0))
    tail = 1 - torch.softmax(logits[0].double(), -1)[0].item()
    share = got.counts[got.ids != 0].sum() / (P * N)
    assert abs(share - tail) <= 5 * np.sqrt(tail * (1 - tail) / (P * N)), (share, tail)

    logits = torch.randn(150, 30, generator=torch.Generator().manual_seed(1)) * 2  # [150, 30]: 3 blocks of rows
    got = sampled_from_logits(logits, 7, torch.Generator().manual_seed(2))
    one = torch.multinomial(
        torch.softmax(logits.double(), -1), 7, replacement=True, generator=torch.Generator().manual_seed(2)
    )
    for p in range(150):
        ids, counts = np.unique(one[p].numpy(), return_counts=True)
        np.testing.assert_array_equal(got.ids[got.offsets[p] : got.offsets[p + 1]], ids)
        np.testing.assert_array_equal(got.counts[got.offsets[p] : got.offsets[p + 1]], counts)


@pytest.mark.parametrize("x", [-1e-300, -1e-20, -1e-12, -1e-6, -0.1, -0.6931, -0.7, -1.0, -5.0, -40.0, -700.0])
def test_log1mexp_is_accurate_at_both_ends(x):
    """log(1 - exp(x)) to float64 precision near 0 (where 1 - exp(x) cancels) and far below it
    (where log(1 - tiny) must not round to 0)."""
    got = log1mexp(torch.tensor([x], dtype=torch.float64)).item()
    assert got == pytest.approx(exact_log1m([exact_exp(x)]), rel=1e-12, abs=0)


def test_tail_from_topk_sums_the_kept_mass_in_float64():
    """The stock vLLM path's tail: log(1 - sum exp(top-k)) of float32 log-probs. A row keeping all
    but 1e-9 of the mass needs the sum in float64 (float32 would be off by ~6e-8); a row keeping
    almost nothing gives a tail just below 0."""
    rows = np.array(
        [
            [np.log(0.5), np.log(0.25), np.log(0.125)],
            [-0.6931472, -0.69314724, -17.298777],  # 1 - kept = 1.00002e-9
            [-20.0, -21.0, -np.inf],
        ],
        np.float32,
    )  # [P, k]
    got = tail_from_topk(torch.from_numpy(rows)).numpy()  # [P]
    assert got.dtype == np.float32
    want = [exact_log1m([exact_exp(v) for v in row if np.isfinite(v)]) for row in rows]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[1] == pytest.approx(-20.7232, abs=1e-4)


def test_attention_summary_with_k_beyond_the_keys_keeps_them_all():
    """Early queries of a short sample have fewer keys T than attention_top_k: all T are kept."""
    rows = torch.softmax(torch.randn(3, 4, generator=torch.Generator().manual_seed(1)), -1)  # [P, T]
    a = attention_summary(rows, 8)
    assert a.ids.shape == a.logprobs.shape == (3, 4)
    np.testing.assert_array_equal(np.sort(a.ids, axis=1), np.tile(np.arange(4), (3, 1)))
    np.testing.assert_allclose(np.exp(a.logprobs.astype(np.float64)).sum(1), 1.0, atol=1e-6)


def test_attention_tail_sums_the_weights_not_kept_in_float64():
    """62 of 64 keys hold all but ~1e-6 of the weight: the tail is the log of the 2 weights left,
    summed directly (1 - kept in float would be off by the row's own rounding, ~1e-7, a tenth
    of what is left; the student side sums its rest the same way)."""
    rng = np.random.default_rng(0)
    big = rng.uniform(0.5, 1.5, (5, 62))  # [P, 62]
    rows = np.concatenate([big / big.sum(1, keepdims=True) * (1 - 1e-6), np.full((5, 2), 5e-7)], 1).astype(np.float32)
    a = attention_summary(torch.from_numpy(rows), 62)
    want = np.log(np.sort(rows.astype(np.float64), axis=1)[:, :2].sum(1))  # [P]
    np.testing.assert_allclose(a.tail_logprob, want, atol=1e-3)
