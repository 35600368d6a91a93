"""Codec benchmark: bytes per target position, log-prob error and single-thread speed.

    python bench/bench_codec.py --out bench/results/codec.json              # synthetic
    python bench/bench_codec.py --logprobs teacher.npy --out ...             # real [P, V] log-probs
    python bench/bench_codec.py --gguf DIR/model.gguf --text a.txt --text b.txt --out ...

Top-k for k = 8..128 against the uint16 ids + fp16 log-probs + zstd-3 baseline, sampled
(Anshumann et al. 2025: N draws with replacement per position). Samples are cut into blocks of
--block positions, one codec call each, as the shard writer does per sample.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from teacher_cache import codec

KS = (8, 16, 32, 64, 128)


def synthetic_logprobs(P: int, V: int = 32000, seed: int = 0) -> np.ndarray:
    """Realistic-looking next-token log-probs float32 [P, V], calibrated against SmolLM2-135M
    on prose/code (top-1 prob quantiles 0.1/0.5/0.9 ~ 0.14/0.6/0.99, top1-top32 gap ~ 3.7/6.7/11
    nats, ~4k distinct top-32 ids per 512 positions): a Zipf-like prior over ids (low BPE ids
    are frequent), Gumbel noise, a per-document topic set and a few boosted candidates per
    position whose boost sets the peakiness."""
    rng = np.random.default_rng(seed)
    prior = -1.2 * np.log1p(np.arange(V) / 200.0)  # [V]
    w = np.exp(prior) / np.exp(prior).sum()
    out = np.empty((P, V), np.float32)
    for lo in range(0, P, 512):  # one "document" per 512 positions
        n = min(512, P - lo)
        topic = rng.choice(V, 400, replace=False, p=w)
        logits = prior + rng.gumbel(size=(n, V))  # [n, V]
        logits[:, topic] += 2.5
        for j in range(4):
            cand = np.where(rng.random(n) < 0.5, rng.choice(topic, n), rng.choice(V, n, p=w))
            logits[np.arange(n), cand] += rng.uniform(1.0, 17.0, n) * 0.75**j
        logits -= logits.max(1, keepdims=True)
        out[lo : lo + n] = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return out


def teacher_logprobs(gguf: str, texts: list[str], max_tokens: int = 512) -> np.ndarray:
    """Real next-token log-probs float32 [P, V] from a GGUF causal LM (e.g. SmolLM2-135M) on CPU."""
    import torch  # only here: the rest of the bench is numpy
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(gguf)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    out = []
    with torch.no_grad():
        for t in texts:
            ids = tok(t, return_tensors="pt").input_ids[:, :max_tokens]  # [1, T]
            out.append(torch.log_softmax(model(ids).logits[0].float(), -1).numpy())  # [T, V]
    return np.concatenate(out).astype(np.float32)


def load_distributions(
    logprobs: np.ndarray, *, ks=KS, block: int = 512, num_draws: int = 50, seed: int = 0
) -> list[dict]:
    """Full log-probs float32 [P, V] -> blocks of up to `block` positions, each with the top-k
    targets for every k (ids int64 [p, k], logprobs float32 [p, k], tail float32 [p]) and
    sampled targets (offsets int64 [p+1], ids int64 [n], counts int64 [n]) with num_draws draws."""
    P, V = logprobs.shape
    rng = np.random.default_rng(seed)
    blocks = []
    for lo in range(0, P, block):
        lp = logprobs[lo : lo + block].astype(np.float64)  # [p, V]
        lp -= np.log(np.exp(lp).sum(1, keepdims=True))  # renormalise in fp64
        order = np.argsort(-lp, axis=1, kind="stable")[:, : max(ks)]  # [p, kmax]
        top = np.take_along_axis(lp, order, 1)  # [p, kmax] fp64
        b = {"V": V, "P": len(lp), "topk": {}}
        for k in ks:
            rest = 1.0 - np.exp(top[:, :k]).sum(1)  # [p]
            with np.errstate(divide="ignore"):
                tail = np.where(rest > 1e-30, np.log(np.maximum(rest, 1e-30)), -np.inf)
            b["topk"][k] = (order[:, :k], top[:, :k].astype(np.float32), tail.astype(np.float32))
        cdf = np.cumsum(np.exp(lp), axis=1)  # [p, V]
        draws = np.stack([np.searchsorted(c, u) for c, u in zip(cdf, rng.random((len(lp), num_draws)), strict=True)])
        draws = np.sort(np.minimum(draws, V - 1), axis=1)  # [p, num_draws]
        new = np.ones_like(draws, bool)
        new[:, 1:] = draws[:, 1:] != draws[:, :-1]
        starts = np.flatnonzero(new.reshape(-1))  # [n]
        counts = np.diff(np.r_[starts, draws.size])  # [n]
        offsets = np.r_[0, np.cumsum(new.sum(1))]  # [p+1]
        b["sampled"] = (offsets, draws.reshape(-1)[starts], counts, num_draws)
        blocks.append(b)
    return blocks


def _best_time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def baseline_bytes(ids: np.ndarray, lp: np.ndarray, tail: np.ndarray, V: int) -> int:
    """uint16 ids (uint32 past 65536) + fp16 log-probs + fp16 tail, one zstd-3 frame."""
    dt = np.uint16 if V <= 1 << 16 else np.uint32
    raw = ids.astype(dt).tobytes() + lp.astype(np.float16).tobytes() + tail.astype(np.float16).tobytes()
    return len(zstandard.ZstdCompressor(level=3).compress(raw))


def bench_topk(blocks: list[dict], k: int, level: int, repeat: int) -> dict:
    n = size = base = 0
    err10 = err_all = 0.0
    t_enc = t_dec = 0.0
    for b in blocks:
        ids, lp, tail = b["topk"][k]
        V = b["V"]
        enc = partial(codec.encode_topk, ids, lp, tail, vocab_size=V, level=level)
        blob = enc()
        t_enc += _best_time(enc, 1)
        t_dec += _best_time(partial(codec.decode_topk, blob, vocab_size=V), repeat)
        ids2, lp2, _ = codec.decode_topk(blob, vocab_size=V)
        assert (ids2 == ids).all()
        fin = np.isfinite(lp)
        d = np.abs(lp2.astype(np.float64) - lp)
        near = fin & (lp >= lp[:, :1] - 10)
        err10 = max(err10, float(d[near].max(initial=0)))
        err_all = max(err_all, float(d[fin].max(initial=0)))
        n += b["P"]
        size += len(blob)
        base += baseline_bytes(ids, lp, tail, V)
    return {
        "k": k,
        "bytes_per_pos": size / n,
        "baseline_bytes_per_pos": base / n,
        "max_abs_err_within_10_nats": err10,
        "max_abs_err_all_finite": err_all,
        "encode_pos_per_s": n / t_enc,
        "decode_pos_per_s": n / t_dec,
    }


def bench_sampled(blocks: list[dict], level: int, repeat: int) -> dict:
    n = size = distinct = 0
    t_enc = t_dec = 0.0
    for b in blocks:
        offsets, ids, counts, draws = b["sampled"]
        V = b["V"]
        enc = partial(codec.encode_sampled, offsets, ids, counts, vocab_size=V, num_draws=draws, level=level)
        blob = enc()
        t_enc += _best_time(enc, 1)
        t_dec += _best_time(partial(codec.decode_sampled, blob, vocab_size=V), repeat)
        o2, i2, c2, _ = codec.decode_sampled(blob, vocab_size=V)
        assert (o2 == offsets).all() and (i2 == ids).all() and (c2 == counts).all()
        n += b["P"]
        size += len(blob)
        distinct += len(ids)
    return {
        "num_draws": draws,
        "distinct_per_pos": distinct / n,
        "bytes_per_pos": size / n,
        "encode_pos_per_s": n / t_enc,
        "decode_pos_per_s": n / t_dec,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/results/codec.json"))
    ap.add_argument("--logprobs", type=Path, help=".npy of real log-probs float [P, V]")
    ap.add_argument("--gguf", help="GGUF causal LM to compute real log-probs with (needs torch)")
    ap.add_argument("--text", action="append", default=[], help="text file for --gguf (repeat)")
    ap.add_argument("--positions", type=int, default=2048, help="synthetic positions")
    ap.add_argument("--vocab", type=int, default=32000, help="synthetic vocab size")
    ap.add_argument("--block", type=int, default=512, help="positions per codec call")
    ap.add_argument("--num-draws", type=int, default=50)
    ap.add_argument("--level", type=int, default=codec.ZSTD_LEVEL)
    ap.add_argument("--repeat", type=int, default=5, help="decode timing: best of N")
    args = ap.parse_args()

    if args.logprobs:
        source, logprobs = f"real: {args.logprobs}", np.load(args.logprobs)
    elif args.gguf:
        texts = [Path(t).read_text() for t in args.text]
        source, logprobs = f"real: {args.gguf} on {len(texts)} texts", teacher_logprobs(args.gguf, texts)
    else:
        source = "SYNTHETIC (bench_codec.synthetic_logprobs, seed 0), not a real teacher"
        logprobs = synthetic_logprobs(args.positions, args.vocab)
    P, V = logprobs.shape
    blocks = load_distributions(logprobs, block=args.block, num_draws=args.num_draws)
    del logprobs
    topk = [bench_topk(blocks, k, args.level, args.repeat) for k in KS]
    sampled = bench_sampled(blocks, args.level, args.repeat)

    print(f"source: {source}; P={P} V={V} block={args.block} zstd level={args.level}")
    cols = ("B/pos", "base B/pos", "err<=10nat", "err all", "enc pos/s", "dec pos/s")
    print(f"{'k':>5} " + " ".join(f"{c:>{w}}" for c, w in zip(cols, (8, 10, 10, 8, 11, 11), strict=True)))
    for r in topk:
        print(
            f"{r['k']:>5} {r['bytes_per_pos']:>8.2f} {r['baseline_bytes_per_pos']:>10.2f} "
            f"{r['max_abs_err_within_10_nats']:>10.4f} {r['max_abs_err_all_finite']:>8.4f} "
            f"{r['encode_pos_per_s']:>11,.0f} {r['decode_pos_per_s']:>11,.0f}"
        )
    s = sampled
    print(
        f"sampled N={s['num_draws']}: {s['distinct_per_pos']:.2f} distinct/pos, "
        f"{s['bytes_per_pos']:.2f} B/pos, enc {s['encode_pos_per_s']:,.0f} pos/s, "
        f"dec {s['decode_pos_per_s']:,.0f} pos/s"
    )
    result = {
        "source": source,
        "positions": P,
        "vocab_size": V,
        "block_positions": args.block,
        "zstd_level": args.level,
        "codec_version": codec.CODEC_VERSION,
        "error_bound": codec.topk_error_bound(),
        "topk": topk,
        "sampled": sampled,
        "machine": {
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "numpy": np.__version__,
            "zstandard": zstandard.__version__,
            "threads": 1,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
