"""Exceptions as the one-line messages the CLIs print (pure: no I/O, no package imports)."""

from __future__ import annotations


def one_line(e: BaseException, limit: int | None = None) -> str:
    """`e`'s message with every run of whitespace (newlines included) made one space, cut to
    `limit` characters if given; the exception's class name when that leaves nothing."""
    return " ".join(str(e).split())[:limit] or type(e).__name__
