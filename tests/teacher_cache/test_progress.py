"""The shared progress bar: how often it writes into a log."""

from __future__ import annotations

import io

from teacher_cache import progress


def test_into_a_log_the_bar_redraws_at_most_every_30_s(monkeypatch):
    """Into a file or pipe each redraw is a line. tqdm redraws when an update comes `mininterval`
    after the last draw, and its monitor thread redraws a bar not drawn for `maxinterval`: with
    tqdm's 10 s default, a log got a line every 10-20 s instead of every 30."""
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal
    with progress.bar(10, "caching", "shard") as logged:
        assert logged.mininterval == 30.0 and logged.maxinterval >= logged.mininterval
        for _ in range(10):
            logged.update(1)
    lines = [line for line in logged.fp.getvalue().replace("\r", "\n").splitlines() if line.strip()]
    assert len(lines) == 2 and lines[-1].startswith("caching: 100%"), lines  # the start and the end
