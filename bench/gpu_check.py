"""GPU checks the CPU suite cannot make; run on a machine with CUDA (see docs/BENCHMARKS.md).

1. Teacher: the hf backend's top-k targets and attention rows for the bundled chats on CUDA,
   with float32 and with bfloat16 weights, against the CPU float32 reference: top-1 agreement,
   top-k id overlap, |log-prob difference| on shared ids within 10 nats of the top-1, attention.
2. Pipeline: `teacher-cache run --backend hf` on CUDA, then `student-train train` (KD + attention
   loss) on CUDA in fp32 and bf16, then `--resume` of the bf16 run: finite losses that fall,
   and the resumed run's losses against the uninterrupted one's.

    python bench/gpu_check.py --out gpu_check.json
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import click
import torch

ROOT = Path(__file__).resolve().parents[1]
CHATS = ROOT / "tests" / "data" / "chats.jsonl"
K = 32


def _teacher_outputs(device: str, dtype: str, n: int) -> list[dict]:
    """Per sample: top-k ids int64 [P, K], log-probs float32 [P, K], attention rows {layer: [P, T]}."""
    from teacher_cache.backends.hf import HfBackend
    from teacher_cache.models import resolve_model
    from teacher_cache.records import iter_records
    from teacher_cache.targets import topk_from_logits
    from teacher_cache.tokenize import load_tokenizer, tokenize_record

    ref = resolve_model("tiny-mixtral")
    tok = load_tokenizer(ref.path)
    samples = [tokenize_record(tok, r, 512) for r in iter_records([str(CHATS)], skip_bad=False)][:n]
    backend = HfBackend(dataclasses.replace(ref, dtype=dtype), device=device, attention_layers=(0, 1), progress=False)
    out = []
    for start in range(0, len(samples), 8):
        for o in backend.forward(samples[start : start + 8]):
            t = topk_from_logits(o.logits.float(), K)
            out.append(
                {
                    "ids": torch.from_numpy(t.ids),
                    "lp": torch.from_numpy(t.logprobs),
                    "attn": {layer: rows.float().cpu() for layer, rows in o.attention.items()},
                }
            )
    backend.close()
    return out


def _compare(ref: list[dict], got: list[dict]) -> dict:
    top1 = overlap = n = 0
    worst_lp = worst_attn = 0.0
    for a, b in zip(ref, got, strict=True):
        top1 += int((a["ids"][:, 0] == b["ids"][:, 0]).sum())
        n += len(a["ids"])
        same = a["ids"][:, :, None] == b["ids"][:, None, :]  # bool [P, K, K]: ref entry i is got entry j
        overlap += int(same.any(-1).sum())
        near = a["lp"] >= a["lp"][:, :1] - 10  # ref entries within 10 nats of the top-1
        got_lp = (same * b["lp"][:, None, :].nan_to_num(neginf=0)).sum(-1)  # float32 [P, K]
        shared = same.any(-1) & near
        if shared.any():
            worst_lp = max(worst_lp, float((got_lp - a["lp"])[shared].abs().max()))
        for layer, rows in a["attn"].items():
            worst_attn = max(worst_attn, float((rows - b["attn"][layer]).abs().max()))
    return {
        "positions": n,
        "top1_agreement": round(top1 / n, 5),
        "topk_id_overlap": round(overlap / (n * K), 5),
        "max_abs_logprob_diff_within_10_nats": round(worst_lp, 5),
        "max_abs_attention_prob_diff": round(worst_attn, 6),
    }


def teacher_check(n: int, device: str) -> dict:
    """Each device's run against the CPU's with the same weights (bf16 weights make another model:
    the last entry says how far that model is from the float32 one, on the CPU)."""
    cpu = {dtype: _teacher_outputs("cpu", dtype, n) for dtype in ("float32", "bfloat16")}
    report = {f"{device} {d} vs cpu {d}": _compare(cpu[d], _teacher_outputs(device, d, n)) for d in cpu}
    report["cpu bfloat16 vs cpu float32"] = _compare(cpu["float32"], cpu["bfloat16"])
    return report


def _cli(module: str, *args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", module, *args, "--no-progress"], check=True)
    return round(time.perf_counter() - t0, 1)


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def pipeline_check(work: Path, steps: int) -> dict:
    cache = work / "cache"
    report: dict = {
        "cache_s": _cli(
            "teacher_cache.cli",
            "run",
            "--teacher",
            "tiny-mixtral",
            "--data",
            str(CHATS),
            "--out",
            str(cache),
            "--backend",
            "hf",
            "--attention-layers",
            "0,1",
        )
    }
    manifest = json.loads((cache / "manifest.json").read_text())
    report["engines"] = manifest.get("engines")
    common = [
        "--student",
        "tiny-mistral",
        "--cache",
        str(cache),
        "--attn-weight",
        "1.0",
        "--batch-size",
        "8",
        "--lr",
        "1e-3",
        "--save-every",
        str(steps // 2),
    ]
    for precision in ("fp32", "bf16"):
        run = work / precision
        secs = _cli(
            "student_train.cli",
            "train",
            *common,
            "--out",
            str(run),
            "--max-steps",
            str(steps),
            "--precision",
            precision,
        )
        loss = _losses(run)
        report[precision] = {
            "seconds": secs,
            "first_loss": loss[0],
            "last_loss": loss[-1],
            "steps": len(loss),
            "finite": all(x == x and abs(x) != float("inf") for x in loss),
        }
    # resume the bf16 run from its middle checkpoint into a copy, and compare the losses after it
    full = _losses(work / "bf16")
    subprocess.run(["cp", "-r", str(work / "bf16"), str(work / "bf16_resumed")], check=True)
    resumed_dir = work / "bf16_resumed"
    for ckpt in resumed_dir.glob(f"checkpoint-{steps}"):
        subprocess.run(["rm", "-r", str(ckpt)], check=True)
    (resumed_dir / "metrics.jsonl").write_text(
        "".join(
            line + "\n"
            for line in (resumed_dir / "metrics.jsonl").read_text().splitlines()
            if '"loss"' not in line or json.loads(line)["step"] <= steps // 2
        )
    )
    _cli(
        "student_train.cli",
        "train",
        *common,
        "--out",
        str(resumed_dir),
        "--max-steps",
        str(steps),
        "--precision",
        "bf16",
        "--resume",
    )
    again = _losses(resumed_dir)
    report["bf16_resume_max_abs_loss_diff"] = max(abs(a - b) for a, b in zip(full, again, strict=True))
    return report


@click.command()
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="JSON report.")
@click.option("--work", type=click.Path(file_okay=False), default="/tmp/gpu_check", show_default=True)
@click.option("--samples", default=48, show_default=True, help="Chats compared in the teacher check.")
@click.option("--steps", default=20, show_default=True, help="Training steps per precision.")
@click.option("--cpu", is_flag=True, help="Dry run on the CPU (checks this script, not the GPU).")
def main(out: str, work: str, samples: int, steps: int, cpu: bool) -> None:
    if not cpu and not torch.cuda.is_available():
        raise click.ClickException("no CUDA device: this script checks the GPU paths (--cpu for a dry run)")
    report = {"device": "cpu" if cpu else torch.cuda.get_device_name(0), "torch": torch.__version__}
    t0 = time.perf_counter()
    report["teacher"] = teacher_check(samples, "cpu" if cpu else "cuda")
    print(json.dumps(report, indent=1), flush=True)
    report["pipeline"] = pipeline_check(Path(work), steps)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    Path(out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
