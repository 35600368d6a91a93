"""student-train: stream cached teacher targets into a student with the paper's KD losses.

Stage two of the pipeline: cache reader -> batches -> losses -> optimiser. The
teacher is never loaded here; only `teacher_cache.open_cache` is.
"""

from __future__ import annotations

__version__ = "0.2.1"
