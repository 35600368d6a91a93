"""`student-train`: thin click layer over the trainer."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from student_train import __version__
from teacher_cache.cli import PATH, OneLineGroup, SettingsError, UserError, finished, interruptible, stopped
from teacher_cache.errors import one_line


def _rank() -> tuple[int, str]:
    """(this process's rank, the prefix of its messages): 'rank N: ' under torchrun, where every
    process prints its own error and a reader must see which one failed; (0, '') alone."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return 0, ""
    rank = int(os.environ.get("RANK", "0") or 0)
    return rank, f"rank {rank}: "


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="student-train")
def main() -> None:
    """Train a student from cached teacher targets (the teacher is never loaded)."""


@main.command()
@click.option("--student", type=PATH, required=True, help="Preset name or checkpoint directory.")
@click.option("--cache", "caches", type=PATH, multiple=True, required=True, help="Cache directory; repeatable.")
@click.option(
    "--attn-weight", type=float, default=0.0, show_default=True, help="As train's: > 0 checks the attention layers too."
)
@click.option("--attention-layer-map", "pairs", default=None, help="As train's: TEACHER:STUDENT layer pairs.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the student's own modelling code.")
def check(
    student: str, caches: tuple[str, ...], attn_weight: float, pairs: str | None, trust_remote_code: bool
) -> None:
    """Check that STUDENT can train from the caches (same tokenizer, same format, an output row for
    every id, the positions the caches need, every shard there at its size; with --attn-weight > 0,
    the cached attention layers map onto the student's). Reads no shard and no weight: `teacher-cache
    verify` checks every byte."""
    from transformers import AutoConfig

    from student_train.checks import (
        attention_layer_map,
        check_distinct,
        check_has_samples,
        check_has_targets,
        check_student_matches,
        check_student_model,
        domain_overlap,
        repeated_samples,
        template_differs,
    )
    from teacher_cache import open_cache
    from teacher_cache.models import resolve_model
    from teacher_cache.tokenize import load_tokenizer

    try:
        mapping = _parse_map(pairs)
        if mapping and not attn_weight > 0:  # as train refuses it
            raise SettingsError("--attention-layer-map needs --attn-weight > 0 (the attention loss is off)")
        ref = resolve_model(student)
        opened = [open_cache(c) for c in caches]
        tok = load_tokenizer(ref.path, ref.revision, trust_remote_code=trust_remote_code)
        check_distinct(opened)  # as train and eval refuse it
        check_student_matches(tok, opened, attention=attn_weight > 0)
        config = AutoConfig.from_pretrained(ref.path, revision=ref.revision, trust_remote_code=trust_remote_code)
        check_student_model(config.to_dict(), opened)
        if attn_weight > 0:
            attention_layer_map(mapping, opened, config)
    except (ValueError, RuntimeError, OSError, KeyError) as e:
        raise UserError(one_line(e)) from None
    try:
        check_has_samples(opened)  # as train and eval refuse them (Plan)
        check_has_targets(opened)
    except ValueError as e:
        raise UserError(str(e)) from None
    for c, o in zip(caches, opened, strict=True):
        if not o.manifest["counts"]["samples"]:  # given with others: legal, but worth saying
            click.echo(f"warning: {c} holds no samples", err=True)
    template = template_differs(tok, opened)
    if template:  # legal: the ids mean the same; the student learns the cache's format
        click.echo(f"warning: {template}", err=True)
    overlap = domain_overlap(opened)
    if overlap:  # legal, but those samples are trained against both teachers: said, not refused
        click.echo(f"warning: {overlap}", err=True)
    repeated = repeated_samples(opened)
    if repeated:  # legal (two teachers on one data set), but rarely meant: said, not refused
        click.echo(f"warning: {repeated}", err=True)
    click.echo(f"ok: {student} can train from {', '.join(caches)} (shards not read: teacher-cache verify reads them)")


_MAP = "'--attention-layer-map'"


def _parse_map(value: str | None) -> tuple[tuple[int, int], ...]:
    if not value:
        return ()
    bad = click.BadParameter(f"expected TEACHER:STUDENT pairs like 0:0,31:15, got {value!r}", param_hint=_MAP)
    try:
        pairs = [tuple(int(x) for x in item.split(":")) for item in value.split(",") if item.strip()]
    except ValueError:
        raise bad from None
    if any(len(p) != 2 for p in pairs):
        raise bad
    return tuple(pairs)  # type: ignore[return-value]


@main.command()
@click.option("--student", type=PATH, required=True, help="Preset name or checkpoint directory.")
@click.option(
    "--cache", "caches", type=PATH, multiple=True, required=True, help="Cache directory; repeatable (DAE: mix caches)."
)
@click.option("--out", type=PATH, required=True, help="Run directory (checkpoints, metrics.jsonl).")
@click.option("--max-steps", type=click.IntRange(min=1), default=100, show_default=True, help="Optimiser steps.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Samples per micro-batch.")
@click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True, help="Micro-batches per step.")
@click.option("--lr", type=float, default=1e-4, show_default=True, help="Peak AdamW learning rate.")
@click.option(
    "--min-lr-ratio",
    type=float,
    default=0.1,
    show_default=True,
    help="Cosine decay towards lr x this, reached at --max-steps (the last step runs just above it).",
)
@click.option("--warmup-steps", type=click.IntRange(min=0), default=10, show_default=True, help="Linear warmup steps.")
@click.option("--weight-decay", type=float, default=0.0, show_default=True, help="AdamW weight decay.")
@click.option("--clip", type=float, default=1.0, show_default=True, help="Gradient-norm clipping threshold.")
@click.option(
    "--lam",
    type=float,
    default=1.0,
    show_default=True,
    help="(1 - lam) * CE + lam * (KD + attn-weight * attention); the paper uses 1.",
)
@click.option(
    "--temperature",
    type=float,
    default=1.0,
    show_default=True,
    help="Softmax temperature of the KD loss (top-k: the k ids and the tail tempered alike; sampled: 1 only).",
)
@click.option("--attn-weight", type=float, default=0.0, show_default=True, help="Weight of the attention loss.")
@click.option("--attention-layer-map", default=None, help="TEACHER:STUDENT layer pairs (default: identity).")
@click.option("--domain-ratio", type=float, default=None, help="DAE: share of samples from --only-domain caches.")
@click.option(
    "--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Data order and initialisation seed."
)
@click.option(
    "--shuffle-window", type=click.IntRange(min=1), default=4, show_default=True, help="Shards mixed at once."
)
@click.option(
    "--save-every", type=click.IntRange(min=1), default=50, show_default=True, help="Checkpoint every N steps."
)
@click.option(
    "--keep-last",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Keep only the newest N checkpoints (0: keep all).",
)
@click.option("--num-workers", type=click.IntRange(min=0), default=0, show_default=True, help="Data-loader workers.")
@click.option(
    "--chunk-size",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="Positions per loss chunk (memory).",
)
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations in backward (less memory).")
@click.option("--lora-rank", type=click.IntRange(min=0), default=0, show_default=True, help="LoRA (needs peft).")
@click.option("--fsdp", is_flag=True, help="Under torchrun: FSDP2 sharding instead of DDP.")
@click.option(
    "--precision",
    type=click.Choice(["auto", "bf16", "fp32"]),
    default="auto",
    show_default=True,
    help="Autocast of the forward pass; auto = bf16 on CUDA devices that support it, else fp32.",
)
@click.option(
    "--eval-cache",
    "eval_caches",
    type=PATH,
    multiple=True,
    help="Held-out cache, repeatable: KL to the teacher, NLL and top-1 agreement to eval.jsonl as it trains.",
)
@click.option(
    "--eval-every",
    type=click.IntRange(min=1),
    default=None,
    help="Steps between evaluations (default: --save-every; and at the last step).",
)
@click.option("--eval-samples", type=click.IntRange(min=1), default=None, help="Samples per eval cache (default: all).")
@click.option(
    "--eval-batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Samples per evaluation forward (default: --batch-size; no gradients are kept, so larger fits).",
)
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in --out.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the student's own modelling code.")
def train(**kw) -> None:
    """Train STUDENT from cached teacher targets (KD, attention loss, DAE mixing)."""
    from student_train.train import TrainConfig, resume_advice
    from student_train.train import train as run_training

    kw["caches"], kw["eval_caches"] = tuple(kw["caches"]), tuple(kw["eval_caches"])
    kw["attention_layer_map"] = _parse_map(kw["attention_layer_map"])
    kw["progress"] = not kw.pop("no_progress")
    rank, prefix = _rank()
    try:
        cfg = TrainConfig(**kw)
    except (ValueError, RuntimeError) as e:  # settings that contradict each other: a usage error (exit 2)
        raise SettingsError(prefix + one_line(e)) from None
    interruptible()
    try:
        result = run_training(cfg)
    except (ValueError, RuntimeError, OSError, KeyError) as e:
        raise UserError(prefix + one_line(e)) from None
    except KeyboardInterrupt as e:
        stopped(e, resume_advice(Path(cfg.out)), prefix)
    # one line for the run, not one per process
    finished(f"done: step {result['step']}, checkpoint {result['checkpoint']}" if rank == 0 else None)


@main.command("eval")
@click.option("--model", type=PATH, required=True, help="Checkpoint directory or preset.")
@click.option("--cache", "caches", type=PATH, multiple=True, required=True, help="Held-out cache; repeatable.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--max-samples", type=click.IntRange(min=1), default=None, help="At most N samples of each cache.")
@click.option("--out", type=PATH, default=None, help="Also write the JSON report here.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def evaluate_cmd(
    model: str, caches: tuple[str, ...], batch_size: int, max_samples: int | None, out: str | None, no_progress: bool
) -> None:
    """Held-out KL to the teacher, NLL, top-1 agreement: domain (--only-domain caches) vs general; JSON."""
    import json
    from pathlib import Path

    from student_train.checks import check_output_file
    from student_train.evaluate import evaluate
    from teacher_cache.storage import is_url

    if out:  # before the work, not after it
        try:
            check_output_file(out, "an eval report", _is_report)
        except (ValueError, RuntimeError, OSError) as e:
            raise (SettingsError if is_url(out) else UserError)(one_line(e)) from None
    interruptible()
    try:
        report = evaluate(model, list(caches), batch_size=batch_size, max_samples=max_samples, progress=not no_progress)
    except (ValueError, RuntimeError, OSError, KeyError) as e:
        raise UserError(one_line(e)) from None
    except KeyboardInterrupt as e:
        stopped(e, "no report was written (eval keeps nothing between runs: the same command starts again)")
    text = json.dumps(report, indent=2)
    if out:
        from teacher_cache.storage import write_atomic

        click.echo(text)  # the report reaches stdout even if writing --out fails
        try:
            write_atomic(Path(out), (text + "\n").encode())
        except OSError as e:
            raise UserError(f"--out {out}: {one_line(e)} (the report is on stdout above)") from None
    finished(None if out else text)  # a Ctrl-C from now on ends the process at once, with status 0


def _is_report(head: bytes) -> bool:
    """Whether a file's first bytes are an eval report's (a JSON object with "kl_kind" at top level)."""
    return head.lstrip().startswith(b"{") and b'"kl_kind"' in head


# what `plot --out` writes, by its extension: formats whose files _is_image knows again, so a later
# plot may replace them (matplotlib also writes raw, rgba, svgz...: files with no signature of their own)
PLOT_FORMATS = ("png", "pdf", "svg", "eps", "ps", "jpg", "jpeg", "gif", "tif", "tiff", "webp")


def _is_image(head: bytes) -> bool:
    """Whether a file's first bytes are one of PLOT_FORMATS' (what a plot writes)."""
    signatures = (b"\x89PNG\r\n\x1a\n", b"%PDF", b"<?xml", b"<svg", b"%!PS", b"\xff\xd8\xff", b"GIF8", b"II*\x00")
    return head.startswith((*signatures, b"MM\x00*")) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _plot_format(out: str) -> None:
    """Refuse an --out whose extension names no format of PLOT_FORMATS (no extension: PNG)."""
    suffix = Path(out).suffix.lower().lstrip(".")
    if suffix and suffix not in PLOT_FORMATS:
        raise SettingsError(
            f"--out {out}: plot writes {', '.join('.' + f for f in PLOT_FORMATS)} (by the extension), not .{suffix}"
        )


@main.command()
@click.argument("run_dir", type=PATH)
@click.option(
    "--out",
    type=PATH,
    default=None,
    help=(
        "Image path; its extension picks the format: .png, .pdf, .svg, .eps, .ps, .jpg, .gif, .tif, .webp "
        "(default RUN_DIR/curves.png)."
    ),
)
def plot(run_dir: str, out: str | None) -> None:
    """Draw a run's loss, lr and grad-norm curves to an image (PNG by default)."""
    from student_train.checks import check_output_file
    from student_train.plot import plot_run

    if out:  # a usage error, before the work
        _plot_format(out)
    try:
        if out:
            check_output_file(out, "a plot", _is_image)
        else:  # RUN/curves.png: replaced only if an earlier plot
            default = Path(run_dir) / "curves.png"
            if default.is_file() and not _is_image(default.read_bytes()[: 1 << 16]):
                raise UserError(f"{default} exists and is not a plot: it is left as it is; give --out another path")
        click.echo(str(plot_run(run_dir, out)))
    except (ValueError, RuntimeError, OSError) as e:
        raise UserError(one_line(e)) from None


if __name__ == "__main__":
    sys.exit(main())
