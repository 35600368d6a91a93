"""`make bench`: every benchmark, one after the other, then one combined summary.

    .venv/bin/python bench/run_all.py            # full: ~20 minutes on 2 CPU cores (an estimate, below)
    .venv/bin/python bench/run_all.py --quick    # smaller workloads: about 9 minutes, into bench/results/quick/

Each benchmark runs as its own process (vLLM starts worker processes; a fresh interpreter per
benchmark keeps their engines and threads apart) and writes its JSON into bench/results/:
codec.json (bench_codec.py on the bundled chats), codec_prose.json (bench_codec.py on prose
paragraphs from the installed packages' descriptions, metadata_prose.py), codec_entropy.txt and
codec_entropy_prose.txt (codec_entropy.py: the lower bounds docs/CODEC.md quotes), engine_spin.json
(engine_spin.py: vLLM's CPU engine process after a request), throughput.json (bench_throughput.py),
projection.json (bench_projection.py: the hidden path's output projection, per sample vs in blocks)
and train.json (bench_train.py). Their progress and tables stream
through; the summary at the end reads the JSON files back.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from bench_codec_data import cache_dir  # noqa: E402

RESULTS = BENCH / "results"


# start-up chatter of vLLM's engine processes, dropped from stderr unless --verbose
NOISE = re.compile(
    r"Triton is installed|FutureWarning: `torch.distributed.reduce_op`|^\s+(if hasattr|wrapper = lookup)"
    r"|NUMA binding: Using MEMBIND|^Loading safetensors checkpoint shards|^\s*$"
)


def run(script: str, args: list[str], verbose: bool) -> tuple[int, float]:
    cmd = [sys.executable, str(BENCH / script), *args]
    print(f"\n=== {' '.join(cmd)}", file=sys.stderr, flush=True)
    t = time.perf_counter()
    with subprocess.Popen(cmd, cwd=BENCH.parent, stderr=subprocess.PIPE, text=True, errors="replace") as proc:
        for line in proc.stderr:
            if verbose or not NOISE.search(line):
                sys.stderr.write(line)
                sys.stderr.flush()
    return proc.returncode, time.perf_counter() - t


def _fresh(path: Path, since: float) -> bool:
    """Written by this run (a failed benchmark leaves an older file behind)."""
    return path.is_file() and path.stat().st_mtime >= since


def summary(codec_jsons: list[Path], throughput_json: Path, since: float) -> list[str]:
    lines = [f"(not updated by this run: {p})" for p in (*codec_jsons, throughput_json) if not _fresh(p, since)]
    for codec_json in filter(lambda p: _fresh(p, since), codec_jsons):
        c = json.loads(codec_json.read_text())
        lines.append(f"codec ({c['source']}, P={c['positions']}, zstd level {c['zstd_level']}):")
        for r in c["topk"]:
            lines.append(
                f"  top-{r['k']:<3} {r['bytes_per_pos']:6.2f} B/pos (baseline {r['baseline_bytes_per_pos']:6.2f}), "
                f"encode {r['encode_pos_per_s']:>9,.0f} pos/s, decode {r['decode_pos_per_s']:>11,.0f} pos/s"
            )
        s = c["sampled"]
        lines.append(f"  sampled N={s['num_draws']}: {s['bytes_per_pos']:.2f} B/pos")
        by_bound = c["layouts"][0].get("k32_by_error_bound", [])
        if by_bound:
            pairs = ", ".join(f"{r['max_error']:g}: {r['bytes_per_pos']:.1f}" for r in by_bound)
            lines.append(f"  top-32 B/pos by --logprob-error (nats): {pairs}")
        for t in c.get("targets", {}).values():
            ok = "met" if t["met"] else "NOT met"
            lines.append(f"  target {t['target']:,.0f}: {t['value']:,.2f} {ok}")
    if _fresh(throughput_json, since):
        t = json.loads(throughput_json.read_text())
        m = t["machine"]
        lines.append(
            f"throughput (vLLM {m['vllm']}, {m['gpu'] or str(m['cores']) + ' CPU cores'}; input tokens/s; "
            "ratio = caching / plain prefill):"
        )
        for r in t["results"]:
            q = r["ratio_to_prefill"]
            stock = f"{r['stock_tok_s']:,.0f}" if r["stock_tok_s"] else "-"
            lines.append(
                f"  {r['model']:<14} prefill {r['prefill_tok_s']:>8,.0f}  caching {r['caching_tok_s']:>8,.0f}  "
                f"stock {stock:>8}  ratio {r['ratio']:.3f}  ceiling {r['ceiling']:.3f}  "
                f"ratio/ceiling {r['ratio_over_ceiling']:.2f} (at P/T {r['workload']['target_fraction']:.2f}: "
                f"{r['ratio_over_ceiling_workload']:.2f})  encode/prefill {q['encode']:.2f}{_verdict(r)}"
            )
        for c in t["ceilings"]:
            if c["model"] not in {r["model"] for r in t["results"]}:
                lines.append(f"  {c['model']:<14} ceiling {c['ceiling']:.3f} (from its config)")
    return lines


def _verdict(r: dict) -> str:
    """'  target 0.9 of ceiling: met (0.91-0.95 per repeat)', or '' for a JSON from before the field."""
    if "target_met" not in r:
        return ""
    lo, hi = r["ratio_over_ceiling_min_max"]
    ok = "met" if r["target_met"] else "NOT met"
    return f"  target {r['target_over_ceiling']:g} of ceiling: {ok} ({lo:.2f}-{hi:.2f} per repeat)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller workloads")
    ap.add_argument("--verbose", action="store_true", help="keep vLLM's start-up messages on stderr")
    args = ap.parse_args()
    results = RESULTS / "quick" if args.quick else RESULTS  # a quick run never replaces the published figures
    results.mkdir(parents=True, exist_ok=True)
    codec_json, throughput_json = results / "codec.json", results / "throughput.json"
    readme = str(BENCH.parent / "README.md")
    codec_args = ["--out", str(codec_json)]
    codec_args += ["--samples", "60"] if args.quick else ["--readme", readme]
    prose_json = results / "codec_prose.json"
    prose = cache_dir() / "metadata_prose.jsonl"  # depends on the installed packages, kept out of the repo
    prose_args = ["--data", str(prose), "--blocks", "sample", "--out", str(prose_json)]
    prose_args += ["--samples", "20"] if args.quick else ["--readme", readme, "--readme-marker", "CODEC-PROSE"]
    # the lower bounds docs/CODEC.md quotes, on the same arrays as bench_codec.py (cached by then)
    entropy_args = ["--out", str(results / "codec_entropy.txt")] + (["--samples", "60"] if args.quick else [])
    entropy_prose_args = ["--data", str(prose), "--out", str(results / "codec_entropy_prose.txt")]
    entropy_prose_args += ["--samples", "20"] if args.quick else []
    tp_args = ["--out", str(throughput_json)] + (["--quick"] if args.quick else [])
    spin_args = ["--out", str(results / "engine_spin.json")] + (["--repeats", "2"] if args.quick else [])
    projection_args = ["--out", str(results / "projection.json")] + (["--rounds", "2"] if args.quick else [])
    train_json = results / "train.json"
    train_args = ["--out", str(train_json)] + (["--samples", "32", "--repeats", "3"] if args.quick else [])
    since = time.time()
    done = {}
    for label, script, sargs in (
        ("bench_codec.py (chats)", "bench_codec.py", codec_args),
        ("metadata_prose.py", "metadata_prose.py", ["--out", str(prose)]),
        ("bench_codec.py (prose)", "bench_codec.py", prose_args),
        ("codec_entropy.py (chats)", "codec_entropy.py", entropy_args),
        ("codec_entropy.py (prose)", "codec_entropy.py", entropy_prose_args),
        ("engine_spin.py", "engine_spin.py", spin_args),
        ("bench_throughput.py", "bench_throughput.py", tp_args),
        ("bench_projection.py", "bench_projection.py", projection_args),
        ("bench_train.py", "bench_train.py", train_args),
    ):
        done[label] = run(script, sargs, args.verbose)
    print("\n=== summary")
    for label, (rc, secs) in done.items():
        print(f"{label}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {secs:.0f}s")
    for line in summary([codec_json, prose_json], throughput_json, since):
        print(line)
    if train_json.is_file() and train_json.stat().st_mtime >= since:
        print("\nstage two (bench_train.py): step time and peak memory over CE-only, reader over trainer")
        print(
            f"{'pair':<8} {'KD/CE':>7} {'KD+attn/CE':>11} {'reader/trainer':>15} {'peak KD/CE':>11}"
            "   (targets: <=1.10, <=1.30, >=20, <=1.15)"
        )
        for name, r in json.loads(train_json.read_text())["pairs"].items():
            print(
                f"{name:<8} {r['kd_over_ce']:>7.3f} {r['kd_attn_over_ce']:>11.3f} "
                f"{r['reader_over_trainer']:>15.1f} {r['peak_kd_over_ce']:>11.3f}"
            )
    if any(rc for rc, _ in done.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
