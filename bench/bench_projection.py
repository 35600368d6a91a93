"""The output projection of the vLLM hidden path: a matmul per sample vs project_in_blocks.

    .venv/bin/python bench/bench_projection.py [--model smollm2-135m] [--block 512] [--rounds 6]
        [--batches 6] [--out FILE]

The hidden path gets each sample's final hidden states at its target positions [P, D] and needs
its logits [P, V] = h @ W.T, then the shipped top-k (targets.topk_from_logits(k=32, inplace=True)).
Before, one matmul per sample read the whole [V, D] head for ~100 rows; `project_in_blocks` (the
shipped path) lets consecutive samples share a matmul of up to --block rows. Both arms run on the
model's real output head, with random hidden states (the cost does not depend on their values) of
the bench data's sizes (P uniform in [63, 177], 16 samples a batch), batch by batch in alternating
order; each round sums its batches, the ratio (per sample / blocks) is taken per round, and the
median and range over rounds are reported. The logits of both arms are also compared.

Progress goes to stderr, the verdict to stdout, JSON to --out (default bench/results/projection.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def output_head(model: str) -> torch.Tensor:
    """The preset's output projection float32 [V, D] (built on first use)."""
    from safetensors.torch import load_file

    from teacher_cache.models import resolve_model, weight_files

    weights: dict[str, torch.Tensor] = {}
    for f in weight_files(resolve_model(model).path):
        weights.update(load_file(f))
    head = weights.get("lm_head.weight", weights.get("model.embed_tokens.weight"))  # tied: the embeddings
    return head.float().contiguous()


def main() -> None:
    from teacher_cache.backends import project_in_blocks
    from teacher_cache.targets import topk_from_logits

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--block", type=int, default=512, help="rows per shared matmul (shipped: 512)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "projection.json"))
    args = ap.parse_args()

    W = output_head(args.model)  # float32 [V, D]
    g = torch.Generator().manual_seed(0)
    batches = [  # per batch, per sample: hidden rows float32 [P, D]
        [torch.randn(int(torch.randint(63, 178, (1,), generator=g)), W.shape[1], generator=g) for _ in range(16)]
        for _ in range(args.batches)
    ]
    diff = max(
        float((a - (h @ W.T)).abs().max())
        for hs in batches[:1]
        for h, a in zip(hs, project_in_blocks(hs, W, args.block), strict=True)
    )

    def per_sample(hs: list[torch.Tensor]) -> None:
        for h in hs:
            topk_from_logits(h @ W.T, 32, inplace=True)

    def blocks(hs: list[torch.Tensor]) -> None:
        for logits in project_in_blocks(hs, W, args.block):
            topk_from_logits(logits, 32, inplace=True)

    arms = [("per_sample", per_sample), ("blocks", blocks)]
    for _, fn in arms:  # warm-up
        fn(batches[0])
    rounds = []
    for r in range(args.rounds):
        t = dict.fromkeys(("per_sample", "blocks"), 0.0)
        for bi, hs in enumerate(batches):
            for name, fn in arms if (bi + r) % 2 else arms[::-1]:
                t0 = time.perf_counter()
                fn(hs)
                t[name] += time.perf_counter() - t0
        rounds.append({**t, "ratio": t["per_sample"] / t["blocks"]})
        print(f"round {r + 1}/{args.rounds}: per sample {t['per_sample']:.2f}s, blocks {t['blocks']:.2f}s, "
              f"ratio {rounds[-1]['ratio']:.2f}", file=sys.stderr, flush=True)  # fmt: skip
    ratios = [r["ratio"] for r in rounds]
    result = {
        "model": args.model,
        "vocab": W.shape[0],
        "hidden": W.shape[1],
        "block_rows": args.block,
        "batches": args.batches,
        "rows": sum(len(h) for hs in batches for h in hs),
        "torch_threads": torch.get_num_threads(),
        "rounds": rounds,
        "ratio_per_sample_over_blocks_median": statistics.median(ratios),
        "ratio_min_max": [min(ratios), max(ratios)],
        "max_abs_logit_diff": diff,
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.model}: projection + top-k, a matmul per sample / project_in_blocks ({args.block} rows): "
          f"{result['ratio_per_sample_over_blocks_median']:.2f} (per round {min(ratios):.2f}-{max(ratios):.2f}), "
          f"max |logit diff| {diff:.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
