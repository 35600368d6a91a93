"""`student-train plot` on metrics.jsonl files it did not write: one line, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from student_train.plot import plot_run

ST = [sys.executable, "-m", "student_train.cli"]
GOOD = {"step": 1, "loss": 2.5, "kd": 2.5, "lr": 1e-4, "grad_norm": 0.7}


@pytest.mark.parametrize(
    "lines,message",
    [
        (
            ['{"step": 1}', json.dumps(GOOD)],
            "metrics.jsonl:1: not a metrics line (an object with step, lr and grad_norm)",
        ),
        (["[1, 2]", json.dumps(GOOD)], "metrics.jsonl:1: not a metrics line"),
        ([json.dumps({**GOOD, "lr": "high"})], "metrics.jsonl:1: not a metrics line"),
        (["garbage"], "metrics.jsonl: no complete line"),
        ([], "metrics.jsonl: empty"),
        (["{", json.dumps(GOOD)], "metrics.jsonl:1: not a JSON line"),
    ],
)
def test_foreign_metrics_lines_are_refused_by_line(tmp_path, lines, message):
    (tmp_path / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    with pytest.raises(ValueError) as err:
        plot_run(str(tmp_path))
    assert message in str(err.value) and not (tmp_path / "curves.png").exists()


def test_metrics_with_nulls_and_a_torn_last_line_plot(tmp_path):
    rows = [GOOD, {**GOOD, "step": 2, "kd": None}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "lo')
    assert plot_run(str(tmp_path)).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    done = subprocess.run([*ST, "plot", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.strip().count("\n") == 0 and "not a metrics line" in done.stderr


def test_the_held_out_kl_of_eval_jsonl_is_drawn_beside_the_losses(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({**GOOD, "step": s}) + "\n" for s in (1, 2)))
    (tmp_path / "eval.jsonl").write_text(json.dumps({"step": 2, "all": {"kl_to_teacher": 1.5}}) + '\n{"step": 4, "al')
    svg = plot_run(str(tmp_path), out=str(tmp_path / "c.svg")).read_text()  # matplotlib names each text in a comment
    assert "held-out KL to the teacher" in svg
    (tmp_path / "eval.jsonl").write_text(
        '{"step": 2}\n' + json.dumps({"step": 3, "all": {"kl_to_teacher": 1.0}}) + "\n"
    )
    with pytest.raises(ValueError, match=r"eval.jsonl:1: not an eval line"):
        plot_run(str(tmp_path))
    (tmp_path / "eval.jsonl").unlink()
    assert "held-out KL" not in plot_run(str(tmp_path), out=str(tmp_path / "d.svg")).read_text()


@pytest.mark.parametrize("suffix", ["jpg", "gif", "tif", "webp"])
def test_a_plot_replaces_its_own_earlier_image_in_every_format_it_writes(tmp_path, suffix):
    """plot --out x.jpg wrote a JPEG, then refused to replace it ("exists and is not a plot"):
    only PNG, PDF, SVG and PostScript were known again."""
    (tmp_path / "metrics.jsonl").write_text(json.dumps(GOOD) + "\n")
    out = tmp_path / f"curves.{suffix}"
    for _ in range(2):
        done = subprocess.run([*ST, "plot", str(tmp_path), "--out", str(out)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert out.stat().st_size > 0


def test_a_plot_format_it_could_not_know_again_is_a_usage_error(tmp_path):
    """.raw (no signature to know it by later) and .txt (no image format) are refused before the
    work, not written (raw) or refused after drawing (txt, matplotlib's own message)."""
    (tmp_path / "metrics.jsonl").write_text(json.dumps(GOOD) + "\n")
    for suffix in ("raw", "txt"):
        out = tmp_path / f"curves.{suffix}"
        done = subprocess.run([*ST, "plot", str(tmp_path), "--out", str(out)], capture_output=True, text=True)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and f"not .{suffix}" in done.stderr
        assert not out.exists()


def test_the_default_plot_path_is_not_written_over_a_file_that_is_not_a_plot(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(GOOD) + "\n")
    (tmp_path / "curves.png").write_text("my notes\n")  # not an image: a plot without --out replaced it
    done = subprocess.run([*ST, "plot", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "is not a plot" in done.stderr, done.stderr
    assert (tmp_path / "curves.png").read_text() == "my notes\n"
    (tmp_path / "curves.png").unlink()
    assert subprocess.run([*ST, "plot", str(tmp_path)], capture_output=True).returncode == 0
    assert subprocess.run([*ST, "plot", str(tmp_path)], capture_output=True).returncode == 0  # its own: replaced
