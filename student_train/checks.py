"""Checks before the first step: the student reads the cache's ids the same way."""

from __future__ import annotations

from typing import Any


class IncompatibleCacheError(ValueError):
    """The cache cannot train this student (different tokenizer or format)."""


def check_student_matches(tokenizer: Any, caches: list) -> None:
    """Refuse a student whose tokenizer differs from the caches', or caches that disagree."""
    from teacher_cache.tokenize import tokenizer_fingerprint

    mine = tokenizer_fingerprint(tokenizer)
    first = caches[0].manifest
    for cache in caches:
        m = cache.manifest
        if m["tokenizer"]["fingerprint"] != mine:
            raise IncompatibleCacheError(
                f"{cache.where}: cached with tokenizer {m['tokenizer']['fingerprint'][:19]}..., the student's is "
                f"{mine[:19]}...: token ids would mean different things"
            )
        if m["format_version"] != first["format_version"]:
            raise IncompatibleCacheError(
                f"{cache.where}: format v{m['format_version']} mixed with v{first['format_version']}"
            )
        if m["targets"]["kind"] != first["targets"]["kind"]:
            raise IncompatibleCacheError(
                f"{cache.where}: {m['targets']['kind']} targets mixed with {first['targets']['kind']}"
            )
