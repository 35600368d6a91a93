"""Stage-one throughput: our vLLM caching path against plain vLLM prefill, side by side.

    .venv/bin/python bench/bench_throughput.py                        # tiny-mixtral smollm2-135m
    .venv/bin/python bench/bench_throughput.py --quick                # smaller workload, 2 repeats
    .venv/bin/python bench/bench_throughput.py --models smollm2-135m --samples 32 --repeats 5

For each model, on the same token ids (a deterministic chat workload, bench/workload.py, tokenised
with the model's own tokenizer and chat template; assistant tokens are the target positions):

- prefill   plain vLLM, generate runner, SamplingParams(max_tokens=1), no logprobs;
- encode    the hidden-mode engine alone (the llm.encode call inside VllmBackend.forward);
- caching   what teacher_cache.run does per batch with the vLLM backend in `hidden` mode:
            VllmBackend.forward(batch), then targets.topk_from_logits(k=32) and
            codec.encode_topk per sample;
- proposed  a bench-only prototype: llm.encode called directly (not via VllmBackend.forward),
            the script's copy of the fused top-k (the algorithm targets.topk_from_logits has
            used since it landed); --proposed-level / --proposed-chunk-rows add the other
            candidates (codec zstd level, whole-batch projection) end to end;
- stock     VllmBackend(mode="prompt_logprobs") + codec, the reference path.

All engines are alive at once (VLLM_CPU_KVCACHE_SPACE=1 GiB each; on CPU all in this process, as a
run's own engine is: bench/engine_spin.py); the arms run interleaved batch by batch, in a seeded
random order per batch, after a warm-up; each repeat sums its batches, and tokens/s and
ratios to prefill are medians over repeats. Then one batch is profiled stage by stage.
Throughput is input tokens (prompt + response) per second for every path. The ceiling is what a
pipeline that adds exactly the output projection to prefill could reach, from the model's
config.json (see docs/BENCHMARKS.md). Progress goes to stderr; the table to stdout; JSON to --out.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_MODELS = ("tiny-mixtral", "smollm2-135m")
# samples per model: sized so a full run of both stays under ~10 minutes on 2 CPU cores
DEFAULT_SAMPLES = {"tiny-mixtral": 96, "smollm2-135m": 16}
QUICK_SAMPLES = {"tiny-mixtral": 32, "smollm2-135m": 8}
FALLBACK_SAMPLES, FALLBACK_QUICK = 32, 8

# Known configs (config.json fields) of the paper's teacher and student, for the ceiling table.
KNOWN_CONFIGS = {
    "Mixtral-8x7B": {
        "model_type": "mixtral",
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 14336,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "vocab_size": 32000,
    },
    "Mistral-7B": {
        "model_type": "mistral",
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 14336,
        "vocab_size": 32000,
    },
}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- ceiling


def flops_per_token(cfg: dict) -> dict:
    """Matmul FLOPs (2 per multiply-add) per token from a config.json dict.

    body: every decoder layer's q, k, v, o projections (GQA: k and v have num_key_value_heads
    heads), the SwiGLU MLP (gate, up, down) of each *active* expert (num_experts_per_tok of
    num_local_experts for MoE) and the router. Attention scores (QK^T, AV) are not counted;
    `attn_scores_per_ctx` gives them per token of context, to weigh separately.
    head: the output projection, hidden_size x vocab_size."""
    D, L, V = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    H = cfg["num_attention_heads"]
    KV = cfg.get("num_key_value_heads") or H
    hd = cfg.get("head_dim") or D // H
    attn = D * H * hd + 2 * D * KV * hd + H * hd * D  # q, k, v, o
    experts = cfg.get("num_local_experts") or cfg.get("num_experts") or 0
    active = cfg.get("num_experts_per_tok", 1) if experts else 1
    mlp = 3 * D * cfg["intermediate_size"] * active  # gate, up, down per active expert
    router = D * experts
    return {
        "body": 2.0 * L * (attn + mlp + router),
        "head": 2.0 * D * V,
        "attn_scores_per_ctx": 2.0 * L * 2 * H * hd,  # QK^T + AV per token, per context token
    }


def ceiling(cfg: dict, target_fraction: float = 1.0) -> float:
    """body / (body + target_fraction * head): the best caching/prefill ratio when the caching
    path costs prefill plus the output projection at target_fraction of the tokens."""
    f = flops_per_token(cfg)
    return f["body"] / (f["body"] + target_fraction * f["head"])


# ----------------------------------------------------------------------------- the paths


def prefill_pass(llm, batch, params) -> None:
    llm.generate([{"prompt_token_ids": s.input_ids.tolist()} for s in batch], params, use_tqdm=False)


def caching_pass(backend, batch, k: int, vocab: int) -> list[bytes]:
    """teacher_cache.run's per-batch work for the vLLM backend with top-k targets."""
    from teacher_cache import codec
    from teacher_cache.targets import topk_from_logits

    blobs = []
    for o in backend.forward(batch):  # as run() does: one sample's logits [P, V] at a time, used in place
        top = topk_from_logits(o.logits, k, inplace=True)
        blobs.append(codec.encode_topk(top.ids, top.logprobs, top.tail_logprob, vocab_size=vocab))
    return blobs


def stock_pass(backend, batch, vocab: int) -> list[bytes]:
    from teacher_cache import codec

    return [
        codec.encode_topk(o.topk.ids, o.topk.logprobs, o.topk.tail_logprob, vocab_size=vocab)
        for o in backend.forward(batch)
    ]


def topk_from_logits_fused(logits, k: int):
    """logits float32 [P, V] -> (ids int64 [P, k], logprobs float32 [P, k], tail float32 [P]).

    Same values as targets.topk_from_logits up to fp32 rounding, with one exp pass over [P, V]
    and no [P, V] allocation; OVERWRITES logits. Top-k is taken on the logits (a per-row shift
    keeps the order). The complement is summed relative to its own max, the (k+1)-th logit, so
    its largest term is exp(0) = 1 and the tail stays exact however small it is."""
    import torch

    V = logits.shape[-1]
    k = min(k, V)
    if k == V:  # no complement: nothing to gain, use the reference
        from teacher_cache.targets import topk_from_logits

        t = topk_from_logits(logits, k)
        return t.ids, t.logprobs, t.tail_logprob
    logits = logits.float()  # no copy when already float32
    top = torch.topk(logits, k + 1, dim=-1, sorted=True)  # [P, k+1]
    m = top.values[:, k:]  # [P, 1] largest logit outside the top-k
    e = logits.sub_(m).exp_()  # [P, V] in place; top-k entries may overflow to inf ...
    e.scatter_(-1, top.indices[:, :k], 0.0)  # ... and are zeroed here: [P, V] complement only
    log_rest = m[:, 0].double() + torch.log(e.sum(-1).double())  # [P] log of the complement's mass
    vals = top.values[:, :k].double()  # [P, k]
    lse = torch.logaddexp(torch.logsumexp(vals, dim=-1), log_rest)  # [P] log partition function
    return (
        top.indices[:, :k].cpu().numpy(),
        (vals - lse[:, None]).float().cpu().numpy(),
        (log_rest - lse).float().cpu().numpy(),
    )


def proposed_pass(backend, batch, k: int, vocab: int, level: int, chunk_rows: int) -> list[bytes]:
    """The caching path with the recommended change: topk_from_logits_fused in place of
    targets.topk_from_logits. Options to measure the other candidates end to end: chunk_rows > 0
    projects the whole batch's target positions chunk_rows at a time instead of per sample;
    level is the codec's zstd level (production default 15)."""
    import torch

    from teacher_cache import codec

    prompts = [{"prompt_token_ids": s.input_ids.tolist()} for s in batch]
    outs = backend.llm.encode(prompts, pooling_task="token_embed", use_tqdm=False)
    hs = [o.outputs.data[torch.from_numpy(s.target_positions)] for s, o in zip(batch, outs, strict=True)]  # [P, D]
    W = backend.weight  # float32 [V, D]
    if chunk_rows <= 0:
        tops = [topk_from_logits_fused(h.to(backend.device, torch.float32) @ W.T, k) for h in hs]  # [P, V] each
    else:
        h = torch.cat(hs).to(backend.device, torch.float32)  # [sum P, D]
        parts = [topk_from_logits_fused(h[lo : lo + chunk_rows] @ W.T, k) for lo in range(0, len(h), chunk_rows)]
        ids, lps, tail = (np.concatenate(x) for x in zip(*parts, strict=True))  # [sum P, k], [sum P, k], [sum P]
        bounds = np.cumsum([0] + [len(x) for x in hs])
        tops = [(ids[a:b], lps[a:b], tail[a:b]) for a, b in itertools.pairwise(bounds)]
    return [codec.encode_topk(i, lp, t, vocab_size=vocab, level=level) for i, lp, t in tops]


# ----------------------------------------------------------------------------- profile


def profile_caching(backend, batches, k: int, vocab: int, thread_counts: list[int], chunk_rows: int) -> dict:
    """Split the caching path's time into its stages (the stages replicate the pre-fusion top-k,
    log_softmax + topk + scatter tail, op by op; targets.topk_from_logits is now the fused one,
    timed beside it as reference_topk_from_logits), and time alternatives on the same data: codec level 3, the fused
    top-k, projection + fused top-k per sample vs over the whole batch in row chunks, and the
    projection + reference top-k under each torch thread count."""
    import torch

    from teacher_cache import codec
    from teacher_cache.targets import topk_from_logits

    stages = dict.fromkeys(
        ["vllm_encode", "gather_cast", "matmul", "log_softmax", "topk", "tail", "to_numpy", "codec_l15"], 0.0
    )
    alt = dict.fromkeys(
        ["codec_l3", "fused_topk_tail", "reference_topk_from_logits", "per_sample_mm_fused", "batched_mm_fused"], 0.0
    )
    by_threads: dict[int, list[float]] = {n: [] for n in thread_counts}
    bytes15 = bytes3 = positions = 0
    max_diff = {"ids_mismatch_frac": 0.0, "logprob": 0.0, "tail": 0.0}
    mismatches = 0
    default_threads = torch.get_num_threads()
    W = backend.weight  # float32 [V, D]
    clock = time.perf_counter
    for batch in batches:
        t = clock()
        outs = backend.llm.encode(
            [{"prompt_token_ids": s.input_ids.tolist()} for s in batch], pooling_task="token_embed", use_tqdm=False
        )
        stages["vllm_encode"] += clock() - t
        hs = []
        for s, o in zip(batch, outs, strict=True):
            t0 = clock()
            h = o.outputs.data[torch.from_numpy(s.target_positions)].to(backend.device, torch.float32)  # [P, D]
            t1 = clock()
            hs.append(h)
            logits = h @ W.T  # [P, V]
            t2 = clock()
            lp = torch.log_softmax(logits.float(), dim=-1)  # [P, V]
            t3 = clock()
            top = torch.topk(lp, min(k, lp.shape[-1]), dim=-1, sorted=True)  # [P, k]
            t4 = clock()
            tail = torch.logsumexp(lp.scatter(-1, top.indices, float("-inf")), dim=-1)  # [P]
            t5 = clock()
            ids = top.indices.to(torch.int64).cpu().numpy()
            lps = top.values.cpu().numpy().astype(np.float32)
            tl = tail.cpu().numpy().astype(np.float32)
            t6 = clock()
            blob = codec.encode_topk(ids, lps, tl, vocab_size=vocab)
            t7 = clock()
            blob3 = codec.encode_topk(ids, lps, tl, vocab_size=vocab, level=3)
            t8 = clock()
            stages["gather_cast"] += t1 - t0
            stages["matmul"] += t2 - t1
            stages["log_softmax"] += t3 - t2
            stages["topk"] += t4 - t3
            stages["tail"] += t5 - t4
            stages["to_numpy"] += t6 - t5
            stages["codec_l15"] += t7 - t6
            alt["codec_l3"] += t8 - t7
            bytes15 += len(blob)
            bytes3 += len(blob3)
            positions += len(ids)
            del lp, top, tail
            # the same logits through the reference function and the fused prototype
            t = clock()
            topk_from_logits(logits, k)
            alt["reference_topk_from_logits"] += clock() - t
            t = clock()
            fids, flps, ftail = topk_from_logits_fused(logits, k)  # overwrites logits
            alt["fused_topk_tail"] += clock() - t
            mismatches += int((fids != ids).sum())
            fin = np.isfinite(tl)
            max_diff["logprob"] = max(max_diff["logprob"], float(np.abs(flps - lps).max(initial=0)))
            max_diff["tail"] = max(max_diff["tail"], float(np.abs(ftail[fin] - tl[fin]).max(initial=0)))
            # projection + reference top-k, per torch thread count, interleaved
            for n in thread_counts:
                torch.set_num_threads(n)
                t = clock()
                topk_from_logits(h @ W.T, k)
                by_threads[n].append(clock() - t)
            torch.set_num_threads(default_threads)
        # the projection + fused top-k, per sample vs one batch in row chunks
        t = clock()
        for h in hs:
            topk_from_logits_fused(h @ W.T, k)
        alt["per_sample_mm_fused"] += clock() - t
        t = clock()
        hb = torch.cat(hs)  # [sum P, D]
        for lo in range(0, hb.shape[0], chunk_rows):
            topk_from_logits_fused(hb[lo : lo + chunk_rows] @ W.T, k)
        alt["batched_mm_fused"] += clock() - t
    max_diff["ids_mismatch_frac"] = mismatches / max(positions * k, 1)
    # the stages above are what caching_pass does (for vllm_encode: forward's llm.encode call)
    total = sum(stages.values())
    return {
        "positions": positions,
        "tokens": sum(len(s.input_ids) for b in batches for s in b),
        "samples": sum(len(b) for b in batches),
        "seconds": stages,
        "share": {name: v / total for name, v in stages.items()},
        "alternatives_seconds": alt,
        "projection_plus_topk_seconds_by_threads": {str(n): sum(v) for n, v in by_threads.items()},
        "torch_threads": default_threads,
        "bytes_per_position": {"level15": bytes15 / max(positions, 1), "level3": bytes3 / max(positions, 1)},
        "fused_vs_reference_max_abs_diff": max_diff,
    }


# ----------------------------------------------------------------------------- one model


def _batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _close(obj) -> None:
    """Shut a vLLM engine down now (its worker processes go with it)."""
    llm = getattr(obj, "llm", obj)
    engine = getattr(llm, "llm_engine", None)
    shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
    if shutdown is not None:
        shutdown()
    if hasattr(obj, "llm"):
        obj.close()
    del llm, engine
    gc.collect()


def build_engines(ref, args) -> dict:
    """All engines on one model, alive together: 'plain' (generate runner), 'hidden' (our
    VllmBackend, hidden mode) and, unless --skip-stock, 'stock' (VllmBackend, prompt_logprobs)."""
    import torch
    from vllm import LLM

    from teacher_cache.backends.vllm_backend import VllmBackend, in_process_engines

    on_gpu = torch.cuda.is_available()
    mem = (0.28 if not args.skip_stock else 0.42) if on_gpu else 0.85  # the engines share one GPU
    # on CPU every engine in this process, as `teacher-cache run` has its own (they are closed together)
    common = dict(
        top_k=args.top_k, max_model_len=args.max_length, seed=args.seed, gpu_memory_utilization=mem, in_process=True
    )
    plain_kw = dict(
        model=ref.path,
        dtype=ref.dtype,
        max_model_len=args.max_length,
        seed=args.seed,
        enforce_eager=not on_gpu,
        enable_prefix_caching=False,  # else repeats would hit the prefix cache
        max_num_batched_tokens=max(args.max_length, 8192),  # as VllmBackend's hidden mode
    )
    if on_gpu:
        plain_kw["gpu_memory_utilization"] = mem
    engines: dict = {}
    try:
        engines["hidden"] = VllmBackend(ref, mode="hidden", **common)
        with in_process_engines():
            engines["plain"] = LLM(**plain_kw)
        if not args.skip_stock:
            engines["stock"] = VllmBackend(ref, mode="prompt_logprobs", **common)
    except BaseException:
        close_all(engines)
        raise
    return engines


def close_all(engines: dict) -> None:
    for e in engines.values():
        _close(e)
    engines.clear()


def interleaved(name: str, engines: dict, batches, tokens: int, vocab: int, args) -> tuple[dict, dict, list]:
    """Warm-up, a decoded comparison of caching vs proposed, then the repeats: every batch runs
    through each arm, in a seeded random order per batch. Returns seconds per repeat per arm.

    Arms: prefill (plain vLLM), encode (the hidden-mode engine alone: VllmBackend.forward's
    llm.encode call), caching, proposed, stock."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, detokenize=False)
    hidden, plain = engines["hidden"], engines["plain"]

    def encode(b):
        hidden.llm.encode(
            [{"prompt_token_ids": s.input_ids.tolist()} for s in b], pooling_task="token_embed", use_tqdm=False
        )

    arms = {
        "prefill": lambda b: prefill_pass(plain, b, params),
        "encode": encode,
        "caching": lambda b: caching_pass(hidden, b, args.top_k, vocab),
        "proposed": lambda b: proposed_pass(
            hidden, b, args.top_k, vocab, args.proposed_level, args.proposed_chunk_rows
        ),
    }
    if "stock" in engines:
        arms["stock"] = lambda b: stock_pass(engines["stock"], b, vocab)
    warm = batches[0][:4]
    for fn in arms.values():
        fn(warm)
    check = compare_blobs(arms["caching"](warm), arms["proposed"](warm), vocab)
    _log(f"{name}: proposed vs caching on {len(warm)} samples, decoded: {check}")
    names = list(arms)
    times: dict[str, list[float]] = {a: [] for a in names}
    load = [os.getloadavg()[0]]
    for r in range(args.repeats):
        acc = dict.fromkeys(names, 0.0)
        for bi, batch in enumerate(batches):
            # a fresh order per batch: a rotation would keep each arm behind the same one (caching
            # behind encode), and what an arm leaves behind (an engine's busy-wait) bias its follower
            for a in random.Random(f"{r}-{bi}").sample(names, len(names)):
                t = time.perf_counter()
                arms[a](batch)
                acc[a] += time.perf_counter() - t
        for a in names:
            times[a].append(acc[a])
        load.append(os.getloadavg()[0])
        _log(
            f"{name}: repeat {r + 1}/{args.repeats}: "
            + ", ".join(f"{a} {tokens / acc[a]:,.0f}" for a in names)
            + f" tok/s; caching/prefill {acc['prefill'] / acc['caching']:.3f} (load {load[-1]:.1f})"
        )
    return times, check, load


def bench_model(name: str, args) -> dict:
    import torch

    from bench.workload import make_records
    from teacher_cache.models import resolve_model
    from teacher_cache.tokenize import load_tokenizer, tokenize_record

    table = QUICK_SAMPLES if args.quick else DEFAULT_SAMPLES
    n_samples = args.samples or table.get(name, FALLBACK_QUICK if args.quick else FALLBACK_SAMPLES)
    ref = resolve_model(name)
    config = json.loads((Path(ref.path) / "config.json").read_text())
    tok = load_tokenizer(ref.path)
    vocab = len(tok)  # as run() passes to the codec
    tokenized = [tokenize_record(tok, r, args.max_length) for r in make_records(n_samples, args.seed)]
    batches = _batches(tokenized, args.batch_size)
    tokens = sum(len(s.input_ids) for s in tokenized)
    positions = sum(len(s.target_positions) for s in tokenized)
    frac = positions / tokens
    _log(
        f"{name}: {n_samples} samples, {tokens} tokens, {positions} target positions (P/T {frac:.2f}), "
        f"{len(batches)} batches of <= {args.batch_size}"
    )

    _log(f"{name}: building the engines (plain, hidden{'' if args.skip_stock else ', stock'}) ...")
    t = time.perf_counter()
    engines = build_engines(ref, args)
    build_s = time.perf_counter() - t
    _log(f"{name}: engines up in {build_s:.0f}s; warm-up ...")
    try:
        times, check, load = interleaved(name, engines, batches, tokens, vocab, args)
        nb = min(args.profile_batches, len(batches))
        _log(f"{name}: profiling the caching path on {nb} batch(es) ...")
        thread_counts = sorted({1, torch.get_num_threads(), len(os.sched_getaffinity(0))})
        if getattr(torch.set_num_threads, "__module__", "").startswith("vllm"):  # an engine in this process
            thread_counts = [torch.get_num_threads()]  # binds the threads and makes set_num_threads a no-op
        prof = profile_caching(engines["hidden"], batches[:nb], args.top_k, vocab, thread_counts, args.chunk_rows)
    finally:
        close_all(engines)

    med = {a: statistics.median(v) for a, v in times.items()}

    def ratio_to_prefill(arm: str) -> list[float]:
        return [p / c for p, c in zip(times["prefill"], times[arm], strict=True)]

    ceil, ceil_w = ceiling(config), ceiling(config, frac)
    ratios = {a: ratio_to_prefill(a) for a in times if a != "prefill"}
    ratio, ratio_prop = statistics.median(ratios["caching"]), statistics.median(ratios["proposed"])
    f = flops_per_token(config)
    mean_ctx = tokens / n_samples / 2  # causal prefill: T/2 keys per query on average
    return {
        "model": name,
        "path": ref.path,
        "dtype": ref.dtype,
        "workload": {
            "samples": n_samples,
            "tokens": tokens,
            "target_positions": positions,
            "target_fraction": frac,
            "batch_size": args.batch_size,
            "batches": len(batches),
            "mean_tokens_per_sample": tokens / n_samples,
        },
        "repeats": args.repeats,
        "seconds_per_repeat": times,
        "tok_s": {a: tokens / v for a, v in med.items()},
        "ratio_to_prefill": {a: statistics.median(v) for a, v in ratios.items()},
        "ratio_to_prefill_min_max": {a: [min(v), max(v)] for a, v in ratios.items()},
        "prefill_tok_s": tokens / med["prefill"],
        "caching_tok_s": tokens / med["caching"],
        "proposed_tok_s": tokens / med["proposed"],
        "stock_tok_s": tokens / med["stock"] if "stock" in med else None,
        "ratio": ratio,
        "ratio_proposed": ratio_prop,
        "ceiling": ceil,
        "ratio_over_ceiling": ratio / ceil,
        "proposed_over_ceiling": ratio_prop / ceil,
        "ceiling_workload": ceil_w,
        "ratio_over_ceiling_workload": ratio / ceil_w,
        "proposed_over_ceiling_workload": ratio_prop / ceil_w,
        "flops_per_token": f,
        "attention_score_flops_share_of_body": f["attn_scores_per_ctx"] * mean_ctx / f["body"],
        "proposed": {
            "zstd_level": args.proposed_level,
            "chunk_rows": args.proposed_chunk_rows,
            "check_first_4_samples": check,
        },
        "profile": prof,
        "load_average_1m": load,
        "engine_build_s": build_s,
    }


def compare_blobs(reference: list[bytes], other: list[bytes], vocab: int) -> dict:
    """Decoded top-k of two paths: share of differing ids, max |diff| of log-probs and tails
    (one quantisation step, codec.STEP = 0.04, where fp32 rounding moves a value across a
    rounding boundary)."""
    from teacher_cache import codec

    n = mism = 0
    d_lp = d_tail = 0.0
    for a, b in zip(reference, other, strict=True):
        ia, la, ta = codec.decode_topk(a, vocab_size=vocab)
        ib, lb, tb = codec.decode_topk(b, vocab_size=vocab)
        n += ia.size
        mism += int((ia != ib).sum())
        same = ia == ib
        d_lp = max(d_lp, float(np.abs(la - lb)[same].max(initial=0)))
        fin = np.isfinite(ta) & np.isfinite(tb)
        d_tail = max(d_tail, float(np.abs(ta - tb)[fin].max(initial=0)))
    return {"ids_differ": mism / max(n, 1), "max_abs_logprob": d_lp, "max_abs_tail": d_tail}


# ----------------------------------------------------------------------------- report


def ceiling_table(models: dict[str, dict]) -> list[dict]:
    rows = []
    for name, cfg in models.items():
        f = flops_per_token(cfg)
        rows.append(
            {
                "model": name,
                "body_gflop_per_token": f["body"] / 1e9,
                "head_gflop_per_token": f["head"] / 1e9,
                "ceiling": ceiling(cfg),
            }
        )
    return rows


def _row(cells: list[tuple[str, int]]) -> str:
    return " ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(cells))


def print_report(results: list[dict], ceilings: list[dict]) -> None:
    print("\nceiling = body / (body + hidden*vocab) FLOPs per token (attention scores not counted)")
    print(_row([("model", 14), ("body GFLOP/tok", 15), ("head GFLOP/tok", 15), ("ceiling", 8)]))
    for c in ceilings:
        print(
            _row(
                [
                    (c["model"], 14),
                    (f"{c['body_gflop_per_token']:.4f}", 15),
                    (f"{c['head_gflop_per_token']:.4f}", 15),
                    (f"{c['ceiling']:.3f}", 8),
                ]
            )
        )
    if not results:
        return
    arms = ["prefill", "encode", "caching", "proposed", "stock"]
    print("\ninput tokens/s, median of repeats (encode = the hidden-mode vLLM call alone)")
    print(_row([("model", 14), ("P/T", 5)] + [(a, 9) for a in arms]))
    for r in results:
        tps = r["tok_s"]
        cells = [(f"{tps[a]:,.0f}" if a in tps else "-", 9) for a in arms]
        print(_row([(r["model"], 14), (f"{r['workload']['target_fraction']:.2f}", 5), *cells]))
    print("\nratios to prefill (per repeat, median) and to the ceiling; wl = ceiling at this workload's P/T")
    head = ["encode", "caching", "ceiling", "cach/ceil", "wl ceil", "cach/wl", "proposed", "prop/ceil", "prop/wl",
            "stock"]  # fmt: skip
    print(_row([("model", 14)] + [(h, 9) for h in head]))
    for r in results:
        q = r["ratio_to_prefill"]
        vals = [q["encode"], r["ratio"], r["ceiling"], r["ratio_over_ceiling"], r["ceiling_workload"],
                r["ratio_over_ceiling_workload"], r["ratio_proposed"], r["proposed_over_ceiling"],
                r["proposed_over_ceiling_workload"], q.get("stock")]  # fmt: skip
        print(_row([(r["model"], 14)] + [("-" if v is None else f"{v:.3f}", 9) for v in vals]))
    print("\nwhere the caching path's time goes (profile; share of the path's time)")
    stage_names = list(results[0]["profile"]["seconds"])
    print(_row([("model", 14)] + [(n, 11) for n in stage_names]))
    for r in results:
        p = r["profile"]
        print(_row([(r["model"], 14)] + [(f"{p['share'][n]:.1%}", 11) for n in stage_names]))
    print("\nalternatives on the same data (seconds over the profiled batches)")
    for r in results:
        p = r["profile"]
        st, a = p["seconds"], p["alternatives_seconds"]
        thr = ", ".join(f"{n} thread(s) {v:.2f}s" for n, v in p["projection_plus_topk_seconds_by_threads"].items())
        d = p["fused_vs_reference_max_abs_diff"]
        b = p["bytes_per_position"]
        print(
            f"{r['model']}:\n"
            f"  log_softmax+topk+tail {st['log_softmax'] + st['topk'] + st['tail']:.2f}s "
            f"(targets.topk_from_logits {a['reference_topk_from_logits']:.2f}s) -> fused {a['fused_topk_tail']:.2f}s; "
            f"max |diff| logprob {d['logprob']:.1e}, tail {d['tail']:.1e}, ids {d['ids_mismatch_frac']:.1e}\n"
            f"  projection + fused top-k: per sample {a['per_sample_mm_fused']:.2f}s, "
            f"whole batch in row chunks {a['batched_mm_fused']:.2f}s\n"
            f"  codec level 15 {st['codec_l15']:.3f}s ({b['level15']:.1f} B/pos) -> level 3 {a['codec_l3']:.3f}s "
            f"({b['level3']:.1f} B/pos)\n"
            f"  projection + targets.topk_from_logits by torch threads: {thr}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="presets or checkpoint dirs")
    ap.add_argument("--out", type=Path, default=Path("bench/results/throughput.json"))
    ap.add_argument("--quick", action="store_true", help="smaller workload, 2 repeats")
    ap.add_argument("--samples", type=int, help=f"samples per model (default {DEFAULT_SAMPLES}, else 32)")
    ap.add_argument("--repeats", type=int, help="measured repeats (default 3, --quick 2)")
    ap.add_argument("--batch-size", type=int, default=16, help="samples per forward (run()'s default)")
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile-batches", type=int, default=1)
    ap.add_argument("--proposed-level", type=int, default=15, help="codec zstd level in the proposed path")
    ap.add_argument(
        "--proposed-chunk-rows",
        type=int,
        default=0,
        help="proposed path: project the whole batch this many positions at a time (0: per sample, as now)",
    )
    ap.add_argument("--chunk-rows", type=int, default=1024, help="profile: positions per chunk, whole-batch variant")
    ap.add_argument("--skip-stock", action="store_true", help="do not time the stock prompt_logprobs path")
    ap.add_argument(
        "--cpu-bind",
        default="all",
        help="CPU only: cores for vLLM's worker. 'all' (default) gives it every core this process may use, "
        "as our projection gets; 'auto' is vLLM's default (one core reserved for its scheduler)",
    )
    ap.add_argument("--vllm-log", default="ERROR", help="VLLM_LOGGING_LEVEL")
    args = ap.parse_args()
    args.repeats = args.repeats or (2 if args.quick else 3)

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB per engine; two engines are alive at once
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", args.vllm_log)
    cores = sorted(os.sched_getaffinity(0))
    if args.cpu_bind == "all":
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cores)))
    elif args.cpu_bind != "auto":
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", args.cpu_bind)
    import torch
    import vllm

    t0 = time.perf_counter()
    results = []
    for name in args.models:
        _log(f"== {name}")
        results.append(bench_model(name, args))
    known = dict(KNOWN_CONFIGS)
    for r in results:
        known[r["model"]] = json.loads((Path(r["path"]) / "config.json").read_text())
    ceilings = ceiling_table(known)
    print_report(results, ceilings)
    out = {
        "what": "input tokens/s of plain vLLM prefill vs the teacher_cache vLLM hidden-mode caching path",
        "results": results,
        "ceilings": ceilings,
        "known_configs": KNOWN_CONFIGS,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "cores": len(cores),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__,
            "vllm": vllm.__version__,
            "torch_threads": torch.get_num_threads(),
            "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
        },
        "wall_s": time.perf_counter() - t0,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.out} ({out['wall_s']:.0f}s)")


if __name__ == "__main__":
    main()
