"""`make demo`: cache a real teacher on bundled data and train a student from the cache.

Not built yet: the trainer (stage two) and the bundled instruction sample are still
open issues. Until they land this says so and exits non-zero rather than pretend.
"""

from __future__ import annotations

import sys


def main() -> int:
    print(
        "make demo is not available yet: it needs the student trainer (stage two) and a bundled sample of\n"
        "instruction data (the experiment issue). What works today:\n"
        "  make cache TEACHER=tiny-mixtral DATA=tests/data/chats.jsonl OUT=caches/tiny   # stage one\n"
        "  .venv/bin/teacher-cache inspect caches/tiny && .venv/bin/teacher-cache verify caches/tiny",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
