"""Codec benchmark: bytes per target position, log-prob error and single-thread speed.

    python bench/bench_codec.py --out bench/results/codec.json          # real: SmolLM2-135M on the bundled chats
    python bench/bench_codec.py --samples 60 ...                         # the first 60 chats (bench/run_all.py --quick)
    python bench/bench_codec.py --data other.jsonl --out ...             # SmolLM2-135M on other records
    python bench/bench_codec.py --synthetic --out ...                    # synthetic distributions (no model)
    python bench/bench_codec.py --logprobs teacher.npy --out ...         # real [P, V] log-probs from elsewhere
    python bench/bench_codec.py --gguf DIR/model.gguf --text a.txt --text b.txt --out ...

The default input is real: the `smollm2-135m` preset run with transformers on CPU over
teacher_cache/sample_data/instructions.jsonl, tokenised as `teacher-cache run` does
(bench_codec_data.py; the top-128 / sampled arrays are cached outside the repository).
Top-k for k = 8..128 against the uint16 ids + fp16 log-probs + zstd-3 baseline, sampled
(Anshumann et al. 2025: N draws with replacement per position). Every figure is given for each
--blocks layout: `sample` = one codec call per sample (what real caches store: one blob per
sample's assistant positions) and N = one call per N consecutive positions.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_codec_data import DATA, topk_prefix
from bench_codec_data import compute as real_distributions

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


def from_full(logprobs: np.ndarray, *, kmax: int = max(KS), num_draws: int = 50, seed: int = 0) -> dict:
    """Full log-probs float32 [P, V] -> the arrays bench_codec_data.compute returns (one "sample"
    per 512 positions): top-kmax ids / log-probs / tail and num_draws sampled draws per position."""
    P, V = logprobs.shape
    rng = np.random.default_rng(seed)
    ids, lps, tails, s_off, s_ids, s_cnt = [], [], [], [np.zeros(1, np.int64)], [], []
    for lo in range(0, P, 512):
        lp = logprobs[lo : lo + 512].astype(np.float64)  # [p, V]
        lp -= np.log(np.exp(lp).sum(1, keepdims=True))  # renormalise in fp64
        order = np.argsort(-lp, axis=1, kind="stable")[:, :kmax]  # [p, kmax]
        top = np.take_along_axis(lp, order, 1)  # [p, kmax]
        rest = 1.0 - np.exp(top).sum(1)  # [p]
        with np.errstate(divide="ignore"):
            tails.append(np.where(rest > 1e-30, np.log(np.maximum(rest, 1e-30)), -np.inf).astype(np.float32))
        ids.append(order)
        lps.append(top.astype(np.float32))
        cdf = np.cumsum(np.exp(lp), axis=1)  # [p, V]
        u = rng.random((len(lp), num_draws))
        draws = np.stack([np.searchsorted(c, x) for c, x in zip(cdf, u, strict=True)])
        draws = np.sort(np.minimum(draws, V - 1), axis=1)  # [p, num_draws]
        new = np.ones_like(draws, bool)
        new[:, 1:] = draws[:, 1:] != draws[:, :-1]
        starts = np.flatnonzero(new.reshape(-1))  # [n]
        s_ids.append(draws.reshape(-1)[starts])
        s_cnt.append(np.diff(np.r_[starts, draws.size]))
        s_off.append(np.cumsum(new.sum(1)) + s_off[-1][-1])
    s_off = np.concatenate(s_off)
    return {
        "ids": np.concatenate(ids),
        "lps": np.concatenate(lps),
        "tail": np.concatenate(tails),
        "next": None,
        "starts": np.r_[np.arange(0, P, 512), P].astype(np.int64),
        "s_offsets": s_off,
        "s_ids": np.concatenate(s_ids),
        "s_counts": np.concatenate(s_cnt),
        "vocab": np.array(V),
    }


def make_blocks(d: dict, block: str, *, ks=KS) -> list[dict]:
    """The arrays of bench_codec_data.compute -> codec blocks: block = "sample" (one per sample)
    or a number of consecutive positions. Each block holds, for every k, the top-k targets
    (ids int64 [p, k], log-probs float32 [p, k], tail float32 [p]) and the sampled targets
    (offsets int64 [p+1], ids int64 [n], counts int64 [n], num_draws)."""
    P, V = len(d["ids"]), int(d["vocab"])
    bounds = d["starts"] if block == "sample" else np.r_[np.arange(0, P, int(block)), P]
    tops = {k: topk_prefix(d["ids"], d["lps"], d["tail"], k) for k in ks}
    so = d["s_offsets"]
    draws = int(d["s_counts"][so[0] : so[1]].sum()) if P else 1
    blocks = []
    for lo, hi in itertools.pairwise(bounds):
        lo, hi = int(lo), int(hi)
        b = {"V": V, "P": hi - lo, "topk": {k: tuple(x[lo:hi] for x in t) for k, t in tops.items()}}
        b["sampled"] = (so[lo : hi + 1] - so[lo], d["s_ids"][so[lo] : so[hi]], d["s_counts"][so[lo] : so[hi]], draws)
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


def logprob_errors(lp: np.ndarray, lp2: np.ndarray) -> tuple[float, float]:
    """Max |decoded - exact| over finite entries within 10 nats of the top-1, and over all finite."""
    fin = np.isfinite(lp)  # [P, k]
    d = np.abs(lp2.astype(np.float64) - lp)
    near = fin & (lp >= lp[:, :1] - 10)
    return float(d[near].max(initial=0)), float(d[fin].max(initial=0))


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
        e10, e_all = logprob_errors(lp, lp2)
        err10, err_all = max(err10, e10), max(err_all, e_all)
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


ERROR_BOUNDS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)  # --logprob-error values for the k=32 trade-off


def bench_error_bounds(blocks: list[dict], level: int, k: int = 32) -> list[dict]:
    """Top-k size at each log-prob error bound (encode_topk max_error): the fidelity trade-off."""
    out = []
    for e in ERROR_BOUNDS:
        n = size = 0
        err10 = 0.0
        for b in blocks:
            ids, lp, tail = b["topk"][k]
            blob = codec.encode_topk(ids, lp, tail, vocab_size=b["V"], max_error=e, level=level)
            _, lp2, _ = codec.decode_topk(blob, vocab_size=b["V"])
            err10 = max(err10, logprob_errors(lp, lp2)[0])
            n += b["P"]
            size += len(blob)
        out.append({"k": k, "max_error": e, "bytes_per_pos": size / n, "max_abs_err_within_10_nats": err10})
    return out


def stream_breakdown(blocks: list[dict], k: int, level: int) -> dict:
    """Where the top-k bytes go (B/pos): each stream of the format compressed on its own, as
    the encoder would (the sum is within ~1 B/pos of the blob: header, frame table, CRC)."""
    out = {"top1": 0, "missing_and_tail": 0, "deltas": 0, "id_dictionary": 0, "id_indexes": 0}
    n = 0
    size = lambda chunks: sum(map(len, codec._compress([ch for ch in chunks if ch], level)))  # noqa: E731
    for b in blocks:
        ids, lp, tail = b["topk"][k]
        *_, streams = codec._topk_streams(ids.astype(np.int64), lp, tail, level)
        out["top1"] += size(streams["top1"])
        out["missing_and_tail"] += size(streams["missing"] + streams["tail"])
        for key in ("deltas", "id_dictionary", "id_indexes"):
            out[key] += size(streams[key])
        n += b["P"]
    return {key: v / n for key, v in out.items()}


# the figures: (what, threshold, higher_is_better)
TARGETS = {
    "topk32_bytes_per_pos": ("top-k k=32 B/pos", 50.0, False),
    "sampled_bytes_per_pos": ("sampled N=50 B/pos", 30.0, False),
    "topk32_decode_pos_per_s": ("top-k k=32 decode pos/s/core", 1_000_000.0, True),
}


def check_targets(layout: dict) -> dict:
    """The first layout's figures against TARGETS -> {name: {value, target, met}}."""
    k32 = next(r for r in layout["topk"] if r["k"] == 32)
    values = {
        "topk32_bytes_per_pos": k32["bytes_per_pos"],
        "sampled_bytes_per_pos": layout["sampled"]["bytes_per_pos"],
        "topk32_decode_pos_per_s": k32["decode_pos_per_s"],
    }
    out = {}
    for name, (_, limit, higher) in TARGETS.items():
        v = values[name]
        out[name] = {"value": v, "target": limit, "met": bool(v >= limit if higher else v <= limit)}
    return out


def readme_table(result: dict) -> str:
    """Markdown table of the first layout (what real caches store), for README.md."""
    lay = result["layouts"][0]
    rows = [
        f"Codec on {result['source']}: P = {result['positions']}, V = {result['vocab_size']}, "
        f"one codec call per {'sample' if lay['block'] == 'sample' else str(lay['block']) + ' positions'} "
        f"({lay['mean_block_positions']:.1f} positions), zstd {result['zstd_level']}, one core.",
        "",
        "| targets | B/pos | uint16+fp16+zstd-3 B/pos | max err <= 10 nats | encode pos/s | decode pos/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in lay["topk"]:
        rows.append(
            f"| top-{r['k']} | {r['bytes_per_pos']:.1f} | {r['baseline_bytes_per_pos']:.1f} | "
            f"{r['max_abs_err_within_10_nats']:.4f} | {r['encode_pos_per_s']:,.0f} | {r['decode_pos_per_s']:,.0f} |"
        )
    s = lay["sampled"]
    rows.append(
        f"| sampled N={s['num_draws']} ({s['distinct_per_pos']:.1f} ids/pos) | {s['bytes_per_pos']:.1f} | - | exact | "
        f"{s['encode_pos_per_s']:,.0f} | {s['decode_pos_per_s']:,.0f} |"
    )
    if "k32_by_error_bound" in lay:
        rows += ["", "Top-32 B/pos by `--logprob-error` (nats): " + error_bound_line(lay["k32_by_error_bound"]) + "."]
    rows.append("")
    met = [
        f"{TARGETS[n][0]} {'<=' if not TARGETS[n][2] else '>='} {TARGETS[n][1]:,.0f}: "
        f"{'met' if t['met'] else 'NOT met'} ({t['value']:,.1f})"
        for n, t in result["targets"].items()
    ]
    rows.append("Targets (issue 4): " + "; ".join(met) + ".")
    return "\n".join(rows)


def error_bound_line(rows: list[dict]) -> str:
    return ", ".join(f"{r['max_error']:g}: {r['bytes_per_pos']:.1f}" for r in rows)


def write_readme(readme: Path, table: str, marker: str = "CODEC") -> None:
    """Replaces the text between the <!-- {marker}:START/END --> markers of README.md."""
    start, end = f"<!-- {marker}:START -->", f"<!-- {marker}:END -->"
    text = readme.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{readme}: no {start} ... {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{table}\n{end}{tail}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/results/codec.json"))
    ap.add_argument("--samples", type=int, default=None, help="real input: only the first N chats")
    ap.add_argument("--data", type=Path, default=DATA, help="records for the real input (default: bundled chats)")
    ap.add_argument("--synthetic", action="store_true", help="synthetic distributions instead of SmolLM2")
    ap.add_argument("--logprobs", type=Path, help=".npy of real log-probs float [P, V]")
    ap.add_argument("--gguf", help="GGUF causal LM to compute real log-probs with (needs torch)")
    ap.add_argument("--text", action="append", default=[], help="text file for --gguf (repeat)")
    ap.add_argument("--positions", type=int, default=2048, help="synthetic positions")
    ap.add_argument("--vocab", type=int, default=32000, help="synthetic vocab size")
    ap.add_argument("--blocks", default="sample,100,512", help="comma list: sample and/or positions per call")
    ap.add_argument("--num-draws", type=int, default=50)
    ap.add_argument("--level", type=int, default=codec.ZSTD_LEVEL)
    ap.add_argument("--repeat", type=int, default=5, help="decode timing: best of N")
    ap.add_argument("--readme", type=Path, help="rewrite the codec table between the CODEC markers of this file")
    ap.add_argument("--readme-marker", default="CODEC", help="which markers: <!-- NAME:START/END -->")
    args = ap.parse_args()
    if not args.data.is_file():
        ap.error(f"--data {args.data}: no such file")

    if args.logprobs:
        source, d = f"real: {args.logprobs}", from_full(np.load(args.logprobs), num_draws=args.num_draws)
    elif args.gguf:
        texts = [Path(t).read_text() for t in args.text]
        source = f"real: {args.gguf} on {len(texts)} texts"
        d = from_full(teacher_logprobs(args.gguf, texts), num_draws=args.num_draws)
    elif args.synthetic:
        source = "SYNTHETIC (bench_codec.synthetic_logprobs, seed 0), not a real teacher"
        d = from_full(synthetic_logprobs(args.positions, args.vocab), num_draws=args.num_draws)
    else:
        d = real_distributions(args.samples, data=args.data)
        n_s = len(d["starts"]) - 1
        what = "bundled chats" if args.data == DATA else f"records of {args.data.name}"
        source = f"real: smollm2-135m (SmolLM2-135M-Instruct) on {n_s} {what}, assistant positions"
    P, V = d["ids"].shape[0], int(d["vocab"])
    per_sample = np.diff(d["starts"])
    modes = [m.strip() for m in args.blocks.split(",") if m.strip()]
    layouts = []
    for mode in modes:
        blocks = make_blocks(d, mode)
        topk = [bench_topk(blocks, k, args.level, args.repeat) for k in KS]
        sampled = bench_sampled(blocks, args.level, args.repeat)
        layouts.append(
            {
                "block": mode,
                "blocks": len(blocks),
                "mean_block_positions": P / len(blocks),
                "topk": topk,
                "sampled": sampled,
                "k32_streams": stream_breakdown(blocks, 32, args.level),
            }
        )
        if len(layouts) == 1:  # what real caches store: the size/fidelity trade-off
            layouts[0]["k32_by_error_bound"] = bench_error_bounds(blocks, args.level)
    hint = None
    if d.get("next") is not None:
        hit = d["ids"][:, :32] == d["next"][:, None].astype(np.int64)
        hint = {"next_token_in_top32": float(hit.any(1).mean()), "next_token_is_top1": float(hit[:, 0].mean())}

    top1_prob = float(np.exp(d["lps"][:, 0].astype(np.float64)).mean())  # how sure the teacher is
    print(f"source: {source}; P={P} V={V} zstd level={args.level}; mean top-1 probability {top1_prob:.3f}")
    if len(d["starts"]) > 1:
        print(f"positions per sample: mean {per_sample.mean():.1f}, median {np.median(per_sample):.0f}")
    cols = ("B/pos", "base B/pos", "err<=10nat", "err all", "enc pos/s", "dec pos/s")
    for lay in layouts:
        print(f"block={lay['block']} ({lay['blocks']} calls, {lay['mean_block_positions']:.1f} positions each)")
        print(f"{'k':>5} " + " ".join(f"{c:>{w}}" for c, w in zip(cols, (8, 10, 10, 8, 11, 11), strict=True)))
        for r in lay["topk"]:
            print(
                f"{r['k']:>5} {r['bytes_per_pos']:>8.2f} {r['baseline_bytes_per_pos']:>10.2f} "
                f"{r['max_abs_err_within_10_nats']:>10.4f} {r['max_abs_err_all_finite']:>8.4f} "
                f"{r['encode_pos_per_s']:>11,.0f} {r['decode_pos_per_s']:>11,.0f}"
            )
        s = lay["sampled"]
        print(
            f"sampled N={s['num_draws']}: {s['distinct_per_pos']:.2f} distinct/pos, "
            f"{s['bytes_per_pos']:.2f} B/pos, enc {s['encode_pos_per_s']:,.0f} pos/s, "
            f"dec {s['decode_pos_per_s']:,.0f} pos/s"
        )
        print("k=32 streams B/pos: " + ", ".join(f"{key} {v:.2f}" for key, v in lay["k32_streams"].items()))
        if "k32_by_error_bound" in lay:
            print("k=32 B/pos by --logprob-error: " + error_bound_line(lay["k32_by_error_bound"]))
    result = {
        "source": source,
        "positions": P,
        "vocab_size": V,
        "samples": len(d["starts"]) - 1,
        "mean_positions_per_sample": float(per_sample.mean()) if len(per_sample) else 0.0,
        "zstd_level": args.level,
        "codec_version": codec.CODEC_VERSION,
        "error_bound": codec.topk_error_bound(),
        "next_token_hint": hint,
        "mean_top1_prob": top1_prob,
        "layouts": layouts,
        # the first layout's figures, where older readers look for them
        "block_positions": layouts[0]["block"],
        "topk": layouts[0]["topk"],
        "sampled": layouts[0]["sampled"],
        "machine": {
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "numpy": np.__version__,
            "zstandard": zstandard.__version__,
            "threads": 1,
        },
    }
    result["targets"] = check_targets(layouts[0])
    for name, t in result["targets"].items():
        what, limit, higher = TARGETS[name]
        mark = "met" if t["met"] else "NOT MET"
        print(f"target {what} {'>=' if higher else '<='} {limit:,.0f}: {t['value']:,.2f} {mark}")
    if args.readme:
        write_readme(args.readme, readme_table(result), args.readme_marker)
        print(f"updated the codec table in {args.readme}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
