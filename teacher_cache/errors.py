"""Exceptions as the one-line messages the CLIs print, and JSON parsing that fails only with
ValueError (pure: no I/O, no package imports)."""

from __future__ import annotations

import json
from typing import Any


def parse_json(data: str | bytes) -> Any:
    """json.loads, where nesting too deep for the parser (a RecursionError) is a ValueError too."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def one_line(e: BaseException, limit: int | None = None) -> str:
    """`e`'s message with every run of whitespace (newlines included) made one space, cut to
    at most `limit` characters if given (at a word's end where one is near, "..." marking the cut);
    the exception's class name when that leaves nothing. An OSError
    about a file reads "PATH: why" (not "[Errno 30] Read-only file system: 'PATH'")."""
    text = str(e)
    if isinstance(e, OSError) and e.filename is not None and e.strerror and type(e).__str__ is OSError.__str__:
        why = os_reason(e)
        text = f"{e.filename}: {why}" if e.filename2 is None else f"{e.filename} -> {e.filename2}: {why}"
    text = printable(" ".join(text.split()))  # names from a foreign cache may hold escape sequences
    if limit is not None and len(text) > limit:  # cut at a word's end, and say it was cut
        cut = text[: max(limit - 3, 0)]
        if text[len(cut)] != " " and " " in cut[limit // 2 :]:  # mid-word: back to the word's start
            cut = cut.rsplit(" ", 1)[0]
        text = cut.rstrip() + "..."
    return text or type(e).__name__


_CONTROLS = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]}  # C0, DEL, C1
_CONTROLS |= {0x0A: "\\n", 0x09: "\\t", 0x0D: "\\r"}


def printable(text: str) -> str:
    """`text` safe to print as one line of a terminal: control characters (a newline that would
    start a fake line, an escape sequence that would recolour or rewrite the screen) shown as
    escapes, as are lone surrogates (a foreign manifest's, which a terminal cannot encode)."""
    return text.translate(_CONTROLS).encode("utf-8", "backslashreplace").decode()


def os_reason(e: OSError) -> str:
    """The OS's reason, as a clause: "read-only file system" (one_line(e) when it gives none)."""
    return e.strerror[:1].lower() + e.strerror[1:] if e.strerror else one_line(e)


def plural(n: int, noun: str, many: str | None = None) -> str:
    """'1 sample', '2 samples' (`many` for irregular plurals)."""
    return f"{n} {noun if n == 1 else many or noun + 's'}"


def first_of(names: list[str], shown: int = 1) -> str:
    """'a.txt' or 'a.txt and 3 more' (`shown` names, then how many more), for a message."""
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
