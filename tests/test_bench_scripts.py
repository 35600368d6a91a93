"""The codec benchmark and its lower-bound script, whose figures the README and docs/CODEC.md
quote, still run end to end (real SmolLM2 distributions of 3 bundled chats) and agree."""

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
