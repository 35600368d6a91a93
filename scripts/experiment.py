"""`make experiment`: plain fine-tuning vs KD (top-k, +attention, sampled) vs DAE, on CPU.

Every number comes from the public commands (`teacher-cache run`, `student-train train/eval`),
run by this script; the table is generated, never typed. Teacher: SmolLM2-135M-Instruct;
student: its half-depth derivative; data: the bundled sample, split into train and held-out,
domain "science" against "general". Writes runs/experiment/results.json and, with the default
settings (or --write-docs), the table into docs/EXPERIMENTS.md and README.md between the RESULTS
markers. --out is deleted first only if this script made it.

Rows, same student initialisation, data and step budget:
  1 ce          plain fine-tuning on the responses (lam=0)
  2 kd-topk     KD, top-k targets, prediction loss only
  3 kd-attn     KD, top-k targets + attention loss (teacher layers 14, 28 -> student 7, 14)
  4 kd-sampled  KD, sampled targets (50 draws)
  5 dae-control from row 2's checkpoint, --dae-steps more: science and general samples mixed at
                the data's science share, all against the teacher (the DAE row without the expert)
  6 dae         the same start, steps and mix, but science samples against a science expert (the
                teacher fine-tuned on the science training split by this script), general samples
                against the teacher as reference model
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from run_dir import start_over, step

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "teacher_cache" / "sample_data" / "instructions.jsonl"
BIN = Path(sys.executable).parent
TC, ST = str(BIN / "teacher-cache"), str(BIN / "student-train")
DOMAIN = "science"


def sh(title: str, args: list) -> float:
    return step(title, args, "experiment")


def split(out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    train, held = out / "train.jsonl", out / "heldout.jsonl"
    with open(DATA) as f, open(train, "w") as tr, open(held, "w") as he:
        for line in f:
            h = int(hashlib.sha256(json.loads(line)["id"].encode()).hexdigest(), 16)
            (he if h % 6 == 0 else tr).write(line)
    return train, held


def cache_bytes(path: Path) -> int:
    return sum(s["bytes"] for s in json.loads((path / "manifest.json").read_text())["shards"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default="smollm2-135m", help="teacher preset or checkpoint (%(default)s)")
    ap.add_argument("--student", default="smollm2-135m-half", help="student preset or checkpoint (%(default)s)")
    ap.add_argument("--out", default="runs/experiment", help="where caches and runs go (%(default)s)")
    ap.add_argument("--steps", type=int, default=40, help="training steps of each main arm (%(default)s)")
    ap.add_argument("--dae-steps", type=int, default=20, help="steps of the DAE phase (%(default)s)")
    ap.add_argument("--expert-steps", type=int, default=20, help="steps that fine-tune the domain expert (%(default)s)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per seed (%(default)s)")
    ap.add_argument("--max-length", type=int, default=384, help="tokens per sample (%(default)s)")
    ap.add_argument(
        "--write-docs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="put the table into README.md and docs/EXPERIMENTS.md (default: only with the default settings)",
    )
    args = ap.parse_args()
    defaults = vars(ap.parse_args([]))
    changed = [k for k in ("teacher", "student", "steps", "dae_steps", "expert_steps", "seeds", "max_length")
               if getattr(args, k) != defaults[k]]  # fmt: skip
    write = args.write_docs if args.write_docs is not None else not changed
    out = Path(args.out)
    start_over(out, "experiment")  # only a folder this script made is ever deleted
    train, held = split(out / "data")
    base = ["--teacher", args.teacher, "--max-length", args.max_length, "--no-progress"]
    walls: dict[str, float] = {}

    # ---- stage one: caches
    c = {k: out / f"cache-{k}" for k in ("topk", "attn", "sampled", "held-sci", "held-gen")}
    walls["cache-topk"] = sh("cache top-k", [TC, "run", *base, "--data", train, "--out", c["topk"], "--top-k", 32])
    walls["cache-attn"] = sh(
        "cache top-k + attention",
        [TC, "run", *base, "--data", train, "--out", c["attn"], "--top-k", 32, "--attention-layers", "14,28"],
    )
    walls["cache-sampled"] = sh(
        "cache sampled",
        [TC, "run", *base, "--data", train, "--out", c["sampled"], "--targets", "sampled", "--num-draws", 50],
    )
    sh("cache held-out science", [TC, "run", *base, "--data", held, "--out", c["held-sci"], "--only-domain", DOMAIN])
    sh("cache held-out general", [TC, "run", *base, "--data", held, "--out", c["held-gen"], "--exclude-domain", DOMAIN])
    held_caches = ["--cache", c["held-sci"], "--cache", c["held-gen"]]

    def train_run(
        name: str, seed: int, cache_args: list, extra: list, student: str | Path | None = None, steps: int | None = None
    ) -> dict:
        run_dir = out / f"{name}-seed{seed}"
        n = steps or args.steps
        wall = sh(
            f"train {name} (seed {seed})",
            [
                ST,
                "train",
                "--student",
                student or args.student,
                *cache_args,
                "--out",
                run_dir,
                "--max-steps",
                n,
                "--batch-size",
                4,
                "--lr",
                "3e-4",
                "--warmup-steps",
                4,
                "--save-every",
                n,
                "--seed",
                seed,
                "--no-progress",
                *extra,
            ],
        )
        sh(
            f"eval {name} (seed {seed})",
            [ST, "eval", "--model", run_dir / f"checkpoint-{n}", *held_caches, "--out", run_dir / "eval.json"],
        )
        return {
            "eval": json.loads((run_dir / "eval.json").read_text()),
            "train_wall_s": wall,
            "checkpoint": str(run_dir / f"checkpoint-{n}"),
        }

    results: dict = {"config": vars(args), "rows": {}, "walls": walls}
    sh(
        "eval the untrained student",
        [ST, "eval", "--model", args.student, *held_caches, "--out", out / "eval-init.json"],
    )
    results["init"] = json.loads((out / "eval-init.json").read_text())
    rows = {
        "ce": ("plain fine-tuning (CE on responses)", ["--cache", c["topk"]], ["--lam", 0], "topk"),
        "kd-topk": ("KD, top-k", ["--cache", c["topk"]], [], "topk"),
        "kd-attn": (
            "KD, top-k + attention",
            ["--cache", c["attn"]],
            ["--attn-weight", 1.0, "--attention-layer-map", "14:7,28:14"],
            "attn",
        ),
        "kd-sampled": ("KD, sampled", ["--cache", c["sampled"]], [], "sampled"),
    }
    for key, (label, cache_args, extra, cache_key) in rows.items():
        results["rows"][key] = {
            "label": label,
            "cache_bytes": cache_bytes(c[cache_key]),
            "cache_wall_s": walls[f"cache-{cache_key}"],
            "seeds": {},
        }
        for seed in args.seeds:
            results["rows"][key]["seeds"][seed] = train_run(key, seed, cache_args, extra)

    # ---- DAE: a science expert (the teacher fine-tuned on the science training split), the teacher
    # itself as the reference model for general samples; continue from row 2's checkpoint
    expert_data = out / "data" / "train-science.jsonl"
    train_lines = train.read_text().splitlines(keepends=True)
    expert_data.write_text("".join(line for line in train_lines if json.loads(line).get("domain") == DOMAIN))
    sh(
        "cache the teacher on the science split (for the expert's CE fine-tuning)",
        [TC, "run", *base, "--data", expert_data, "--out", out / "cache-expert-ft", "--top-k", 1],
    )
    expert_dir = out / "expert"
    walls["expert"] = sh(
        "fine-tune the science expert (CE)",
        [
            ST,
            "train",
            "--student",
            args.teacher,
            "--cache",
            out / "cache-expert-ft",
            "--out",
            expert_dir,
            "--max-steps",
            args.expert_steps,
            "--batch-size",
            4,
            "--lr",
            "1e-4",
            "--lam",
            0,
            "--warmup-steps",
            2,
            "--save-every",
            args.expert_steps,
            "--no-progress",
        ],
    )
    expert = expert_dir / f"checkpoint-{args.expert_steps}"
    walls["cache-dae"] = sh(
        "cache the expert on science",
        [
            TC,
            "run",
            "--teacher",
            expert,
            "--max-length",
            args.max_length,
            "--no-progress",
            "--data",
            train,
            "--out",
            out / "cache-dae-expert",
            "--only-domain",
            DOMAIN,
            "--source",
            "science-expert",
            "--top-k",
            32,
        ],
    )
    walls["cache-dae"] += sh(
        "cache the reference on general",
        [
            TC,
            "run",
            *base,
            "--data",
            train,
            "--out",
            out / "cache-dae-ref",
            "--exclude-domain",
            DOMAIN,
            "--source",
            "reference",
            "--top-k",
            32,
        ],
    )
    # control for DAE: the same mix, start and steps, but the teacher itself on science too, so
    # the difference between the two rows is the expert's targets and nothing else
    walls["cache-control"] = sh(
        "cache the teacher on science (DAE control)",
        [
            TC,
            "run",
            *base,
            "--data",
            train,
            "--out",
            out / "cache-control-sci",
            "--only-domain",
            DOMAIN,
            "--top-k",
            32,
        ],
    )
    share = sum(json.loads(line).get("domain") == DOMAIN for line in train_lines) / len(train_lines)
    reference = out / "cache-dae-ref"
    for key, label, science, wall in (
        (
            "dae-control",
            f"control: KD top-k, same mix, teacher on science (+{args.dae_steps} steps)",
            out / "cache-control-sci",
            walls["cache-control"],
        ),
        ("dae", f"DAE from KD top-k (+{args.dae_steps} steps)", out / "cache-dae-expert", walls["cache-dae"]),
    ):
        results["rows"][key] = {
            "label": label,
            "cache_bytes": cache_bytes(science) + cache_bytes(reference),
            "cache_wall_s": wall,
            "seeds": {},
        }
        for seed in args.seeds:
            results["rows"][key]["seeds"][seed] = train_run(
                key,
                seed,
                ["--cache", reference, "--cache", science],
                ["--domain-ratio", f"{share:.3f}"],
                student=results["rows"]["kd-topk"]["seeds"][seed]["checkpoint"],
                steps=args.dae_steps,
            )
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    table = render(results)
    print("\n" + table)
    if write:
        write_docs(table)
    else:  # a smoke run or other settings do not replace the published table
        print(f"\n(not written to the docs: settings differ from the defaults ({', '.join(changed)}); --write-docs to)")


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    m = sum(values) / len(values)
    sd = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{m:.3f}±{sd:.3f}"


def render(results: dict) -> str:
    head = (
        "| run | KL sci | KL gen | NLL sci | NLL gen | top-1 sci | top-1 gen | train s | cache MB |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    init = results["init"]
    lines.append(
        "| untrained student | "
        + " | ".join(
            f"{init[g][m]:.3f}" for m in ("kl_to_teacher", "nll", "top1_agreement") for g in ("domain", "general")
        )
        + " | - | - |"
    )
    for row in results["rows"].values():
        seeds = list(row["seeds"].values())
        cells = []
        for metric in ("kl_to_teacher", "nll", "top1_agreement"):
            for group in ("domain", "general"):
                cells.append(_mean_std([s["eval"][group][metric] for s in seeds]))
        wall = sum(s["train_wall_s"] for s in seeds) / len(seeds)
        lines.append(f"| {row['label']} | " + " | ".join(cells) + f" | {wall:.0f} | {row['cache_bytes'] / 1e6:.2f} |")
    n = len(results["config"]["seeds"])
    lines.append(
        f'\nHeld-out, {n} seed(s); sci = domain "science", gen = general; KL is to the original teacher '
        "over its cached top-32 + tail; mean±sd over seeds where more than one."
    )
    return "\n".join(lines)


def write_docs(table: str) -> None:
    """Put the table between the RESULTS markers of docs/EXPERIMENTS.md and README.md."""
    start, end = "<!-- RESULTS:START -->", "<!-- RESULTS:END -->"
    for doc in (ROOT / "docs" / "EXPERIMENTS.md", ROOT / "README.md"):
        text = doc.read_text()
        before, rest = text.split(start)
        _, after = rest.split(end)
        doc.write_text(f"{before}{start}\n{table}\n{end}{after}")


if __name__ == "__main__":
    main()
