"""teacher-cache: run a large teacher once, offline, and keep what a student needs.

Stage one of the pipeline: records -> tokenize -> teacher forward (vLLM or
transformers) -> targets (top-k or sampled) -> codec -> Arrow shards + manifest.
`open_cache` is the stable Python API the trainer reads caches through.
"""

from __future__ import annotations

__version__ = "0.2.1"

__all__ = ["Cache", "CachedSample", "__version__", "open_cache"]


def __getattr__(name: str):
    # keep `import teacher_cache` light: numpy/pyarrow load only when a cache is opened
    if name in ("open_cache", "CachedSample", "Cache"):
        from teacher_cache import cache

        return getattr(cache, name)
    raise AttributeError(name)


def __dir__() -> list[str]:
    """The lazy names too, for tab completion (they load on first use)."""
    return sorted({*globals(), *__all__})
