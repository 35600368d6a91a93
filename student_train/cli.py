"""`student-train`: thin click layer over the trainer."""

from __future__ import annotations

import sys

import click

from student_train import __version__


class UserError(click.ClickException):
    """Printed as one line, exit code 1."""


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or e.__class__.__name__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="student-train")
def main() -> None:
    """Train a student from cached teacher targets (the teacher is never loaded)."""


@main.command()
@click.option("--student", required=True, help="Preset name or checkpoint directory.")
@click.option("--cache", "caches", multiple=True, required=True, help="Cache directory; repeatable.")
def check(student: str, caches: tuple[str, ...]) -> None:
    """Check that STUDENT can train from the caches (same tokenizer, same format)."""
    from student_train.checks import check_student_matches
    from teacher_cache import open_cache
    from teacher_cache.models import resolve_model
    from teacher_cache.tokenize import load_tokenizer

    try:
        ref = resolve_model(student)
        opened = [open_cache(c) for c in caches]
        check_student_matches(load_tokenizer(ref.path, ref.revision), opened)
    except (ValueError, RuntimeError, OSError, KeyError) as e:
        raise UserError(_one_line(e)) from None
    click.echo(f"ok: {student} can train from {', '.join(caches)}")


if __name__ == "__main__":
    sys.exit(main())
