"""The `student-train` console script's entry point, light to import (teacher_cache.launch)."""

from __future__ import annotations

from teacher_cache.launch import start


def main() -> None:
    """`student-train`."""
    start("student_train.cli")
