"""The output folder of a script that starts over on every run (demo.py, experiment.py)."""

from __future__ import annotations

import shutil
import sys
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
