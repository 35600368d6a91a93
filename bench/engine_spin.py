"""vLLM's CPU engine process after a request: the CPU it burns, and what that costs the work after it.

    .venv/bin/python bench/engine_spin.py [--model tiny-mixtral] [--repeats 5] [--out FILE]

Runs itself twice, as a child process per mode: `process` (VLLM_ENABLE_V1_MULTIPROCESSING=1, the
engine and its worker in processes of their own: vLLM's default, and what a GPU or
--tensor-parallel-size > 1 gets) and `inproc` (=0, the engine in the calling process: what
VllmBackend does on CPU with one rank). In each, on one batch of the bench workload with the
hidden-mode engine:

- burn: CPU seconds used in each 0.1 s after an encode call returns, while the caller's thread
  sleeps, by the engine's processes (`process`) or by this process, whose other threads are the
  engine's (`inproc`; a sleeping caller uses none);
- the caller's projection + top-k of that batch (what `teacher-cache run` does after every
  encode), timed right after an encode call and after 2 s idle; the ratio is the slowdown.

Progress goes to stderr, the table to stdout, JSON to --out. docs/BENCHMARKS.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = {"process": "1", "inproc": "0"}


def _cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def measure(model: str, repeats: int) -> dict:
    """In this process, under the mode its environment sets."""
    import torch

    from bench.workload import make_records
    from teacher_cache.backends.vllm_backend import VllmBackend
    from teacher_cache.models import resolve_model
    from teacher_cache.targets import topk_from_logits
    from teacher_cache.tokenize import load_tokenizer, tokenize_record
    from tests.procs import descendants  # the tests' /proc walk

    ref = resolve_model(model)
    tok = load_tokenizer(ref.path)
    batch = [tokenize_record(tok, r, 2048) for r in make_records(16, 0)]
    prompts = [{"prompt_token_ids": s.input_ids.tolist()} for s in batch]
    backend = VllmBackend(ref, mode="hidden", top_k=32, max_model_len=2048, seed=0, in_process=True)  # unless env says
    try:
        engines = [p for p in descendants(os.getpid()) if b"resource_tracker" not in _cmdline(p)]

        def encode():
            return backend.llm.encode(prompts, pooling_task="token_embed", use_tqdm=False)

        outs = encode()
        hs = [o.outputs.data[torch.from_numpy(s.target_positions)].float() for s, o in zip(batch, outs, strict=True)]

        def after_encode() -> float:  # the caller's work on the batch: projection + top-k, as run() does
            t = time.perf_counter()
            for h in hs:
                topk_from_logits(h @ backend.weight.T, 32, inplace=True)
            return time.perf_counter() - t

        after_encode()
        burn: list[list[float]] = []
        idle, busy = [], []
        for r in range(repeats):
            time.sleep(2)
            idle.append(after_encode())
            encode()
            busy.append(after_encode())
            time.sleep(2)
            encode()
            inproc = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
            watched = [*engines, os.getpid()] if inproc else engines  # inproc: the engine's threads are ours
            steps, before = [], _cpu_seconds(watched)
            for _ in range(15):
                time.sleep(0.1)
                now = _cpu_seconds(watched)
                steps.append(round(now - before, 3))
                before = now
            burn.append(steps)
            print(f"  repeat {r + 1}/{repeats}: idle {idle[-1]:.3f}s, after encode {busy[-1]:.3f}s", file=sys.stderr)
    finally:
        backend.close()
    per_step = [statistics.median(col) for col in zip(*burn, strict=True)]
    return {
        "engine_processes": len(engines),
        "burn_cpu_s_per_100ms_after_encode": per_step,
        "burn_cpu_s_in_1_5s": round(sum(per_step), 3),
        "work_idle_s": statistics.median(idle),
        "work_after_encode_s": statistics.median(busy),
        "slowdown": statistics.median(busy) / statistics.median(idle),
    }


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-mixtral")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None, help="JSON file to write")
    ap.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.model, args.repeats)))
        return
    results = {}
    for mode, flag in MODES.items():
        print(f"{args.model}, engine mode {mode} ...", file=sys.stderr, flush=True)
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": flag}
        cmd = [sys.executable, __file__, "--child", mode, "--model", args.model, "--repeats", str(args.repeats)]
        done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True)
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{'mode':<8} {'engine procs':>12} {'engine CPU s in 1.5 s after':>28} {'work idle':>10} "
          f"{'after encode':>13} {'slowdown':>9}")  # fmt: skip
    for mode, r in results.items():
        print(
            f"{mode:<8} {r['engine_processes']:>12} {r['burn_cpu_s_in_1_5s']:>28.2f} {r['work_idle_s']:>9.3f}s "
            f"{r['work_after_encode_s']:>12.3f}s {r['slowdown']:>9.2f}"
        )
    if args.out:
        machine = {"cores": len(os.sched_getaffinity(0)), "python": sys.version.split()[0]}
        args.out.write_text(json.dumps({"model": args.model, "machine": machine, "modes": results}, indent=2) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
