"""Benchmark scripts still run end to end: the codec benchmark and its lower-bound script, whose
figures the README and docs/CODEC.md quote (real SmolLM2 distributions of 3 bundled chats), agree;
the GPU check runs as a CPU dry run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run(script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, cwd=BENCH.parent, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_codec_bench_and_entropy_report_run_and_agree(tmp_path):
    out = tmp_path / "codec.json"
    run("bench_codec.py", "--samples", "3", "--blocks", "sample", "--repeat", "1", "--out", str(out))
    report = tmp_path / "entropy.txt"
    printed = run("codec_entropy.py", "--samples", "3", "--out", str(report))
    text = report.read_text()
    assert text.strip() == printed.strip()  # --out holds what was printed

    bench = json.loads(out.read_text())
    layout = bench["layouts"][0]
    assert layout["block"] == "sample" and bench["samples"] == 3
    assert {r["k"] for r in layout["topk"]} == {8, 16, 32, 64, 128}
    assert all(r["max_abs_err_within_10_nats"] <= 0.02 + 1e-6 for r in layout["topk"])
    # the entropy script sizes the sampled streams as the codec stores them, without headers;
    # the order-0 entropy of the same streams is below what zstd reaches
    zstd, order0 = map(float, re.search(r"^\s+all\s+([\d.]+)\s+([\d.]+)", text, re.M).groups())
    sampled = layout["sampled"]["bytes_per_pos"]
    assert order0 < zstd < sampled < zstd + 1.5, (order0, zstd, sampled)
    for line in ("ids, one table per block", "log-prob deltas by step", "ordering ids inside ties", "zstd dictionary"):
        assert line in text


def test_the_gpu_check_runs_end_to_end_as_a_cpu_dry_run(tmp_path):
    """bench/gpu_check.py runs only where a GPU is lent (rarely): its --cpu dry run keeps it working.
    On the CPU each device's targets are the CPU's own, so they agree exactly."""
    out = tmp_path / "gpu_check.json"
    run("gpu_check.py", "--cpu", "--samples", "4", "--steps", "4", "--work", str(tmp_path / "w"), "--out", str(out))
    report = json.loads(out.read_text())
    for name in ("cpu float32 vs cpu float32", "cpu bfloat16 vs cpu bfloat16"):
        same = report["teacher"][name]
        assert same["top1_agreement"] == same["topk_id_overlap"] == 1.0
        assert same["max_abs_logprob_diff_within_10_nats"] == same["max_abs_attention_prob_diff"] == 0.0
    assert report["teacher"]["cpu bfloat16 vs cpu float32"]["top1_agreement"] < 1.0  # another model
    pipeline = report["pipeline"]
    assert pipeline["engines"][0]["device"] == "cpu"
    for precision in ("fp32", "bf16"):
        assert pipeline[precision]["finite"] and pipeline[precision]["steps"] == 4
        assert pipeline[precision]["last_loss"] < pipeline[precision]["first_loss"]
    assert pipeline["bf16_resume_max_abs_loss_diff"] == 0.0


@pytest.mark.slow
def test_the_training_bench_runs_end_to_end(tmp_path):
    """bench/bench_train.py (stage two's published ratios) imported a helper train.py no longer
    had, and `make bench` failed on it unnoticed: a small run of the tiny pair keeps it working."""
    out = tmp_path / "train.json"
    printed = run("bench_train.py", "--pairs", "tiny", "--samples", "8", "--batch-size", "2", "--repeats", "2",
                  "--out", str(out))  # fmt: skip
    tiny = json.loads(out.read_text())["pairs"]["tiny"]
    assert {m: len(t) for m, t in tiny["step_s"].items()} == {"ce": 2, "kd": 2, "kd+attn": 2}  # raw, per repeat
    for mode, key in (("kd", "kd_over_ce"), ("kd+attn", "kd_attn_over_ce")):
        low, high = tiny["ratio_range"][mode]
        assert 0 < low <= tiny[key] <= high  # the median of the paired ratios
    assert tiny["reader_samples_per_s"] > 0 and tiny["reader_samples_per_s_2_workers"] > 0
    assert set(tiny["reader_first_batch_s"]) == {"0", "2"} and all(v > 0 for v in tiny["peak_rss_mb"].values())
    assert printed.splitlines()[1].startswith("tiny ")
