"""Settings dataclasses built from Python, not the CLI: the types their fields promise (pure)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any


def normalise(config: Any) -> None:
    """Make a frozen settings dataclass hold what its annotations say, or raise TypeError naming the
    field. A path may be a `Path`; a lone path where a tuple of paths is expected is that one path
    (`data="train.jsonl"` was read letter by letter: "data file not found: t"); an int field takes
    an int (not a bool, not 8.5); a float field an int or a float. Other annotations are left alone."""

    def path(name: str, v: object) -> str:
        if isinstance(v, os.PathLike):
            return os.fspath(v)
        if not isinstance(v, str):
            raise TypeError(f"{name} must be a str (a path may be a Path), got {v!r}")
        return v

    for f in dataclasses.fields(config):
        v, kind = getattr(config, f.name), str(f.type).replace(" ", "")
        if kind == "str" or (kind == "str|None" and v is not None):
            v = path(f.name, v)
        elif kind == "tuple[str,...]":
            v = (path(f.name, v),) if isinstance(v, (str, os.PathLike)) else tuple(path(f.name, x) for x in v)
        elif kind in ("int", "tuple[int,...]"):
            for x in (v,) if kind == "int" else v:
                if not isinstance(x, int) or isinstance(x, bool):
                    raise TypeError(f"{f.name} must be {'an int' if kind == 'int' else 'ints'}, got {v!r}")
            v = v if kind == "int" else tuple(v)
        elif kind in ("float", "float|None") and v is not None:
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise TypeError(f"{f.name} must be a number, got {v!r}")
            v = float(v)
        elif kind == "bool" and not isinstance(v, bool):
            raise TypeError(f"{f.name} must be True or False, got {v!r}")
        object.__setattr__(config, f.name, v)
