"""What demo.py and experiment.py share: an output folder made anew on every run, and running
the public commands one after another as a user would."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


def start_over(out: Path, what: str) -> None:
    """Make `out` empty but for a marker file; a folder is deleted first only if it holds the
    marker (this script made it), anything else at `out` is refused (exit with one line)."""
    marker = out / f".teacher-cache-{what}"
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not marker.exists())):
        sys.exit(f"error: {out} exists and was not made by this {what}; choose another --out")
    if out.exists():
        print(f"{what}: starting over: deleting the earlier {what}'s {out}", flush=True)
        shutil.rmtree(out)
    out.mkdir(parents=True)
    marker.touch()


def step(title: str, args: list, what: str) -> float:
    """Print and run one command in the foreground; its seconds. A failure ends the script with one
    line. Ctrl-C reaches the command too (one process group): wait for it to say what it kept and
    end, then end this script by the same signal (no traceback; a shell loop or make stops too)."""
    print(f"\n== {title}\n$ {' '.join(map(str, args))}", flush=True)
    t0 = time.time()
    proc = subprocess.Popen([str(a) for a in args])
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        try:
            proc.wait(timeout=120)  # it stops at its next safe point, as its own Ctrl-C says
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        raise
    if code != 0:
        sys.exit(f"{what}: '{title}' failed (exit {code})")
    return time.time() - t0
