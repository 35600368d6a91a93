"""Settings dataclasses built from Python, not the CLI: the types their fields promise (pure)."""

from __future__ import annotations

import dataclasses
import numbers
import os
from collections.abc import Iterable
from typing import Any


def is_int(v: object) -> bool:
    """An integer, numpy's included; not a bool (True is no count) and not 8.0."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def normalise(config: Any) -> None:
    """Make a frozen settings dataclass hold what its annotations say, or raise TypeError naming the
    field. A path may be a `Path`; a lone path where a tuple of paths is expected is that one path
    (`data="train.jsonl"` was read letter by letter: "data file not found: t"); an int field takes
    an int, numpy's included (not a bool, not 8.5); a float field any real number (numpy's float32
    and float16 as they print); a tuple field
    any iterable (stored as a tuple, so the settings stay hashable). Other annotations are left alone."""

    def path(name: str, v: object) -> str:
        if isinstance(v, os.PathLike):
            return os.fspath(v)
        if not isinstance(v, str):
            raise TypeError(f"{name} must be a str (a path may be a Path), got {v!r}")
        return v

    def items(name: str, v: object, what: str) -> tuple:
        if isinstance(v, (str, bytes)) or not isinstance(v, Iterable):
            raise TypeError(f"{name} must be {what}, got {v!r}")
        return tuple(v)

    def integer(name: str, v: object, shown: object, what: str = "an int") -> int:
        if not is_int(v):
            raise TypeError(f"{name} must be {what}, got {shown!r}")
        return int(v)

    for f in dataclasses.fields(config):
        v, kind = getattr(config, f.name), str(f.type).replace(" ", "")
        if kind == "str" or (kind == "str|None" and v is not None):
            v = path(f.name, v)
        elif kind == "tuple[str,...]":
            many = items(f.name, v, "paths") if not isinstance(v, (str, os.PathLike)) else (v,)
            v = tuple(path(f.name, x) for x in many)
        elif kind == "str|tuple[str,...]|None" and v is not None and not isinstance(v, str):
            v = items(f.name, v, "a str, strs or None")
            if not all(isinstance(x, str) for x in v):
                raise TypeError(f"{f.name} must be a str, strs or None, got {v!r}")
        elif kind == "int":
            v = integer(f.name, v, v)
        elif kind == "tuple[int,...]":
            v = tuple(integer(f.name, x, v, "ints") for x in items(f.name, v, "ints"))
        elif kind == "tuple[tuple[int,int],...]":
            pairs = tuple(items(f.name, p, "pairs of ints") for p in items(f.name, v, "pairs of ints"))
            if any(len(p) != 2 for p in pairs):
                raise TypeError(f"{f.name} must be pairs of ints, got {v!r}")
            v = tuple(tuple(integer(f.name, x, v, "pairs of ints") for x in p) for p in pairs)
        elif kind in ("float", "float|None") and v is not None:
            if not isinstance(v, numbers.Real) or isinstance(v, bool):
                raise TypeError(f"{f.name} must be a number, got {v!r}")
            # a float32 as it prints (np.float32(1e-4) is 1e-4, not 9.999999747378752e-05): the value
            # the CLI parses from the same text, so a resume with it is not "other settings"
            narrow = getattr(getattr(v, "dtype", None), "itemsize", 8) < 8
            v = float(str(v)) if narrow else float(v)
        elif kind == "bool" and not isinstance(v, bool):
            raise TypeError(f"{f.name} must be True or False, got {v!r}")
        object.__setattr__(config, f.name, v)
