"""Lower bounds for the top-k codec on real distributions: what order-0 coders can reach.

    python bench/codec_entropy.py [--k 32] [--samples N] [--data records.jsonl] [--out report.txt]

On the arrays of bench_codec_data.py (SmolLM2-135M over the bundled chats) it prints, in bytes
per target position: the empirical order-0 entropy of the ids under one frequency table per
block plus the cost of naming the block's distinct ids (log2 C(V, U)), for one block per sample
and for larger blocks; the same under one global table (its own cost ignored); the entropy of
the quantised log-prob deltas per rank group; and how often the true next token is in the
top-k and what naming it by rank instead of id would save (the reader knows it).

Then what context could buy: the code length of the ids under an adaptive PPM-C model (order-1
context with escapes to an adaptive order-0 model, then to a uniform choice among unseen ids)
run over the whole data as one stream (the most favourable case: state shared across samples,
so no per-sample random access), with no context, the input token x_t, the next token x_t+1 or
both as context, also per eighth of the stream (how the rate falls as the model learns); and
what naming each sample's distinct ids would cost under a free global prior, and the ids split
into each row's set plus its rank order (how predictable the order is). Last, the entropy
of the value deltas at coarser steps, to show what fidelity a 50 B/pos budget would leave, what
the order of ids inside ties of equal quantised codes costs, and what a cache-wide zstd
dictionary (trained on the first third of the samples) does to the rest; and for sampled
targets, each stream's zstd bytes against its order-0 entropy.
docs/CODEC.md quotes these figures.
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
from bench_codec_data import DATA, compute, input_tokens, topk_prefix

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


def previous_row_bits(ids: np.ndarray, starts: np.ndarray) -> tuple[float, float, float]:
    """ids [P, k] -> (share of entries whose id is in the previous row of their sample, bits
    order-0 per sample as now, bits when those are coded as a flag + their rank there instead),
    dictionary not counted: what the previous row as context could save."""
    k = ids.shape[1]
    share = now = then = 0.0
    for lo, hi in itertools.pairwise(starts):
        x = ids[lo:hi]  # [p, k]
        prev = np.vstack([np.full((1, k), -1), x[:-1]])  # [p, k], row 0 has none
        eq = x[:, :, None] == prev[:, None, :]  # [p, k, k]
        inside = eq.any(2)  # [p, k]
        rank = np.broadcast_to(np.arange(k), x.shape)  # [p, k] each entry's own rank
        flag = entropy_bits(rank * 2 + inside) - entropy_bits(rank)  # the flag given the rank
        ref = entropy_bits(rank[inside] * k + eq.argmax(2)[inside]) - entropy_bits(rank[inside])
        share += float(inside.sum())
        now += entropy_bits(x.reshape(-1))
        then += flag + ref + entropy_bits(x[~inside])
    return share / ids.size, now, then


def next_token_hint(ids: np.ndarray, hit: np.ndarray, starts: np.ndarray) -> float:
    """B/pos saved if, per sample, each row's id equal to the true next token (hit bool [P, k])
    were dropped and its rank (k when absent) stored as one extra byte stream."""
    saved = 0
    for lo, hi in itertools.pairwise(starts):
        x, h = ids[lo:hi], hit[lo:hi]
        rank = np.where(h.any(1), h.argmax(1), x.shape[1]).astype(np.uint8)  # [p]
        saved += id_bytes(x.reshape(-1), []) - id_bytes(x[~h], [rank.tobytes()])
    return saved / len(ids)


def ppm_bits(sym: np.ndarray, ctx: np.ndarray | None, V: int) -> np.ndarray:
    """Adaptive PPM-C code length in bits of each of the symbols sym int [n], coded in order,
    each in its context ctx int [n] (None: order-0 only) -> float64 [n]. Escape probability
    d / (n + d) at both orders (d distinct symbols seen, n total); an unseen symbol costs
    log2(V - d0) after both escapes."""
    seen: dict[int, int] = {}
    lg = math.log2
    cost = np.empty(len(sym))  # [n]
    tables: dict[int, list] = {}
    contexts = ctx.tolist() if ctx is not None else [None] * len(sym)
    for n0, (s, c) in enumerate(zip(sym.tolist(), contexts, strict=True)):
        coded, bits = False, 0.0
        if c is not None:
            tab = tables.setdefault(c, [{}, 0])
            counts, n = tab
            if n:
                d, v = len(counts), counts.get(s)
                coded = v is not None
                bits -= lg((v if coded else d) / (n + d))
            counts[s] = counts.get(s, 0) + 1
            tab[1] = n + 1
        if not coded:
            d, v = len(seen), seen.get(s)
            if v is not None:
                bits -= lg(v / (n0 + d))
            else:
                bits += (lg((n0 + d) / d) if n0 else 0.0) + lg(V - d)
        seen[s] = seen.get(s, 0) + 1
        cost[n0] = bits
    return cost


def prior_dictionary_bits(ids: np.ndarray, starts: np.ndarray, V: int) -> float:
    """Bits to name every sample's set of distinct ids given each id's (free, global) rate of
    appearing in a sample's set: sum over samples and ids of the binary entropy."""
    S = len(starts) - 1
    p = np.zeros(V)
    for lo, hi in itertools.pairwise(starts):
        p[np.unique(ids[lo:hi])] += 1 / S
    q = p[(p > 0) & (p < 1)]
    return float(S * -(q * np.log2(q) + (1 - q) * np.log2(1 - q)).sum())


def order_bits(key: np.ndarray) -> float:
    """Bits for the rank order of every row given a guess of it, key float [P, k] (smaller =
    guessed likelier): the Lehmer code of the true order relative to the guessed one (digit j =
    how many later-ranked ids the guess puts first), order-0 with one table per digit."""
    k = key.shape[1]
    digits = np.stack([(key[:, j + 1 :] < key[:, j : j + 1]).sum(1) for j in range(k)], 1)  # [P, k]
    return sum(entropy_bits(digits[:, j]) for j in range(k))


def set_and_order_bits(ids: np.ndarray, starts: np.ndarray, V: int) -> tuple[float, dict[str, float]]:
    """The ids of a row as a set plus the order of its ranks. Per sample, each row's ids become
    indexes into the sample's dictionary sorted by count (most frequent first). -> (bits for the
    sets: order-0 entropy of the gaps between a row's sorted indexes, one table per sample;
    {guess: bits for the orders (order_bits)} for guesses from the sample's counts and from free
    global statistics of each id over all the data: its count, mean rank and mean log-prob)."""
    set_bits, by_count = 0.0, []
    for lo, hi in itertools.pairwise(starts):
        _, inv, cnt = np.unique(ids[lo:hi], return_inverse=True, return_counts=True)
        order = np.empty(cnt.size, np.int64)
        order[np.argsort(-cnt, kind="stable")] = np.arange(cnt.size)
        r = order[inv.reshape(hi - lo, -1)]  # [p, k] count-order index, in rank order
        set_bits += entropy_bits(np.diff(np.sort(r, axis=1), axis=1, prepend=-1))
        by_count.append(r)
    P, k = ids.shape
    seen = np.maximum(np.bincount(ids.reshape(-1), minlength=V), 1)  # [V]
    mean_rank = np.bincount(ids.reshape(-1), np.tile(np.arange(k), P), minlength=V) / seen  # [V]
    guesses = {
        "count in the sample": np.concatenate(by_count).astype(np.float64),
        "global count": -seen[ids] + ids / V,  # ties by id
        "global mean rank": mean_rank[ids] + ids / V / k,
    }
    return set_bits, {name: order_bits(key) for name, key in guesses.items()}


def delta_bits(lps: np.ndarray, step: float) -> float:
    """Order-0 entropy (one table per rank group) of the log-prob deltas quantised at step nats."""
    codes = np.rint(-lps.astype(np.float64) / step)  # [P, k]
    codes = np.where(np.isfinite(codes), codes, codes[:, :1])
    deltas = np.diff(codes, axis=1)  # [P, k-1]
    return sum(entropy_bits(deltas[:, lo - 1 : hi - 1]) for lo, hi in codec._rank_groups(lps.shape[1]))


def tie_bits(lps: np.ndarray) -> float:
    """Bits spent on the order of ids inside groups of equal quantised codes within a row
    (sum of log2(g!) over tie groups): what storing each tie group in id order could save."""
    _, c, _ = codec._quantise_rows(lps, codec._Grid(codec.STEP_UNITS))  # [P, k] relative codes, non-decreasing per row
    starts = np.ones_like(c, bool)  # [P, k] True where a run of equal codes begins
    starts[:, 1:] = c[:, 1:] != c[:, :-1]
    runs = np.diff(np.r_[np.flatnonzero(starts.reshape(-1)), c.size])  # run lengths, row-major
    return float(sum(math.lgamma(g + 1) for g in runs[runs > 1]) / math.log(2))


def zstd_dictionary_bytes(ids, lps, tail, starts, V: int, train: int, size: int) -> tuple[float, float, int]:
    """Samples train.. coded as the codec codes them, each byte plane as one zstd frame at the
    codec's level, without and with a zstd dictionary of `size` bytes trained on the planes of
    samples 0..train-1 (as a cache-wide dictionary would be). -> (B/pos without, B/pos with
    (dictionary not counted), positions)."""
    import zstandard

    per_sample = []  # [S] the sample's byte planes as the codec hands them to zstd
    for lo, hi in itertools.pairwise(starts):
        *_, streams = codec._topk_streams(ids[lo:hi], lps[lo:hi], tail[lo:hi], codec.ZSTD_LEVEL)
        per_sample.append([ch for stream in streams.values() for ch in stream if ch])
    zd = zstandard.train_dictionary(size, [c for cs in per_sample[:train] for c in cs], level=codec.ZSTD_LEVEL)
    plain = zstandard.ZstdCompressor(level=codec.ZSTD_LEVEL, write_checksum=False)
    with_dict = zstandard.ZstdCompressor(level=codec.ZSTD_LEVEL, dict_data=zd, write_checksum=False)
    rest = per_sample[train:]
    n = int(starts[-1] - starts[train])
    a = sum(len(plain.compress(c)) for cs in rest for c in cs)
    b = sum(len(with_dict.compress(c)) for cs in rest for c in cs)
    return a / n, b / n, n


def sampled_stream_bytes(d: dict) -> tuple[int, dict[str, tuple[float, float]]]:
    """Sampled targets, one block per sample, streams as encode_sampled lays them out in id mode 3
    (row lengths, counts but each row's first, the dictionary's id gaps, the row-gapped dictionary
    indexes) -> (positions, name -> (bytes through the codec's zstd framing, order-0 bytes with one
    free table per sample)), summed over samples."""
    so, sid, sc, starts = d["s_offsets"], d["s_ids"].astype(np.int64), d["s_counts"].astype(np.int64), d["starts"]
    out = {name: [0.0, 0.0] for name in ("row lengths", "counts", "dictionary", "row-gapped indexes")}
    for lo, hi in itertools.pairwise(starts):
        off = so[lo : hi + 1] - so[lo]  # [P+1]
        ids, counts = sid[so[lo] : so[hi]], sc[so[lo] : so[hi]]  # [N], per row ids ascending
        first = np.zeros(len(ids), bool)
        first[off[:-1]] = True
        uniq, inv = np.unique(ids, return_inverse=True)
        streams = {
            "row lengths": np.diff(off) - 1,
            "counts": counts[~first] - 1,
            "dictionary": np.diff(uniq, prepend=0),
            "row-gapped indexes": np.where(first, inv, np.diff(inv, prepend=0) - 1),
        }
        for name, v in streams.items():
            out[name][0] += sum(map(len, codec._compress(codec._to_planes(v)[1], codec.ZSTD_LEVEL)))
            out[name][1] += entropy_bits(v) / 8 if v.size else 0.0
    return int(starts[-1]), {name: (a, b) for name, (a, b) in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--data", type=Path, default=DATA, help="records to run SmolLM2 on (default: bundled chats)")
    ap.add_argument("--out", type=Path, default=None, help="also write the report to this text file")
    args = ap.parse_args()
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    d = compute(args.samples, data=args.data)
    ids, lps, tail = topk_prefix(d["ids"], d["lps"], d["tail"], args.k)
    P, V, k = len(ids), int(d["vocab"]), args.k
    say(f"P={P} V={V} k={k}; bytes per target position:")
    layouts = {"per sample": d["starts"]} | {
        f"{b} positions": np.r_[np.arange(0, P, b), P] for b in (512, 4096) if b < P
    }
    for name, bounds in layouts.items():
        idx, dic = id_bound(ids, bounds, V)
        say(f"  ids, one table per block, {name:>15}: {idx / 8 / P:6.2f} + dictionary {dic / 8 / P:5.2f}")
    say(f"  ids, one global table (free):                 {entropy_bits(ids.reshape(-1)) / 8 / P:6.2f}")
    say(f"  log-prob deltas, one table per rank group:    {delta_bits(lps, codec.STEP) / 8 / P:6.2f}")
    top1 = np.rint(-np.maximum(lps[:, 0].astype(np.float64), codec.LOGPROB_FLOOR) / codec.STEP)  # [P]
    say(f"  top-1 code:                                   {entropy_bits(top1) / 8 / P:6.2f}")
    grid = codec._Grid(codec.STEP_UNITS)  # the default 0.04-nat step
    tail_sym = codec._tail_codes(tail, grid) * (k + 1) + (~np.isfinite(lps)).sum(1)  # [P] tail and -inf count
    say(f"  tail code and -inf count:                     {entropy_bits(tail_sym) / 8 / P:6.2f}")
    if d.get("next") is not None:
        hit = ids == d["next"][:, None].astype(np.int64)
        say(
            f"next token is the top-1 at {hit[:, 0].mean():.1%} of positions, in the top-{k} at {hit.any(1).mean():.1%}"
        )
        saved = next_token_hint(ids, hit, d["starts"])
        say(f"naming it by its rank instead of storing its id saves {saved:.2f} B/pos (one block per sample)")
    share, now, then = previous_row_bits(ids, d["starts"])
    say(
        f"{share:.1%} of the ids are in the previous row; coding those as a flag + their rank there: "
        f"{now / 8 / P:.2f} -> {then / 8 / P:.2f} B/pos (order-0 per sample, dictionary not counted)"
    )
    say("ids under an adaptive PPM-C model over all positions as one stream, by context:")
    cur, nxt = input_tokens(args.samples, data=args.data), d["next"].astype(np.int64)  # [P] each
    sym = ids.reshape(-1)  # row-major, rank order within a row
    for name, ctx in {
        "none (adaptive order-0)": None,
        "input token x_t": cur,
        "next token x_t+1": nxt,
        "both": cur * V + nxt,
    }.items():
        ctx = None if ctx is None else np.repeat(ctx, k)
        per_pos = ppm_bits(sym, ctx, V).reshape(P, k).sum(1) / 8  # [P] bytes
        eighths = " ".join(f"{q.mean():.1f}" for q in np.array_split(per_pos, 8))
        say(f"  {name:<24} {per_pos.mean():6.2f}   by eighth of the stream: {eighths}")
    sets, orders = set_and_order_bits(ids, d["starts"], V)
    guessed = ", ".join(f"{name} {bits / 8 / P:.2f}" for name, bits in orders.items())
    say(
        f"ids as a set per row {sets / 8 / P:.2f} + its rank order, guessed from {guessed} "
        f"(a uniformly random order: {math.lgamma(k + 1) / math.log(2) / 8:.2f})"
    )
    prior = prior_dictionary_bits(ids, d["starts"], V) / 8 / P
    say(f"naming each sample's distinct ids under a free global prior: {prior:.2f}")
    steps = ", ".join(f"{s:g}: {delta_bits(lps, s) / 8 / P:.1f}" for s in (0.04, 0.08, 0.16, 0.32, 0.64))
    say(f"log-prob deltas by step in nats (max error step/2): {steps}")
    _, codes, _ = codec._quantise_rows(lps, grid)  # [P, k] relative codes
    zero = float((np.diff(codes, axis=1) == 0).mean())
    say(f"ordering ids inside ties of quantised codes costs {tie_bits(lps) / 8 / P:.2f} ({zero:.0%} of deltas are 0)")
    gap = lps[:, :1] - lps  # [P, k] nats below the row's top-1
    far = ", ".join(f"{g} nats {(gap > g).mean():.1%}" for g in (8, 10, 12))
    say(f"top-{k} entries further below the top-1 than {far} (what folding them into the tail could drop)")
    P_s, streams = sampled_stream_bytes(d)
    n = len(d["s_ids"]) / P_s
    say(f"sampled targets ({n:.1f} distinct ids per position), zstd as the codec frames it vs order-0:")
    for name, (z, h) in streams.items():
        say(f"  {name:<20} {z / P_s:6.2f}  {h / P_s:6.2f}")
    z, h = (sum(v[i] for v in streams.values()) / P_s for i in (0, 1))
    say(f"  {'all':<20} {z:6.2f}  {h:6.2f}   (order-0: one free table per stream and sample)")
    train = len(d["starts"]) // 3
    for size in (16384, 65536):
        a, b, n = zstd_dictionary_bytes(ids, lps, tail, d["starts"], V, train, size)
        say(
            f"zstd dictionary of {size} B trained on the first {train} samples: the other {n} positions "
            f"{a:.2f} -> {b:.2f} B/pos (one frame per plane, dictionary not counted)"
        )
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
