"""The console scripts' entry points, light to import: a Ctrl-C while a CLI's modules load (a
second or more on a busy machine) ends the process by SIGINT with one line, as one later does,
not with a traceback from deep inside an import."""

from __future__ import annotations

import importlib
import os
import signal
import sys


def start(module: str) -> None:
    """Import the CLI `module` and run its click group `main`."""
    try:
        cli = importlib.import_module(module)
    except KeyboardInterrupt:
        print("interrupted: stopped while starting; nothing was done", file=sys.stderr, flush=True)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)  # ends by the signal: a shell loop or make stops too
        raise SystemExit(130) from None  # where the signal cannot end it
    cli.main()


def main() -> None:
    """`teacher-cache`."""
    start("teacher_cache.cli")
