"""Round-trip, bound and corruption tests for teacher_cache/codec.py (all in memory)."""

from __future__ import annotations

import functools
import operator
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from teacher_cache import codec
from teacher_cache.codec import (
    CodecError,
    decode_sampled,
    decode_topk,
    encode_sampled,
    encode_topk,
    topk_error_bound,
)

BOUND = topk_error_bound()
HYP = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------- generators


def realistic_logprobs(rng: np.random.Generator, P: int, V: int) -> np.ndarray:
    """Peaky, heavy-tailed next-token log-probs float32 [P, V]: Zipf-like prior over ids, Gumbel
    noise, a document topic set and boosted candidates (recipe of bench_codec.synthetic_logprobs)."""
    prior = -1.2 * np.log1p(np.arange(V) / 200.0)  # [V]
    w = np.exp(prior) / np.exp(prior).sum()
    topic = rng.choice(V, min(V, 400), replace=False, p=w)
    logits = prior + rng.gumbel(size=(P, V))  # [P, V]
    logits[:, topic] += 2.5
    for j in range(4):
        cand = np.where(rng.random(P) < 0.5, rng.choice(topic, P), rng.choice(V, P, p=w))  # [P]
        logits[np.arange(P), cand] += rng.uniform(1.0, 17.0, P) * 0.75**j  # top-1 p ~0.1..0.99
    logits -= logits.max(1, keepdims=True)
    return (logits - np.log(np.exp(logits).sum(1, keepdims=True))).astype(np.float32)


def baseline_bytes(ids: np.ndarray, lp: np.ndarray, tail: np.ndarray) -> int:
    """The reference layout: uint16 ids + fp16 log-probs and tail through zstd level 3."""
    raw = ids.astype(np.uint16).tobytes() + lp.astype(np.float16).tobytes() + tail.astype(np.float16).tobytes()
    return len(zstandard.ZstdCompressor(level=3).compress(raw))


def topk_of(logprobs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 [P, V] -> ids int64 [P, k], logprobs float32 [P, k] desc, tail float32 [P]."""
    ids = np.argsort(-logprobs, axis=1, kind="stable")[:, :k]  # [P, k]
    lp = np.take_along_axis(logprobs, ids, 1)  # [P, k]
    rest = 1.0 - np.exp(lp.astype(np.float64)).sum(1)  # [P]
    with np.errstate(divide="ignore"):
        tail = np.where(rest > 0, np.log(np.maximum(rest, 0)), -np.inf).astype(np.float32)
    return ids.astype(np.int64), lp, tail


def zipf_topk(P: int, k: int = 16, V: int = 70000, U: int = 3000, seed: int = 0):
    """Top-k rows whose ids follow a Zipf law over U ids scattered over [0, V), so frequent ids
    are not the small ones: the encoder picks a dictionary id mode (1 at P = 64, 2 at P = 128).
    -> ids int64 [P, k], logprobs float32 [P, k] descending, tail float32 [P]."""
    rng = np.random.default_rng(seed)
    vocab = rng.choice(V, U, replace=False)  # [U] in no particular order
    w = 1 / np.arange(1, U + 1) ** 1.5  # [U]
    ids = np.stack([vocab[rng.choice(U, k, replace=False, p=w / w.sum())] for _ in range(P)])  # [P, k]
    lp = -np.cumsum(rng.exponential(1.0, (P, k)), axis=1).astype(np.float32)  # [P, k]
    return ids.astype(np.int64), lp, np.full(P, -3.0, np.float32)


def sample_counts(rng: np.random.Generator, logprobs: np.ndarray, n: int):
    """n draws with replacement per row -> offsets int64 [P+1], ids int64 [N], counts int64 [N]."""
    p = np.exp(logprobs.astype(np.float64))
    cdf = np.cumsum(p / p.sum(1, keepdims=True), 1)  # [P, V]
    offsets, ids, counts = [0], [], []
    for row_cdf, u in zip(cdf, rng.random((len(p), n)), strict=True):
        uq, c = np.unique(np.minimum(np.searchsorted(row_cdf, u), p.shape[1] - 1), return_counts=True)
        ids.append(uq)
        counts.append(c)
        offsets.append(offsets[-1] + len(uq))
    cat = (lambda xs: np.concatenate(xs)) if ids else (lambda xs: np.zeros(0, np.int64))
    return np.array(offsets, np.int64), cat(ids).astype(np.int64), cat(counts).astype(np.int64)


def check_topk(ids, lp, tail, blob, V, bound=BOUND):
    """Decode and assert exact ids / -inf and the documented value bounds."""
    ids2, lp2, tail2 = decode_topk(blob, vocab_size=V)
    assert ids2.dtype == np.int64 and lp2.dtype == np.float32 and tail2.dtype == np.float32
    assert ids2.shape == ids.shape and lp2.shape == lp.shape and tail2.shape == tail.shape
    np.testing.assert_array_equal(ids2, ids)
    assert (lp2[:, 1:] <= lp2[:, :-1]).all()
    np.testing.assert_array_equal(np.isneginf(lp2), np.isneginf(lp))
    np.testing.assert_array_equal(np.isneginf(tail2), np.isneginf(tail))
    ref = np.maximum(lp.astype(np.float64), bound["logprob_floor"])  # clamped input  [P, k]
    fin = np.isfinite(lp)
    err = np.abs(lp2.astype(np.float64) - ref)
    slack = 1e-6 * np.maximum(1.0, np.abs(ref))  # float32 rounding of the output
    near = fin & (ref >= ref[:, :1] - 10.0)
    assert (err[near] <= bound["logprob_abs_err_within_10_nats"] + slack[near]).all()
    assert (err[fin] <= bound["logprob_abs_err_below_fine_region"] + slack[fin]).all()
    tref = np.maximum(tail.astype(np.float64), bound["logprob_floor"])
    tf = np.isfinite(tail)
    assert (np.abs(tail2[tf] - tref[tf]) <= bound["tail_logprob_abs_err"] + 1e-6 * (1 - tref[tf])).all()
    return ids2, lp2, tail2


# ----------------------------------------------------------------------------- top-k


@st.composite
def topk_case(draw):
    V = draw(st.sampled_from([1, 2, 5, 37, 300, 65535, 65536, 65537, 50_000, 1 << 20, 2**32 - 1]))
    k = draw(st.integers(1, min(V, 48)))
    if V <= 64 and draw(st.booleans()):
        k = V  # k = vocab
    P = draw(st.sampled_from([0, 1, 2, 3, 17, 64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if V <= 4096:
        ids = np.argsort(rng.random((P, V)), axis=1)[:, :k]
    else:  # distinct per row without a [P, V] array, in a window that may touch V - 1
        span = min(V, 1 << 16)
        top = draw(st.booleans())
        ids = np.zeros((P, k), np.int64)
        for p in range(P):
            off = V - span if top else int(rng.integers(0, V - span + 1))
            ids[p] = off + rng.choice(span, k, replace=False)
    style = draw(st.sampled_from(["smooth", "ties", "spread", "neg_inf", "extreme"]))
    gaps = {
        "smooth": rng.exponential(0.3, (P, k)),
        "ties": np.round(rng.exponential(0.5, (P, k))) * 0.5,  # many exact ties
        "spread": rng.exponential(4.0, (P, k)),  # crosses the 10-nat fine region
        "neg_inf": rng.exponential(1.0, (P, k)),
        "extreme": rng.choice([0.0, 1e-7, 0.02, 0.06, 9.99, 10.0, 10.3, 300.0, 1e5], (P, k)),
    }[style]
    top1 = -rng.choice([0.0, 1e-8, 0.01, 0.7, 5.0, 12.0, 40.0], (P, 1))
    lp = (top1 - np.cumsum(gaps, axis=1) + gaps[:, :1]).astype(np.float32)  # [P, k] desc
    if style == "neg_inf" and P:
        n_fin = rng.integers(0, k + 1, P)  # teacher with fewer nonzero tokens than k
        lp[np.arange(k)[None, :] >= n_fin[:, None]] = -np.inf
    tail = rng.choice([-np.inf, -1e-3, -0.5, -3.0, -25.0, -80.0, -1e6], P).astype(np.float32)
    return ids.astype(np.int64).reshape(P, k), lp.reshape(P, k), tail, V


@HYP
@given(topk_case())
def test_topk_roundtrip_property(case):
    ids, lp, tail, V = case
    check_topk(ids, lp, tail, encode_topk(ids, lp, tail, vocab_size=V), V)


@HYP
@given(topk_case(), st.sampled_from([0.005, 0.01, 0.025, 0.05, 0.1, 0.175, 0.5, 1.275]))
def test_topk_roundtrip_at_any_error_bound(case, max_error):
    """encode_topk(max_error=e) keeps every stored log-prob within e of the input in the fine
    region (>= 10.24 nats below the top-1, whatever the step) and within 8e below it."""
    ids, lp, tail, V = case
    bound = topk_error_bound(max_error)
    assert bound["logprob_abs_err_within_10_nats"] == pytest.approx(max_error)
    assert bound["fine_region_nats"] >= 10.24 - 1e-9
    check_topk(ids, lp, tail, encode_topk(ids, lp, tail, vocab_size=V, max_error=max_error), V, bound)


def test_looser_error_bound_gives_smaller_blobs():
    """Realistic distributions: the step is the size/fidelity trade-off (sizes in the bench)."""
    ids, lp, tail = topk_of(realistic_logprobs(np.random.default_rng(8), 128, 32000), 32)
    sizes = [len(encode_topk(ids, lp, tail, vocab_size=32000, max_error=e)) for e in (0.005, 0.02, 0.05, 0.1)]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < 0.95 * sizes[1]
    assert encode_topk(ids, lp, tail, vocab_size=32000)[31] == 4  # the default step: 4 x 0.01 nats


@pytest.mark.parametrize("bad", [0.0, -0.02, 0.0201, 0.003, 1.28, float("nan"), float("inf"), True, "0.02"])
def test_error_bound_must_be_on_the_step_grid(bad):
    ids, lp, tail = topk_of(realistic_logprobs(np.random.default_rng(9), 4, 100), 4)
    with pytest.raises(ValueError, match="error bound|must be a number"):
        encode_topk(ids, lp, tail, vocab_size=100, max_error=bad)


def test_topk_realistic_size_and_error():
    rng = np.random.default_rng(0)
    V, P, k = 32000, 256, 32
    ids, lp, tail = topk_of(realistic_logprobs(rng, P, V), k)
    blob = encode_topk(ids, lp, tail, vocab_size=V)
    _, lp2, _ = check_topk(ids, lp, tail, blob, V)
    assert len(blob) < 0.6 * baseline_bytes(ids, lp, tail)  # ~0.53x measured, docs/CODEC.md
    assert len(blob) / P < 66  # 60.3 B/pos in the bench at 512 positions a block
    assert np.abs(lp2 - lp)[lp >= lp[:, :1] - 10].max() <= 0.02 + 1e-5


def test_topk_mass_stays_near_one():
    rng = np.random.default_rng(1)
    ids, lp, tail = topk_of(realistic_logprobs(rng, 64, 3000), 16)
    _, lp2, tail2 = decode_topk(encode_topk(ids, lp, tail, vocab_size=3000), vocab_size=3000)
    total = np.exp(lp2.astype(np.float64)).sum(1) + np.exp(tail2.astype(np.float64))
    assert (total <= 1 + BOUND["mass_rel_err"] + 1e-6).all() and (total >= 0.97).all()


@pytest.mark.parametrize("P,k,V", [(0, 1, 1), (0, 32, 50), (1, 1, 1), (5, 1, 70000), (3, 4, 4)])
def test_topk_edges(P, k, V):
    rng = np.random.default_rng(P + k)
    ids = np.stack([rng.permutation(V)[:k] for _ in range(P)]) if P else np.zeros((0, k), np.int64)
    lp = np.sort(-rng.exponential(2.0, (P, k)), axis=1)[:, ::-1].astype(np.float32)
    tail = np.full(P, -np.inf if k == V else -2.0, np.float32)
    check_topk(ids, np.ascontiguousarray(lp), tail, encode_topk(ids, lp, tail, vocab_size=V), V)


def test_topk_all_neg_inf_rows_and_narrow_id_dtypes():
    ids = np.array([[3, 1, 2], [0, 1, 2]], np.uint8)
    lp = np.array([[-np.inf] * 3, [-0.1, -np.inf, -np.inf]], np.float32)
    tail = np.array([-np.inf, -2.4], np.float32)
    _, lp2, tail2 = check_topk(ids.astype(np.int64), lp, tail, encode_topk(ids, lp, tail, vocab_size=4), 4)
    assert np.isneginf(lp2[0]).all() and np.isneginf(tail2[0])


def test_dictionary_ordered_by_count_roundtrips_with_tied_counts():
    """Id mode 2 orders the dictionary by count with ties in id order, on both sides: an encoder
    or decoder whose sort is not stable there would map indexes to the wrong ids."""
    ids, lp, tail = zipf_topk(P=128)
    blob = encode_topk(ids, lp, tail, vocab_size=70000)
    assert blob[6] == codec.ID_DICT_BY_COUNT
    _, counts = np.unique(ids, return_counts=True)
    assert (np.diff(np.sort(counts)) == 0).sum() > 100  # many ids share a count
    check_topk(ids, lp, tail, blob, 70000)


def test_neg_inf_after_a_row_spanning_the_coarse_region_roundtrips():
    """-inf entries repeat the last finite code (delta 0). Were their codes left at 0, the
    negative delta would wrap in its byte planes and a valid row could decode past the code
    limit."""
    ids = np.array([[0, 1, 2], [3, 4, 5]])
    lp = np.array([[-5000.0, -9999.0, -np.inf], [0.0, -300.0, -np.inf]], np.float32)
    tail = np.array([-np.inf, -1.0], np.float32)
    check_topk(ids, lp, tail, encode_topk(ids, lp, tail, vocab_size=6), 6)


def test_logprobs_below_the_floor_are_clamped_to_it():
    """The documented floor is -10000 nats: -5000 is kept (to the coarse step), -20000 reads
    back as -10000, and so does a tail below it."""
    ids = np.array([[0, 1, 2]])
    lp = np.array([[0.0, -5000.0, -20000.0]], np.float32)
    _, lp2, tail2 = decode_topk(encode_topk(ids, lp, np.array([-20000.0], np.float32), vocab_size=3), vocab_size=3)
    np.testing.assert_allclose(lp2[0], [0.0, -5000.0, -10000.0], atol=BOUND["logprob_abs_err_below_fine_region"])
    assert abs(tail2[0] + 10000.0) <= BOUND["tail_logprob_abs_err"] + 1e-3


def test_rounding_noise_above_zero_reads_as_zero():
    """float32 log-softmax can give a top-1 a hair above 0: up to 0.02 is accepted as 0."""
    ids = np.array([[4, 2]])
    lp = np.array([[1e-6, -1.0]], np.float32)
    tail = np.array([0.019], np.float32)
    _, lp2, tail2 = decode_topk(encode_topk(ids, lp, tail, vocab_size=5), vocab_size=5)
    assert lp2[0, 0] == 0.0 and tail2[0] == 0.0 and abs(lp2[0, 1] + 1.0) <= BOUND["logprob_abs_err_within_10_nats"]


@pytest.mark.parametrize("V", [0, True, 2**32, 5.0])
def test_vocab_size_is_checked_even_for_an_empty_block(V):
    """vocab_size must be an int in [1, 2**32), whatever the block holds (a bool is not an int)."""
    with pytest.raises(ValueError, match="vocab_size must be"):
        encode_sampled(np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), vocab_size=V, num_draws=1)
    with pytest.raises(ValueError, match="vocab_size"):
        encode_topk(np.zeros((0, 1), np.int64), np.zeros((0, 1), np.float32), np.zeros(0, np.float32), vocab_size=V)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda i, lps, t: (i, lps, t, 3), "k=4 exceeds vocab_size=3"),
        (lambda i, lps, t: (i.astype(np.float32), lps, t, 10), "integer"),
        (lambda i, lps, t: (np.where(i == i[0, 1], i[0, 0], i), lps, t, 10), "distinct"),
        (lambda i, lps, t: (i + 7, lps, t, 10), r"\[0, vocab_size=10\)"),
        (lambda i, lps, t: (-i - 1, lps, t, 10), r"\[0, vocab_size=10\)"),
        (lambda i, lps, t: (i, lps[:, ::-1], t, 10), "sorted descending"),
        (lambda i, lps, t: (i, np.where(lps == lps[0, 0], np.nan, lps), t, 10), "NaN"),
        (lambda i, lps, t: (i, lps + 1.0, t, 10), "above 0"),
        (lambda i, lps, t: (i, lps, t * np.nan, 10), "NaN"),
        (lambda i, lps, t: (i, lps[:, :3], t, 10), "shape"),
        (lambda i, lps, t: (i, lps, t[:1], 10), "shape"),
        (lambda i, lps, t: (i[0], lps, t, 10), r"\[P, k\]"),
        (lambda i, lps, t: (i, lps.astype(np.int32), t, 10), "float"),
        (lambda i, lps, t: (i, lps, t, 0), "vocab_size"),
    ],
)
def test_topk_encode_rejects(mutate, match):
    ids = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    lp = np.array([[-0.1, -1.0, -2.0, -3.0], [-0.5, -0.6, -0.7, -9.0]], np.float32)
    tail = np.array([-3.0, -1.0], np.float32)
    i, lps, t, V = mutate(ids, lp, tail)
    with pytest.raises(ValueError, match=match):
        encode_topk(i, lps, t, vocab_size=V)


# ----------------------------------------------------------------------------- sampled


@st.composite
def sampled_case(draw):
    V = draw(st.sampled_from([1, 3, 50, 1000, 65537, 2**32 - 1]))
    P = draw(st.sampled_from([0, 1, 2, 9, 40]))
    n = draw(st.sampled_from([1, 2, 7, 50, 300]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if V <= 1000:
        lp = np.log(rng.dirichlet(np.full(V, draw(st.sampled_from([0.05, 1.0]))), P) + 1e-30)
        return *sample_counts(rng, lp.astype(np.float32), n), V, n
    offsets, ids, counts = [0], [], []
    for _ in range(P):  # huge vocab: draws from a random small support spread over [0, V)
        support = rng.choice(V - 1, size=20, replace=False) if V > 2**31 else rng.choice(V, 20, replace=False)
        uq, c = np.unique(support[rng.integers(0, 20, n)], return_counts=True)
        ids.append(uq), counts.append(c), offsets.append(offsets[-1] + len(uq))
    cat = (lambda xs: np.concatenate(xs)) if P else (lambda xs: np.zeros(0, np.int64))
    return np.array(offsets), cat(ids), cat(counts), V, n


@HYP
@given(sampled_case(), st.booleans())
def test_sampled_roundtrip_exact(case, shuffle):
    offsets, ids, counts, V, n = case
    P = len(offsets) - 1
    ids_in, counts_in = ids.copy(), counts.copy()
    if shuffle and len(ids):  # order within a position is not part of the data
        rng = np.random.default_rng(len(ids))
        for p in range(P):
            perm = offsets[p] + rng.permutation(offsets[p + 1] - offsets[p])
            ids_in[offsets[p] : offsets[p + 1]], counts_in[offsets[p] : offsets[p + 1]] = ids[perm], counts[perm]
    blob = encode_sampled(offsets, ids_in, counts_in.astype(np.int32), vocab_size=V, num_draws=n)
    o2, i2, c2, n2 = decode_sampled(blob, vocab_size=V)
    assert o2.dtype == np.int64 and i2.dtype == np.int64 and c2.dtype == np.int32 and n2 == n
    np.testing.assert_array_equal(o2, offsets)
    np.testing.assert_array_equal(i2, ids)  # canonical order: id ascending per position
    np.testing.assert_array_equal(c2, counts)


def test_sampled_realistic_size():
    rng = np.random.default_rng(2)
    lp = realistic_logprobs(rng, 256, 32000)
    offsets, ids, counts = sample_counts(rng, lp, 50)
    blob = encode_sampled(offsets, ids, counts, vocab_size=32000, num_draws=50)
    assert len(blob) / 256 < 30
    _, i2, c2, _ = decode_sampled(blob, vocab_size=32000)
    np.testing.assert_array_equal(i2, ids)
    np.testing.assert_array_equal(c2, counts)


@pytest.mark.parametrize(
    "offsets,ids,counts,V,n,match",
    [
        ([0, 2], [1, 1], [1, 1], 5, 2, "distinct"),
        ([0, 2], [1, 2], [1, 2], 5, 2, "sum to num_draws"),
        ([0, 2], [1, 2], [0, 2], 5, 2, ">= 1"),
        ([0, 2], [1, 9], [1, 1], 5, 2, "vocab_size"),
        ([0, 0, 2], [1, 2], [1, 1], 5, 2, "at least one"),
        ([1, 2], [1, 2], [1, 1], 5, 2, "start at 0"),
        ([0, 3], [1, 2], [1, 1], 5, 2, "end at len"),
        ([0, 2], [1, 2], [1, 1], 5, 0, "num_draws"),
        ([0, 1], [1], [2**31], 5, 2**31, "num_draws"),  # counts decode as int32
        ([0, 2], [1, 2], [1], 5, 2, r"\[N\]"),
    ],
)
def test_sampled_encode_rejects(offsets, ids, counts, V, n, match):
    with pytest.raises(ValueError, match=match):
        encode_sampled(np.array(offsets), np.array(ids), np.array(counts), vocab_size=V, num_draws=n)


# ----------------------------------------------------------------------------- corruption


def small_topk_blob(P=24, k=8, V=5000, seed=3) -> bytes:
    ids, lp, tail = topk_of(realistic_logprobs(np.random.default_rng(seed), P, V), k)
    return encode_topk(ids, lp, tail, vocab_size=V)


def small_sampled_blob(P: int = 24) -> bytes:
    rng = np.random.default_rng(4)
    offsets, ids, counts = sample_counts(rng, realistic_logprobs(rng, P, 5000), 50)
    return encode_sampled(offsets, ids, counts, vocab_size=5000, num_draws=50)


def decoders():
    return [
        ("topk", small_topk_blob(), lambda b: decode_topk(b, vocab_size=5000)),
        ("sampled", small_sampled_blob(), lambda b: decode_sampled(b, vocab_size=5000)),
        ("sampled_row_gaps", small_sampled_blob(P=60), lambda b: decode_sampled(b, vocab_size=5000)),
        ("topk_big", small_topk_blob(P=300, k=32), lambda b: decode_topk(b, vocab_size=5000)),
    ]


@pytest.mark.parametrize("name,blob,decode", decoders(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_flipped_byte_and_truncation_raises(name, blob, decode):
    decode(blob)  # the clean blob decodes
    rng = np.random.default_rng(5)
    positions = range(len(blob)) if len(blob) <= 2000 else rng.choice(len(blob), 600, replace=False)
    for pos in positions:
        for xor in (0x01, 0x80, 0xFF):
            bad = bytearray(blob)
            bad[pos] ^= xor
            with pytest.raises(CodecError):
                decode(bytes(bad))
    lengths = range(len(blob)) if len(blob) <= 2000 else rng.choice(len(blob), 600, replace=False)
    for n in lengths:
        with pytest.raises(CodecError):
            decode(blob[:n])
    for extra in (b"\0", b"garbage"):
        with pytest.raises(CodecError):
            decode(blob + extra)
    with pytest.raises(CodecError):
        decode("not bytes")  # type: ignore[arg-type]


def reseal(blob: bytes, fmt_offset: int, fmt: str, value) -> bytes:
    """Overwrite one header field and recompute the checksum, so only the lie is left."""
    body = bytearray(blob[:-4])
    struct.pack_into(fmt, body, fmt_offset, value)
    return bytes(body) + struct.pack("<I", zlib.crc32(body))


# top-k header: 0 magic, 4 version, 5 kind, 6 id_mode, 7 n_frames, 8 P, 12 k, 16 V, 20 U,
# 24..30 widths (top1, missing, tail, delta, gap, count, index), 31 step (0.01-nat units), 32 raw_len, 36 comp_len,
# 40 frame lengths
@pytest.mark.parametrize(
    "offset,fmt,lie,match",
    [
        (0, "<4s", lambda v: b"XXXX", "bad magic"),
        (4, "<B", lambda v: v + 1, "version"),
        (5, "<B", lambda v: 2, "kind"),
        (6, "<B", lambda v: 9, "id mode"),
        (7, "<B", lambda v: v + 1, "comp_len"),
        (8, "<I", lambda v: v + 1, "raw_len"),
        (8, "<I", lambda v: v - 1, "raw_len"),
        (8, "<I", lambda v: 1 << 21, "max_positions"),
        (12, "<I", lambda v: v + 1, "raw_len"),
        (12, "<I", lambda v: 5000, "max_k"),
        (12, "<I", lambda v: 0, "k=0"),
        (16, "<I", lambda v: 4999, "vocab_size"),
        (20, "<I", lambda v: v + 1, "raw_len|dictionary"),
        (20, "<I", lambda v: 1 << 30, "dictionary size"),
        (26, "<B", lambda v: v + 1, "raw_len"),
        (30, "<B", lambda v: 9, "width"),
        (31, "<B", lambda v: 0, "step of 0"),
        (32, "<I", lambda v: v + 1, "raw_len"),
        (32, "<I", lambda v: v - 1, "raw_len"),
        (36, "<I", lambda v: v + 1, "comp_len"),
        (36, "<I", lambda v: v - 1, "comp_len"),
        (40, "<I", lambda v: v + 1, "frame lengths"),
    ],
)
def test_topk_header_lies_raise_named_error(offset, fmt, lie, match):
    blob = small_topk_blob(P=40, k=8)
    value = lie(struct.unpack_from(fmt, blob, offset)[0])
    with pytest.raises(CodecError, match=match):
        decode_topk(reseal(blob, offset, fmt, value), vocab_size=5000)


def test_ids_out_of_vocab_are_rejected_even_with_valid_checksum():
    for V in (5000, 70000):  # plain ids, 2- and 3-byte planes
        ids, lp, tail = topk_of(realistic_logprobs(np.random.default_rng(6), 30, 5000), 8)
        ids[0, 0] = V - 1  # the largest id sits at the top of the vocabulary
        blob = encode_topk(ids, lp, tail, vocab_size=V)
        assert blob[6] == codec.ID_PLAIN
        with pytest.raises(CodecError, match="outside vocab_size"):
            decode_topk(reseal(blob, 16, "<I", V - 1), vocab_size=V - 1)
    for P, mode in ((64, codec.ID_DICT), (128, codec.ID_DICT_BY_COUNT)):  # the dictionary's last entry
        ids, lp, tail = zipf_topk(P)
        blob = encode_topk(ids, lp, tail, vocab_size=70000)
        assert blob[6] == mode
        top = int(ids.max())
        decode_topk(reseal(blob, 16, "<I", top + 1), vocab_size=top + 1)
        with pytest.raises(CodecError, match="outside vocab_size"):
            decode_topk(reseal(blob, 16, "<I", top), vocab_size=top)
    blob = small_sampled_blob()
    top = int(decode_sampled(blob, vocab_size=5000)[1].max())
    with pytest.raises(CodecError, match="outside vocab_size"):
        decode_sampled(reseal(blob, 16, "<I", top), vocab_size=top)


def test_sampled_header_lies():
    blob = small_sampled_blob()
    # sampled header: 8 P, 12 N, 16 V, 20 U, 24 num_draws, 28..35 widths, 36 raw_len, 40 comp_len
    for offset, value, match in [
        (24, 49, "exceed num_draws"),
        (24, 0, "num_draws"),
        (8, 25, "raw_len|impossible|row lengths"),
        (12, 1 << 25, "max_entries"),
        (12, 5, "impossible"),
        (36, 7, "raw_len"),
    ]:
        with pytest.raises(CodecError, match=match):
            decode_sampled(reseal(blob, offset, "<I", value), vocab_size=5000)
    with pytest.raises(CodecError, match="max_positions"):
        decode_sampled(blob, vocab_size=5000, max_positions=10)
    with pytest.raises(CodecError, match="kind"):
        decode_topk(blob, vocab_size=5000)
    with pytest.raises(CodecError, match="kind"):
        decode_sampled(small_topk_blob(), vocab_size=5000)


def test_decompression_bomb_rejected_before_decompressing():
    """A frame whose own header declares 1 TiB of output, sealed with a valid checksum."""
    blob = small_topk_blob(P=40, k=8)
    n_frames = blob[7]
    start = 40 + 4 * n_frames
    # zstd frame: magic, descriptor (single segment, 8-byte content size), size, one RLE block
    bomb = b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + struct.pack("<Q", 1 << 40) + b"\x03\x00\x00\x00"
    body = bytearray(blob[:start]) + bomb
    struct.pack_into("<B", body, 7, 1)
    struct.pack_into("<I", body, 36, len(bomb))
    body = body[:40] + struct.pack("<I", len(bomb)) + bomb
    sealed = bytes(body) + struct.pack("<I", zlib.crc32(body))
    with pytest.raises(CodecError, match="declares"):
        decode_topk(sealed, vocab_size=5000)
    with pytest.raises(CodecError, match="max_entries"):
        decode_topk(reseal(reseal(blob, 8, "<I", 1 << 20), 12, "<I", 4096), vocab_size=5000)


def test_limits_are_enforced():
    blob = small_topk_blob(P=24, k=8)
    with pytest.raises(CodecError, match="max_positions"):
        decode_topk(blob, vocab_size=5000, max_positions=23)
    with pytest.raises(CodecError, match="max_k"):
        decode_topk(blob, vocab_size=5000, max_k=7)
    with pytest.raises(CodecError, match="vocab_size"):
        decode_topk(blob, vocab_size=4999)
    with pytest.raises(CodecError, match="max_entries"):
        decode_topk(blob, vocab_size=5000, max_entries=24 * 8 - 1)
    ids, _, _ = decode_topk(blob, vocab_size=5000, max_positions=24, max_k=8, max_entries=24 * 8)
    assert ids.shape == (24, 8)
    sampled = small_sampled_blob()
    N = len(decode_sampled(sampled, vocab_size=5000)[1])
    with pytest.raises(CodecError, match="max_entries"):
        decode_sampled(sampled, vocab_size=5000, max_entries=N - 1)
    assert len(decode_sampled(sampled, vocab_size=5000, max_positions=24, max_entries=N)[1]) == N


def test_documented_error_bounds_hold_and_are_tight():
    """topk_error_bound() is what a decode really does: on a dense sweep of gaps below the top-1
    the worst error reaches (within 2 %) and never passes the documented bound, in the fine
    region (>= 10 nats: 0.02) and past it (0.16)."""
    assert codec.CODEC_VERSION == 3 and codec.READ_VERSIONS == (1, 2, 3)
    gaps = np.arange(0.0, 30.0, 0.0013)  # [n] nats below the top-1
    k = 16
    n = len(gaps) // (k - 1) * (k - 1)
    rows = -np.sort(gaps[:n].reshape(-1, k - 1), axis=1)  # [P, k-1] descending
    lps = np.concatenate([np.full((len(rows), 1), -0.3), rows - 0.3], axis=1).astype(np.float32)  # [P, k]
    ids = np.tile(np.arange(k), (len(lps), 1))
    _, got, _ = codec.decode_topk(
        codec.encode_topk(ids, lps, np.full(len(lps), -1.0, np.float32), vocab_size=k), vocab_size=k
    )
    err = np.abs(got.astype(np.float64) - lps)  # [P, k]
    gap = lps[:, :1] - lps  # [P, k]
    fine = gap <= BOUND["fine_region_nats"] - 0.05
    coarse = gap > BOUND["fine_region_nats"] + 0.05
    for sel, bound in ((fine, "logprob_abs_err_within_10_nats"), (coarse, "logprob_abs_err_below_fine_region")):
        assert BOUND[bound] * 0.98 <= err[sel].max() <= BOUND[bound] + 1e-5, (bound, err[sel].max())
    assert BOUND["logprob_abs_err_within_10_nats"] == pytest.approx(0.02) and BOUND["fine_region_nats"] >= 10.0


# ----------------------------------------------------------------------------- versions and id modes

OLD = Path(__file__).resolve().parents[1] / "data"  # codec_vN: blobs written by the version N encoder


@pytest.mark.parametrize("version", [1, 2])
def test_old_version_blobs_still_decode(version):
    """Caches written by older encoders stay readable: blobs from the version 1 and 2 encoders
    (this file's small_topk_blob() and small_sampled_blob(P=24 (v1) / 60 (v2, id mode 3)) at
    those commits) decode to what they did then; their step byte (padding then) must be 0."""
    old = OLD / f"codec_v{version}"
    want = np.load(old / "expected.npz")
    topk, sampled = (old / "topk.bin").read_bytes(), (old / "sampled.bin").read_bytes()
    assert topk[4] == sampled[4] == version and topk[31] == 0
    for got, key in zip(decode_topk(topk, vocab_size=5000), ("topk_ids", "topk_logprobs", "topk_tail"), strict=True):
        np.testing.assert_array_equal(got, want[key])
    offsets, ids, counts, n = decode_sampled(sampled, vocab_size=5000)
    np.testing.assert_array_equal(offsets, want["s_offsets"])
    np.testing.assert_array_equal(ids, want["s_ids"])
    np.testing.assert_array_equal(counts, want["s_counts"])
    assert n == int(want["s_num_draws"])
    with pytest.raises(CodecError, match="codec version 4"):
        decode_topk(reseal(topk, 4, "<B", 4), vocab_size=5000)
    with pytest.raises(CodecError, match=f"step byte 4 in a version {version} blob"):
        decode_topk(reseal(topk, 31, "<B", 4), vocab_size=5000)


def rebuild(blob: bytes, header: struct.Struct, mutate) -> bytes:
    """The blob with its decompressed payload changed by mutate(uint8 array) and everything
    around it (frames, lengths, checksum) made consistent again: only the payload lies."""
    fields, frames = codec._open(blob, header, blob[5])
    raw = codec._decompress(frames, fields[-2]).copy()
    mutate(raw)
    new = codec._compress([raw.tobytes()], codec.ZSTD_LEVEL)
    head = header.pack(*fields[:4], len(new), *fields[5:-1], sum(map(len, new)))
    return codec._finish(head, new)


def test_sampled_blocks_gap_code_ids_within_a_position():
    """Id mode 3: sampled ids are ascending within a position, so their dictionary indexes are
    stored as gaps inside each row. Realistic data picks it; it round-trips; a gap that points
    past the dictionary, mode 3 in a version 1 blob or in a top-k blob are refused."""
    blob = small_sampled_blob(P=60)
    assert blob[4] == codec.CODEC_VERSION and blob[6] == codec.ID_DICT_ROW_GAPS
    offsets, ids, counts, _ = decode_sampled(blob, vocab_size=5000)
    rng = np.random.default_rng(4)
    want = sample_counts(rng, realistic_logprobs(rng, 60, 5000), 50)
    for got, w in zip((offsets, ids, counts), want, strict=True):
        np.testing.assert_array_equal(got, w)

    def stretch_last_gap(raw: np.ndarray) -> None:  # the last byte is the top plane of the last index
        raw[-1] = 0xFF

    with pytest.raises(CodecError, match="outside dictionary"):
        decode_sampled(rebuild(blob, codec._SAMPLED_HEADER, stretch_last_gap), vocab_size=5000)
    with pytest.raises(CodecError, match="needs codec version 2"):
        decode_sampled(reseal(blob, 4, "<B", 1), vocab_size=5000)
    with pytest.raises(CodecError, match="id mode 3"):
        decode_topk(reseal(small_topk_blob(), 6, "<B", codec.ID_DICT_ROW_GAPS), vocab_size=5000)


def forge(blob: bytes, header: struct.Struct, edit, keep_raw_len: bool = False) -> bytes:
    """The blob with its header fields and payload rewritten by edit(fields: list, raw: uint8
    array) -> raw, then frames, comp_len, raw_len (unless keep_raw_len) and checksum made
    consistent again: only the edit lies."""
    fields, frames = codec._open(blob, header, blob[5])
    fields = list(fields)
    raw = np.asarray(edit(fields, codec._decompress(frames, fields[-2]).copy()), np.uint8)
    new = codec._compress([raw.tobytes()], codec.ZSTD_LEVEL)
    fields[4], fields[-1] = len(new), sum(map(len, new))
    if not keep_raw_len:
        fields[-2] = raw.size
    return codec._finish(header.pack(*fields), new)


def streams_at(fields: list) -> dict[str, tuple[int, int, int]]:
    """Where each payload stream of a blob with these header fields lies: name -> (first byte,
    values n, width nb), in format order (docs/CODEC.md)."""
    P, U = fields[5], fields[8]
    if fields[2] == codec.KIND_TOPK:
        k = fields[6]
        nb_a, nb_m, nb_t, nb_d, nb_gap, nb_cnt, nb_idx = fields[9:16]
        spec = [("top1", P, nb_a), ("missing", P, nb_m), ("tail", P, nb_t), ("delta", P * (k - 1), nb_d)]
        spec += [("gap", U, nb_gap), ("count", U, nb_cnt), ("index", P * k, nb_idx)]
    else:
        N = fields[6]
        nb_len, nb_cnt, nb_gap, nb_dc, nb_idx = fields[10:15]
        spec = [
            ("len", P, nb_len),
            ("cnt", N - P, nb_cnt),
            ("gap", U, nb_gap),
            ("count", U, nb_dc),
            ("index", N, nb_idx),
        ]
    out, pos = {}, 0
    for name, n, nb in spec:
        out[name] = (pos, n, nb)
        pos += n * nb
    return out


def put(fields: list, raw: np.ndarray, stream: str, i: int, value: int) -> np.ndarray:
    """Set value i of a plane-coded payload stream (it must fit the stream's width)."""
    start, n, nb = streams_at(fields)[stream]
    assert 0 <= value < 1 << 8 * nb and i < n, (stream, value, nb)
    for b in range(nb):
        raw[start + b * n + i] = (value >> 8 * b) & 0xFF
    return raw


def widen_index(fields: list, raw: np.ndarray) -> np.ndarray:
    """Plain ids stored 8 bytes wide, the first with its top bit set (a negative int64)."""
    start, n, nb = streams_at(fields)["index"]
    planes = np.zeros((8, n), np.uint8)
    planes[:nb] = raw[start : start + n * nb].reshape(nb, n)
    planes[7, 0] = 0x80
    fields[TOPK_NB_INDEX] = 8
    return np.concatenate([raw[:start], planes.reshape(-1)])


@functools.cache
def lie_blobs() -> dict[str, bytes]:
    """Small blobs whose payload the lies below edit: plain (mode 0), dictionary (modes 1 and 2),
    a block near the log-prob floor (3-byte codes, -inf entries), k = V, and sampled."""
    lp = np.array([[-9000.0, -9000.0], [-0.5, -np.inf]], np.float32)
    floor = encode_topk(np.array([[0, 1], [2, 3]]), lp, np.array([-9500.0, -np.inf], np.float32), vocab_size=10)
    full = np.array([[3, 0, 7, 1, 6, 2, 5, 4]])
    return {
        "plain": small_topk_blob(),
        "dict": encode_topk(*zipf_topk(64), vocab_size=70000),
        "by_count": encode_topk(*zipf_topk(128), vocab_size=70000),
        "floor": floor,
        "k_is_V": encode_topk(
            full, -np.arange(8, dtype=np.float32)[None], np.full(1, -np.inf, np.float32), vocab_size=8
        ),
        "sampled": small_sampled_blob(),
        "one_draw_count": encode_sampled(
            np.array([0, 1]), np.array([5]), np.array([2**31 - 1]), vocab_size=10, num_draws=2**31 - 1
        ),
    }


def first_pair(fields: list, raw: np.ndarray) -> np.ndarray:
    """Sampled plain ids: give a position's second entry the id of its first."""
    start, n, nb = streams_at(fields)["index"]
    ids = codec._from_planes(raw[start : start + n * nb], n, nb)
    offsets = decode_sampled(lie_blobs()["sampled"], vocab_size=5000)[0]
    p = int(np.flatnonzero(np.diff(offsets) >= 2)[0])
    return put(fields, raw, "index", int(offsets[p]) + 1, int(ids[offsets[p]]))


LIMIT = (1 << 20) // 4  # the largest code a blob at the default step may hold (docs/CODEC.md)
# header field indexes as header.unpack gives them (see the offsets above test_topk_header_lies_...)
MODE, VOCAB, NUM_DRAWS, TOPK_NB_INDEX, SAMPLED_PAD = 3, 7, 9, 15, 15


def field(i: int, value: int):
    """An edit that sets header field i."""

    def edit(fields: list, raw: np.ndarray) -> np.ndarray:
        fields[i] = value
        return raw

    return edit


def entry(stream: str, i: int, value):
    """An edit that sets value i of a payload stream; value may be a function of the fields."""
    return lambda fields, raw: put(fields, raw, stream, i, value(fields) if callable(value) else value)


def chain(*edits):
    def edit(fields: list, raw: np.ndarray) -> np.ndarray:
        for e in edits:
            raw = e(fields, raw)
        return raw

    return edit


U = operator.itemgetter(8)  # the dictionary size field

# name, blob, vocab_size to decode with, edit, keep_raw_len, error
PAYLOAD_LIES = [
    ("short payload", "plain", 5000, lambda f, r: r[:-1], True, "raw_len"),
    ("index width 8", "plain", 5000, widen_index, False, "width"),
    ("dictionary gap 0", "dict", 70000, entry("gap", 1, 0), False, "strictly increasing"),
    ("dictionary gap 0, by count", "by_count", 70000, entry("gap", 1, 0), False, "strictly increasing"),
    ("index = U", "dict", 70000, entry("index", 5, U), False, "outside dictionary"),
    ("index = U, by count", "by_count", 70000, entry("index", 5, U), False, "outside dictionary"),
    ("count width in mode 1", "by_count", 70000, field(MODE, codec.ID_DICT), False, "count width"),
    ("k > V", "k_is_V", 7, chain(field(VOCAB, 7), entry("index", 2, 3)), False, "exceeds vocab_size"),
    ("missing = k + 1", "floor", 10, entry("missing", 1, 3), False, "-inf entries"),
    ("top-1 code past the limit", "floor", 10, entry("top1", 0, LIMIT + 1), False, "beyond limit"),
    ("tail code past the limit", "floor", 10, entry("tail", 0, LIMIT + 2), False, "tail code"),
    ("sampled duplicate id", "sampled", 5000, first_pair, False, "strictly ascending"),
    ("sampled padding", "sampled", 5000, field(SAMPLED_PAD, 1), False, "width"),
    ("num_draws = 2**31", "one_draw_count", 10, field(NUM_DRAWS, 2**31), False, "num_draws"),
]


@pytest.mark.parametrize("name,blob,V,edit,keep_raw_len,match", PAYLOAD_LIES, ids=[c[0] for c in PAYLOAD_LIES])
def test_each_documented_content_check_refuses_its_lie(name, blob, V, edit, keep_raw_len, match):
    """One lie per check of docs/CODEC.md "Validation", at the edge of what is allowed, with
    frames and checksum made valid: each is refused by name, not decoded into wrong data
    (duplicate or negative ids, a count that wraps int32, codes past the floor) or another error."""
    clean = lie_blobs()[blob]
    header = codec._TOPK_HEADER if clean[5] == codec.KIND_TOPK else codec._SAMPLED_HEADER
    decode = decode_topk if clean[5] == codec.KIND_TOPK else decode_sampled
    decode(clean, vocab_size=header.unpack_from(clean)[VOCAB])  # the edit, not the blob, is what is refused
    with pytest.raises(CodecError, match=match):
        decode(forge(clean, header, edit, keep_raw_len), vocab_size=V)


def test_codes_at_the_limit_still_decode():
    """The limit itself is allowed: a top-1 code of 2**20 // s and a tail code one above it (the
    tail's code 0 means -inf) decode to -LIMIT * step."""

    at_limit = chain(entry("top1", 0, LIMIT), entry("tail", 0, LIMIT + 1))
    _, lp, tail = decode_topk(forge(lie_blobs()["floor"], codec._TOPK_HEADER, at_limit), vocab_size=10)
    assert lp[0, 0] == lp[0, 1] == tail[0] == np.float32(-LIMIT * codec.STEP)


_DECODERS = functools.cache(decoders)  # the blobs are built once for the property test below


def _check_decoded_topk(out, V: int) -> None:
    ids, lp, tail = out
    assert ids.shape == lp.shape and ids.dtype == np.int64 and lp.dtype == np.float32
    assert ((ids >= 0) & (ids < V)).all() and not np.isnan(lp).any() and (lp <= 0).all()
    assert (lp[:, 1:] <= lp[:, :-1]).all() and not np.isnan(tail).any() and (tail <= 0).all()


def _check_decoded_sampled(out, V: int) -> None:
    offsets, ids, counts, n = out
    assert offsets[0] == 0 and offsets[-1] == len(ids) == len(counts) and (np.diff(offsets) >= 1).all()
    assert ((ids >= 0) & (ids < V)).all() and (counts >= 1).all()
    np.testing.assert_array_equal(np.add.reduceat(counts, offsets[:-1]) if len(ids) else [], n)


@HYP
@given(st.sampled_from(range(4)), st.data())
def test_payload_lies_with_a_valid_checksum_raise_or_decode_in_range(which, data):
    """A foreign blob can carry a valid CRC (it is a checksum, not a signature): whatever its
    payload says, decoding raises CodecError or returns values inside every documented range
    (ids < V, log-probs <= 0 and descending, counts >= 1 summing to num_draws); never another
    exception, never out-of-range data."""
    name, blob, decode = _DECODERS()[which]
    header = codec._TOPK_HEADER if name.startswith("topk") else codec._SAMPLED_HEADER
    n_raw = struct.unpack_from("<I", blob, header.size - 8)[0]
    edits = data.draw(st.lists(st.tuples(st.integers(0, n_raw - 1), st.integers(0, 255)), min_size=1, max_size=8))

    def mutate(raw: np.ndarray) -> None:
        for pos, value in edits:
            raw[pos] = value

    try:
        out = decode(rebuild(blob, header, mutate))
    except CodecError:
        return
    (_check_decoded_topk if name.startswith("topk") else _check_decoded_sampled)(out, 5000)


@HYP
@given(st.sampled_from(range(4)), st.data())
def test_header_lies_with_a_valid_checksum_raise_or_decode_in_range(which, data):
    """The same for the header: any field (sizes, widths, mode, step, raw_len) set to any value,
    alone or with others, the checksum made valid again."""
    name, blob, decode = _DECODERS()[which]
    header = codec._TOPK_HEADER if name.startswith("topk") else codec._SAMPLED_HEADER
    fields = list(header.unpack_from(blob))
    codes = [c for n, c in re.findall(r"(\d*)([sBI])", header.format) for _ in range(1 if c == "s" else int(n or 1))]
    n_frames = fields[4]
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(1, len(fields) - 1))
        if i == 4:
            continue  # n_frames moves the frame table: covered by the flipped-byte test
        big = (1 << 8 * struct.calcsize(codes[i])) - 1
        near = st.integers(max(0, fields[i] - 2), min(big, fields[i] + 2))  # off by a little
        fields[i] = data.draw(st.one_of(st.integers(0, 64), near, st.integers(0, big)))
    body = header.pack(*fields) + blob[header.size : len(blob) - 4]
    assert fields[4] == n_frames
    try:
        out = decode(body + struct.pack("<I", zlib.crc32(body)))
    except CodecError:
        return
    (_check_decoded_topk if name.startswith("topk") else _check_decoded_sampled)(out, 5000)


@pytest.mark.parametrize("vocab_size", ["10", 10.0, None, True])
def test_decoders_refuse_a_vocab_size_that_is_not_an_int(vocab_size) -> None:
    """decode_topk(vocab_size="10") said "blob vocab_size 10 != expected 10" (a CodecError, as if
    the blob were wrong); the encoders already refused such arguments."""
    ids, lps = np.array([[1, 2]]), np.array([[-0.1, -3.0]], dtype=np.float32)
    topk = codec.encode_topk(ids, lps, np.array([-5.0], dtype=np.float32), vocab_size=10)
    sampled = codec.encode_sampled(np.array([0, 1]), np.array([3]), np.array([4]), vocab_size=10, num_draws=4)
    for decode, blob in ((codec.decode_topk, topk), (codec.decode_sampled, sampled)):
        with pytest.raises(ValueError, match="vocab_size must be an int") as e:
            decode(blob, vocab_size=vocab_size)
        assert not isinstance(e.value, codec.CodecError)
