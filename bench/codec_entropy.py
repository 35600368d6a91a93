"""Lower bounds for the top-k codec on real distributions: what order-0 coders can reach.

    python bench/codec_entropy.py [--k 32] [--samples N]

On the arrays of bench_codec_data.py (SmolLM2-135M over the bundled chats) it prints, in bytes
per target position: the empirical order-0 entropy of the ids under one frequency table per
block plus the cost of naming the block's distinct ids (log2 C(V, U)), for one block per sample
and for larger blocks; the same under one global table (its own cost ignored); the entropy of
the quantised log-prob deltas per rank group; and how often the true next token is in the
top-k and what naming it by rank instead of id would save (the reader knows it). docs/CODEC.md quotes these.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_codec_data import compute, topk_prefix

from teacher_cache import codec


def entropy_bits(x: np.ndarray) -> float:
    """Total order-0 empirical entropy of the symbols x, in bits."""
    _, c = np.unique(x, return_counts=True)
    return float(-(c * np.log2(c / c.sum())).sum())


def log2_choose(n: int, r: int) -> float:
    return (math.lgamma(n + 1) - math.lgamma(r + 1) - math.lgamma(n - r + 1)) / math.log(2)


def id_bound(ids: np.ndarray, bounds: np.ndarray, V: int) -> tuple[float, float]:
    """ids [P, k], block bounds [B+1] -> (order-0 index bits, dictionary bits), summed."""
    idx = dic = 0.0
    for lo, hi in itertools.pairwise(bounds):
        x = ids[lo:hi].reshape(-1)
        idx += entropy_bits(x)
        dic += log2_choose(V, len(np.unique(x)))
    return idx, dic


def id_bytes(ids: np.ndarray, extra: list[bytes]) -> int:
    """Bytes of the codec's id streams (dictionary + indexes, zstd) for ids int64 [n], plus extra streams."""
    *_, chunks = codec._encode_ids(ids, codec.ZSTD_LEVEL)
    return sum(map(len, codec._compress([*chunks, *extra], codec.ZSTD_LEVEL)))


def next_token_hint(ids: np.ndarray, hit: np.ndarray, starts: np.ndarray) -> float:
    """B/pos saved if, per sample, each row's id equal to the true next token (hit bool [P, k])
    were dropped and its rank (k when absent) stored as one extra byte stream."""
    saved = 0
    for lo, hi in itertools.pairwise(starts):
        x, h = ids[lo:hi], hit[lo:hi]
        rank = np.where(h.any(1), h.argmax(1), x.shape[1]).astype(np.uint8)  # [p]
        saved += id_bytes(x.reshape(-1), []) - id_bytes(x[~h], [rank.tobytes()])
    return saved / len(ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--samples", type=int, default=None)
    args = ap.parse_args()
    d = compute(args.samples)
    ids, lps, _ = topk_prefix(d["ids"], d["lps"], d["tail"], args.k)
    P, V, k = len(ids), int(d["vocab"]), args.k
    print(f"P={P} V={V} k={k}; bytes per target position:")
    layouts = {"per sample": d["starts"]} | {
        f"{b} positions": np.r_[np.arange(0, P, b), P] for b in (512, 4096) if b < P
    }
    for name, bounds in layouts.items():
        idx, dic = id_bound(ids, bounds, V)
        print(f"  ids, one table per block, {name:>15}: {idx / 8 / P:6.2f} + dictionary {dic / 8 / P:5.2f}")
    print(f"  ids, one global table (free):                 {entropy_bits(ids.reshape(-1)) / 8 / P:6.2f}")
    codes = np.rint(-lps.astype(np.float64) / codec.STEP)  # [P, k] fine-step codes, no coarse region
    codes = np.where(np.isfinite(codes), codes, codes[:, :1])
    deltas = np.diff(codes, axis=1)  # [P, k-1]
    per_rank = sum(entropy_bits(deltas[:, lo - 1 : hi - 1]) for lo, hi in codec._rank_groups(k))
    print(f"  log-prob deltas, one table per rank group:    {per_rank / 8 / P:6.2f}")
    print(f"  top-1 code:                                   {entropy_bits(codes[:, 0]) / 8 / P:6.2f}")
    if d.get("next") is not None:
        hit = ids == d["next"][:, None].astype(np.int64)
        print(
            f"next token is the top-1 at {hit[:, 0].mean():.1%} of positions, in the top-{k} at {hit.any(1).mean():.1%}"
        )
        saved = next_token_hint(ids, hit, d["starts"])
        print(f"naming it by its rank instead of storing its id saves {saved:.2f} B/pos (one block per sample)")


if __name__ == "__main__":
    main()
