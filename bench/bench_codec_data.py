"""Real teacher distributions for bench_codec.py: SmolLM2-135M-Instruct on the bundled chats.

    python bench/bench_codec_data.py [--samples N]     # compute (or load) and print a summary

Runs the `smollm2-135m` preset (real weights, built on first use) with transformers on CPU
over teacher_cache/sample_data/instructions.jsonl, tokenised exactly as `teacher-cache run`
does (chat template, target positions = assistant tokens), and keeps, per sample, what a real
cache stores: top-128 ids / log-probs / tail (targets.topk_from_logits), 50 sampled draws
(targets.sampled_from_logits, seeded per sample) and the true next tokens input_ids[t + 1].
Smaller k are prefixes of the top-128 with the tail recomputed in fp64.

The arrays (~25 MB) are cached as an .npz under $TEACHER_CACHE_HOME/bench (default
~/.cache/teacher-cache/bench), keyed by model, data file, settings, the code that makes them and the
torch / transformers / gguf / numpy versions, outside the repository.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "teacher_cache" / "sample_data" / "instructions.jsonl"
MODEL = "smollm2-135m"
KMAX = 128
NUM_DRAWS = 50


def cache_dir() -> Path:
    home = Path(os.environ.get("TEACHER_CACHE_HOME", Path.home() / ".cache" / "teacher-cache"))
    return home / "bench"


# What the arrays depend on besides the model, data and settings: the code that reads, tokenises
# and reduces the logits (this file included) and the libraries whose numerics make the logits.
KEY_SOURCES = (
    "bench/bench_codec_data.py",
    "teacher_cache/records.py",
    "teacher_cache/tokenize.py",
    "teacher_cache/targets.py",
)
KEY_PACKAGES = ("torch", "transformers", "gguf", "numpy")


def _key(model_path: str, data: Path, samples: int | None) -> str:
    """A change to any input of `compute` (code and library versions included) gives another key,
    so a stale .npz is never reused."""
    from importlib.metadata import PackageNotFoundError, version

    h = hashlib.sha256()
    h.update(f"v2|{model_path}|{samples}|{KMAX}|{NUM_DRAWS}|".encode())
    h.update(data.read_bytes())
    for src in KEY_SOURCES:
        h.update((ROOT / src).read_bytes())
    for pkg in KEY_PACKAGES:
        try:
            h.update(f"|{pkg}={version(pkg)}".encode())
        except PackageNotFoundError:
            h.update(f"|{pkg}=none".encode())
    return h.hexdigest()[:16]


def compute(samples: int | None = None, *, data: Path = DATA, verbose: bool = True) -> dict:
    """-> dict of flat arrays: ids int32 [P, 128], lps float32 [P, 128], tail float32 [P]
    (tail of the top-128), next int32 [P], starts int64 [S+1] (sample s owns rows
    starts[s]:starts[s+1]), sampled offsets int64 [P+1] / ids int32 [N] / counts int32 [N],
    vocab int. Cached on disk after the first call."""
    import torch

    from teacher_cache.models import resolve_model
    from teacher_cache.records import iter_records
    from teacher_cache.targets import sampled_from_logits, topk_from_logits
    from teacher_cache.tokenize import load_tokenizer, tokenize_record

    ref = resolve_model(MODEL)
    path = cache_dir() / f"smollm2_chats_{_key(ref.path, data, samples)}.npz"
    if path.is_file():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    from transformers import AutoModelForCausalLM

    t0 = time.time()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    tok = load_tokenizer(ref.path)
    model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=torch.float32).eval()
    V = int(model.config.vocab_size)
    recs = list(iter_records([str(data)], skip_bad=False))[:samples]
    ids, lps, tails, nxt, starts = [], [], [], [], [0]
    s_off, s_ids, s_cnt, n_rows = [np.zeros(1, np.int64)], [], [], 0
    with torch.no_grad():
        for i, rec in enumerate(recs):
            tk = tokenize_record(tok, rec, 2048)
            x = torch.from_numpy(tk.input_ids)[None]  # [1, T]
            logits = model(x).logits[0, torch.from_numpy(tk.target_positions)].float()  # [P, V]
            top = topk_from_logits(logits, KMAX)
            gen = torch.Generator().manual_seed(i)
            s = sampled_from_logits(logits, NUM_DRAWS, gen)
            ids.append(top.ids.astype(np.int32))
            lps.append(top.logprobs)
            tails.append(top.tail_logprob)
            nxt.append(tk.input_ids[tk.target_positions + 1].astype(np.int32))
            starts.append(starts[-1] + len(tk.target_positions))
            s_off.append(s.offsets[1:] + n_rows)
            n_rows += len(s.ids)
            s_ids.append(s.ids.astype(np.int32))
            s_cnt.append(s.counts.astype(np.int32))
            if verbose and (i + 1) % 40 == 0:
                done = f"{i + 1}/{len(recs)} samples, {starts[-1]} positions"
                print(f"  {done}, {time.time() - t0:.0f}s", file=sys.stderr)
    out = {
        "ids": np.concatenate(ids),
        "lps": np.concatenate(lps),
        "tail": np.concatenate(tails),
        "next": np.concatenate(nxt),
        "starts": np.array(starts, np.int64),
        "s_offsets": np.concatenate(s_off),
        "s_ids": np.concatenate(s_ids),
        "s_counts": np.concatenate(s_cnt),
        "vocab": np.array(V),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **out)
    tmp.replace(path)
    if verbose:
        print(f"computed {len(recs)} samples in {time.time() - t0:.0f}s -> {path}", file=sys.stderr)
    return out


def input_tokens(samples: int | None = None, *, data: Path = DATA) -> np.ndarray:
    """The token each target position reads, input_ids[t], int64 [P] in compute()'s row order
    (tokenizer only, no model: the reader of a cache has these)."""
    from teacher_cache.models import resolve_model
    from teacher_cache.records import iter_records
    from teacher_cache.tokenize import load_tokenizer, tokenize_record

    tok = load_tokenizer(resolve_model(MODEL).path)
    recs = list(iter_records([str(data)], skip_bad=False))[:samples]
    return np.concatenate([(tk := tokenize_record(tok, r, 2048)).input_ids[tk.target_positions] for r in recs])


def topk_prefix(ids: np.ndarray, lps: np.ndarray, tail: np.ndarray, k: int):
    """Top-k from the top-128: ids int64 [P, k], log-probs float32 [P, k], tail float32 [P]
    = log(exp(tail128) + sum of exp(lp) of ranks k..127), in fp64."""
    rest = np.concatenate([lps[:, k:].astype(np.float64), tail[:, None].astype(np.float64)], 1)  # [P, 129-k]
    m = rest.max(1, keepdims=True)  # [P, 1]
    fin = np.isfinite(m[:, 0])
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(fin, m[:, 0] + np.log(np.exp(rest - np.where(fin[:, None], m, 0)).sum(1)), -np.inf)
    return ids[:, :k].astype(np.int64), np.ascontiguousarray(lps[:, :k]), t.astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=None, help="first N chats (default all)")
    args = ap.parse_args()
    d = compute(args.samples)
    st = d["starts"]
    P = int(st[-1])
    hit = (d["ids"][:, :32] == d["next"][:, None]).any(1).mean()
    p1 = np.exp(d["lps"][:, 0])
    print(
        f"{len(st) - 1} samples, {P} positions (per sample: mean {np.diff(st).mean():.1f}, "
        f"median {np.median(np.diff(st)):.0f}), V={int(d['vocab'])}; next token in top-32: {hit:.1%}; "
        f"top-1 prob quantiles 10/50/90%: {np.quantile(p1, [0.1, 0.5, 0.9]).round(2).tolist()}"
    )


if __name__ == "__main__":
    main()
