"""`student-train plot RUN_DIR`: training curves from metrics.jsonl to PNG."""

from __future__ import annotations

import io
from pathlib import Path

from teacher_cache.errors import parse_json
from teacher_cache.storage import write_atomic


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def plot_run(run_dir: str, out: str | None = None) -> Path:
    """Loss, lr and grad-norm curves of a run's metrics.jsonl, with the held-out KL to the teacher
    of its eval.jsonl (train --eval-cache) beside the losses -> a PNG (default RUN_DIR/curves.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (is {run_dir} a training run directory?)")
    parsed, lines = _json_lines(path)
    rows = []
    for n, row in parsed:
        if not (isinstance(row, dict) and all(_number(row.get(k)) for k in ("step", "lr", "grad_norm"))):
            raise ValueError(f"{path}:{n}: not a metrics line (an object with step, lr and grad_norm)")
        rows.append({k: v for k, v in row.items() if _number(v)})
    if not rows:
        raise ValueError(f"{path}: {'no complete line' if lines else 'empty'}")
    keys = [k for k in ("loss", "ce", "kd", "kd_domain", "kd_general", "attn") if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if k in r]
        axes[0].plot(*zip(*pts, strict=True), label=k)
    held_out = _eval_points(Path(run_dir) / "eval.jsonl")
    if held_out:
        axes[0].plot(*zip(*held_out, strict=True), marker="o", label="held-out KL to the teacher (temperature 1)")
    axes[0].set_title("losses")
    axes[0].set_xlabel("step")
    axes[0].legend()
    for ax, key in ((axes[1], "lr"), (axes[2], "grad_norm")):
        ax.plot([r["step"] for r in rows], [r[key] for r in rows])
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    target = Path(out) if out else Path(run_dir) / "curves.png"
    image = io.BytesIO()
    try:
        fig.savefig(image, dpi=100, format=target.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    write_atomic(target, image.getvalue())  # an old plot survives a failed save
    return target


def _json_lines(path: Path) -> tuple[list[tuple[int, object]], int]:
    """(line number, value) of each non-blank line of a run's JSON-lines log, and how many such
    lines it has. A torn last line (what a killed run leaves) is left out; any other line that is
    not JSON is refused, naming it: the file is not ours."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    parsed = []
    for i, line in enumerate(lines):
        try:
            parsed.append((i + 1, parse_json(line)))
        except ValueError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}:{i + 1}: not a JSON line") from None
    return parsed, len(lines)


def _eval_points(path: Path) -> list[tuple[float, float]]:
    """(step, KL to the teacher over all held-out samples) of each line of eval.jsonl; none
    without the file. A torn last line (a killed run) is left out, any other bad line refused."""
    if not path.is_file():
        return []
    points = []
    for n, row in _json_lines(path)[0]:
        scores = row.get("all") if isinstance(row, dict) else None
        kl = scores.get("kl_to_teacher") if isinstance(scores, dict) else None
        if not (isinstance(row, dict) and _number(row.get("step")) and _number(kl)):
            raise ValueError(f"{path}:{n}: not an eval line (an object with step and all.kl_to_teacher)")
        points.append((row["step"], kl))
    return points
