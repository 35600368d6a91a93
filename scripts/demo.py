"""`make demo`: a real teacher, cached once, teaches a smaller student, on CPU, in minutes.

Runs the public commands, as a user would: split the bundled sample (teacher_cache/sample_data)
into train and held-out files, `teacher-cache run` the teacher (SmolLM2-135M-Instruct, real
weights) over both, `student-train train` the derived half-depth student from the train cache,
`student-train eval` it before and after on the held-out cache, and print a summary.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from run_dir import start_over
from run_dir import step as run_step

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "teacher_cache" / "sample_data" / "instructions.jsonl"
BIN = Path(sys.executable).parent


def step(title: str, args: list) -> None:
    print(f"   ({run_step(title, args, 'demo'):.0f}s)", flush=True)


def split(data: Path, out: Path, heldout_every: int) -> tuple[Path, Path]:
    """Deterministic split by id hash: about 1 in `heldout_every` records is held out."""
    out.mkdir(parents=True, exist_ok=True)
    train, held = out / "train.jsonl", out / "heldout.jsonl"
    with open(data) as f, open(train, "w") as tr, open(held, "w") as he:
        for line in f:
            rec = json.loads(line)
            h = int(hashlib.sha256(rec["id"].encode()).hexdigest(), 16)
            (he if h % heldout_every == 0 else tr).write(line)
    return train, held


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default="smollm2-135m", help="teacher preset or checkpoint (%(default)s)")
    ap.add_argument("--student", default="smollm2-135m-half", help="student preset or checkpoint (%(default)s)")
    ap.add_argument("--out", default="runs/demo", help="where everything goes; made anew (%(default)s)")
    ap.add_argument("--steps", type=int, default=40, help="training steps (%(default)s)")
    ap.add_argument("--top-k", type=int, default=32, help="k of the cached targets (%(default)s)")
    args = ap.parse_args()
    out = Path(args.out)
    start_over(out, "demo")  # only a folder this script made is ever deleted
    train_data, held_data = split(DATA, out / "data", heldout_every=8)
    tc, st = BIN / "teacher-cache", BIN / "student-train"
    common = ["--teacher", args.teacher, "--top-k", args.top_k, "--max-length", 384]
    step(
        "cache the teacher on the training split",
        [tc, "run", *common, "--data", train_data, "--out", out / "cache-train"],
    )
    step(
        "cache the teacher on the held-out split",
        [tc, "run", *common, "--data", held_data, "--out", out / "cache-heldout"],
    )
    step("what the cache holds", [tc, "inspect", out / "cache-train"])
    step(
        "evaluate the untrained student",
        [st, "eval", "--model", args.student, "--cache", out / "cache-heldout", "--out", out / "eval-before.json"],
    )
    step(
        "train the student from the cache (the teacher is not loaded)",
        [
            st,
            "train",
            "--student",
            args.student,
            "--cache",
            out / "cache-train",
            "--out",
            out / "run",
            "--max-steps",
            args.steps,
            "--batch-size",
            4,
            "--lr",
            "3e-4",
            "--warmup-steps",
            4,
            "--save-every",
            args.steps,
        ],
    )
    step(
        "evaluate the trained student",
        [
            st,
            "eval",
            "--model",
            out / "run" / f"checkpoint-{args.steps}",
            "--cache",
            out / "cache-heldout",
            "--out",
            out / "eval-after.json",
        ],
    )
    step("plot the training curves", [st, "plot", out / "run"])
    before = json.loads((out / "eval-before.json").read_text())["all"]
    after = json.loads((out / "eval-after.json").read_text())["all"]
    print(f"\n== summary (held-out, {after['positions']} target positions)")
    print(f"{'':<28}{'before':>10}{'after':>10}")
    for key, name in (
        ("kl_to_teacher", "KL to teacher (nats)"),
        ("nll", "NLL of responses (nats)"),
        ("top1_agreement", "top-1 agreement"),
    ):
        print(f"{name:<28}{before[key]:>10.4f}{after[key]:>10.4f}")
    print(f"\ncurves: {out / 'run' / 'curves.png'}; checkpoint: {out / 'run' / f'checkpoint-{args.steps}'}")


if __name__ == "__main__":
    main()
