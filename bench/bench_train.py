"""Stage-two benchmark: KD step cost over CE-only, reader speed over trainer speed, peak memory.

    python bench/bench_train.py [--pairs tiny smollm] [--out bench/results/train.json]

For each teacher/student pair: cache the bench workload with the teacher (hf backend; 60-160-word
responses, ~290 tokens a sample), then, on the same student, time optimizer steps (forward, losses,
backward, AdamW) for CE only (lam=0), KD (lam=1) and KD + attention loss. Each repeat runs every
mode once on the same batch, in a shuffled order (what one mode leaves behind would otherwise
always bias the same follower); a ratio is the median over repeats of that repeat's ratio (paired),
and the raw times are kept in the JSON. The reader's throughput is the cache -> load_samples ->
collate path alone, after a warm-up pass (the cache is in the page cache: a local disk's best
case, not an object store's), in this process (--num-workers 0, the default) and with 2 workers;
the time to a first batch is kept apart. Peak memory is each mode's peak RSS over its training
steps, in a fresh process per mode. Targets (issue): KD/CE <= 1.10, KD+attn/CE <= 1.30,
reader/trainer >= 20, peak KD/CE <= 1.15.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PAIRS = {"tiny": ("tiny-mixtral", "tiny-mistral", (0, 1)), "smollm": ("smollm2-135m", "smollm2-135m-half", (0, 14))}
MODES = {"ce": dict(lam=0.0), "kd": dict(lam=1.0), "kd+attn": dict(lam=1.0, attn_weight=1.0)}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_cache(teacher: str, layers: tuple[int, ...], workdir: Path, samples: int) -> Path:
    from bench.workload import make_records
    from teacher_cache.run import RunConfig, run

    data = workdir / "data.jsonl"
    with open(data, "w") as f:
        for r in make_records(samples, seed=7, prompt_words=(20, 80), response_words=(60, 160)):
            f.write(json.dumps({"id": r.sample_id, "messages": r.messages}) + "\n")
    out = workdir / f"cache-{teacher}"
    log(f"caching {samples} samples with {teacher} ...")
    run(
        RunConfig(
            teacher=teacher,
            data=(str(data),),
            out=str(out),
            backend="hf",
            top_k=32,
            attention_layers=layers,
            attention_top_k=16,
            max_length=512,
            shard_size=32,
            progress=False,
        )
    )
    return out


def setup(student: str, cache: Path, mode: str, batch_size: int):
    import torch
    from transformers import AutoModelForCausalLM

    from student_train.checks import attention_layer_map
    from student_train.data import Plan, SampleStream, collate
    from student_train.train import DistillStep, TrainConfig
    from teacher_cache import attention, open_cache
    from teacher_cache.models import resolve_model

    caches = [open_cache(cache)]
    cfg = TrainConfig(student=student, caches=(str(cache),), out="-", **MODES[mode])
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model(student).path,
        dtype=torch.float32,
        attn_implementation=attention.register() if mode == "kd+attn" else "sdpa",
    )
    layer_map = attention_layer_map(cfg.attention_layer_map, caches, model.config) if cfg.wants_attention else []
    step = DistillStep(model, cfg, caches[0].kind, layer_map)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    plan = Plan(caches, seed=0)
    stream = iter(SampleStream(caches, plan, rank=0, world=1, start=0, window=4))
    batches = [
        collate([next(stream) for _ in range(batch_size)], plan.domain_caches, attention=bool(layer_map))
        for _ in range(4)
    ]
    return step, optimizer, batches


def one_step(step, optimizer, batch) -> float:
    t0 = time.perf_counter()
    step(batch)["loss"].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def time_modes(student: str, cache: Path, batch_size: int, repeats: int) -> dict:
    """-> raw step times per mode (lists, repeat by repeat), paired median ratios and batch size in tokens."""
    built = {m: setup(student, cache, m, batch_size) for m in MODES}
    for step, opt, batches in built.values():  # warm-up
        one_step(step, opt, batches[0])
    times: dict[str, list[float]] = {m: [] for m in MODES}
    order = list(MODES)
    rng = random.Random(0)
    for r in range(repeats):
        rng.shuffle(order)  # every mode on the same batch, in a new order each repeat
        for m in order:
            step, opt, batches = built[m]
            times[m].append(one_step(step, opt, batches[r % len(batches)]))
        log(f"  repeat {r + 1}/{repeats}: " + ", ".join(f"{m} {times[m][-1]:.2f}s" for m in MODES))
    ratios = {m: [t / c for t, c in zip(times[m], times["ce"], strict=True)] for m in ("kd", "kd+attn")}
    return {
        "step_s": times,
        "kd_over_ce": statistics.median(ratios["kd"]),
        "kd_attn_over_ce": statistics.median(ratios["kd+attn"]),
        "ratio_range": {m: [min(v), max(v)] for m, v in ratios.items()},
        "tokens_per_batch": statistics.mean(b.tokens for b in built["ce"][2]),
    }


def reader_rate(cache: Path, batch_size: int, batches: int, num_workers: int) -> tuple[float, float]:
    """-> (samples/s of load_samples -> collate after the first batch, seconds to the first batch)."""
    from student_train.data import Plan, collate, load_samples
    from teacher_cache import open_cache

    caches = [open_cache(cache)]
    plan = Plan(caches, seed=1)
    t0 = time.perf_counter()
    stream = load_samples(caches, plan, rank=0, world=1, start=0, window=4, num_workers=num_workers)
    collate([next(stream) for _ in range(batch_size)], plan.domain_caches, attention=True)
    t1 = time.perf_counter()
    for _ in range(batches):
        collate([next(stream) for _ in range(batch_size)], plan.domain_caches, attention=True)
    rate = batches * batch_size / (time.perf_counter() - t1)
    del stream  # its workers end here
    return rate, t1 - t0


def _vm_hwm_mb() -> float | None:
    """This process's peak resident memory (VmHWM) in MB, or None off Linux."""
    try:
        line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) / 1024


def peak_rss_child(student: str, cache: str, mode: str, batch_size: int, steps: int) -> None:
    """Peak resident memory over the training steps only: the model load peaks above any step on
    CPU, so the process peak (ru_maxrss) is the same in every mode. Linux resets the peak (VmHWM)
    to the current use with `5` in /proc/self/clear_refs; elsewhere the process peak is reported."""
    step, opt, batches = setup(student, Path(cache), mode, batch_size)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    for i in range(steps):
        one_step(step, opt, batches[i % len(batches)])
    peak = _vm_hwm_mb() if reset else None
    if peak is None:  # the process peak, model load included: not comparable across modes
        peak, over = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "whole process"
    else:
        over = "training steps"
    print(json.dumps({"peak_rss_mb": peak, "peak_over": over}))


def peak_rss(student: str, cache: Path, mode: str, batch_size: int) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--child", student, str(cache), mode, str(batch_size)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default="bench/results/train.json")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        student, cache, mode, bs = args.child
        peak_rss_child(student, cache, mode, int(bs), steps=3)
        return
    import torch

    results = {"torch_threads": torch.get_num_threads(), "batch_size": args.batch_size, "pairs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.pairs:
            teacher, student, layers = PAIRS[name]
            cache = make_cache(teacher, layers, Path(tmp), args.samples)
            log(f"{name}: timing steps of {student} (ce, kd, kd+attn interleaved) ...")
            t = time_modes(student, cache, args.batch_size, args.repeats)
            trainer_rate = args.batch_size / statistics.median(t["step_s"]["kd"])
            n = max(8, 2 * args.samples // args.batch_size)  # batches: twice through the cache
            reader_rate(cache, args.batch_size, n, num_workers=0)  # warm-up: the shards into the page cache
            readers = {w: reader_rate(cache, args.batch_size, n, num_workers=w) for w in (0, 2)}
            reader = readers[0][0]
            log(f"{name}: peak memory per mode (fresh process each) ...")
            rss = {m: peak_rss(student, cache, m, args.batch_size) for m in MODES}
            results["pairs"][name] = {
                "teacher": teacher,
                "student": student,
                "tokens_per_batch": t["tokens_per_batch"],
                "step_s": t["step_s"],  # raw, repeat by repeat
                "kd_over_ce": t["kd_over_ce"],  # median over repeats of the repeat's ratio
                "kd_attn_over_ce": t["kd_attn_over_ce"],
                "ratio_range": t["ratio_range"],
                "reader_samples_per_s": reader,
                "reader_samples_per_s_2_workers": readers[2][0],
                "reader_first_batch_s": {str(w): r[1] for w, r in readers.items()},
                "trainer_samples_per_s": trainer_rate,
                "reader_over_trainer": reader / trainer_rate,
                "peak_rss_mb": rss,
                "peak_kd_over_ce": rss["kd"] / rss["ce"],
                "peak_kd_attn_over_ce": rss["kd+attn"] / rss["ce"],
            }
    print(
        f"{'pair':<8} {'KD/CE':>19} {'KD+attn/CE':>19} {'reader/trainer':>15} {'peak KD/CE':>11} "
        f"{'peak KD+attn/CE':>16}   (targets: <=1.10, <=1.30, >=20, <=1.15; ratios: median [min-max] of repeats)"
    )
    for name, r in results["pairs"].items():
        span = {m: "{:.3f} [{:.2f}-{:.2f}]".format(r[key], *r["ratio_range"][m])
                for m, key in (("kd", "kd_over_ce"), ("kd+attn", "kd_attn_over_ce"))}  # fmt: skip
        print(
            f"{name:<8} {span['kd']:>19} {span['kd+attn']:>19} {r['reader_over_trainer']:>15.1f} "
            f"{r['peak_kd_over_ce']:>11.3f} {r['peak_kd_attn_over_ce']:>16.3f}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
