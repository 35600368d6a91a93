"""The progress bars of every long command (run, merge, verify, train, eval): one look; and
`log`, the stderr lines beside them."""

from __future__ import annotations

import sys
from typing import Any


def bar(total: int, desc: str, unit: str, *, enabled: bool = True, initial: int = 0, **kwargs: Any):
    """A tqdm bar on stderr (a no-op when not `enabled`), redrawn at most every 0.1 s on a
    terminal and every 30 s into a log file or pipe, where each redraw is a line of its own (a
    training of 150 steps wrote 300 lines). Set postfixes with refresh=False: update() draws them."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        disable=not enabled,
        dynamic_ncols=True,
        mininterval=0.1 if tty else 30.0,
        # tqdm's monitor thread redraws a bar not drawn for maxinterval (10 s): into a log, that was
        # a line every 10-20 s between the 30 s ones
        maxinterval=10.0 if tty else 30.0,
        **kwargs,
    )


def log(msg: str) -> None:
    """A line on stderr, beside the bars (stdout holds what a command gives: a report, a done line)."""
    print(msg, file=sys.stderr, flush=True)
