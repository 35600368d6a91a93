"""`show`: one cached sample's teacher targets, position by position, as tokens a person can read.

What a cache holds is only ids and log-probs; this puts the teacher's view of a sample next to
the text it was computed on (the true next token, the probability and rank the teacher gave it,
and the teacher's own top entries), to see what a student will be trained towards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from teacher_cache.cache import Cache, CachedSample
from teacher_cache.errors import one_line


def load_view_tokenizer(manifest: dict, name: str | None) -> tuple[Any | None, str]:
    """A tokenizer to print the cache's ids with, and a line saying which (or why none).

    `name` (a preset, a model folder or a tokenizer folder) is used as given and must be the
    cache's tokenizer (same fingerprint; ValueError otherwise). Without it, the cache's teacher is
    tried where it is on this machine (its folder, a built preset, the local Hugging Face cache),
    nothing is built or downloaded, and any failure gives None: ids are shown instead."""
    from teacher_cache.tokenize import tokenizer_fingerprint

    want = manifest["tokenizer"]["fingerprint"]
    if name is not None:
        tok = _load(name, build=True)
        if tokenizer_fingerprint(tok) != want:
            raise ValueError(
                f"{name}: not the cache's tokenizer (fingerprint {want[:19]}...): its ids mean other tokens"
            )
        return tok, f"tokens: {name}'s tokenizer (the cache's: fingerprints match)"
    teacher = manifest["teacher"]
    tried = []
    for candidate in (teacher.get("path"), teacher.get("name")):
        if not isinstance(candidate, str) or not candidate or candidate in tried:
            continue
        tried.append(candidate)
        try:
            tok = _load(candidate, build=False)
        except Exception:  # a teacher not usable here: ids are shown, and the line says so
            continue
        if tok is not None and tokenizer_fingerprint(tok) == want:
            return tok, f"tokens: the teacher's tokenizer ({candidate})"
    return None, "token ids only: the teacher's tokenizer is not on this machine (--tokenizer PRESET_OR_FOLDER)"


def _load(name: str, *, build: bool) -> Any:
    """A tokenizer from a model or tokenizer folder, a preset or a hub id. With `build` a preset is
    built and the hub may be asked; without, only what this machine already has is used (a hub
    model only from the local Hugging Face cache) and None means not here."""
    from teacher_cache.models import resolve_model
    from teacher_cache.tokenize import load_tokenizer

    folder = Path(name).expanduser()
    if folder.is_dir():  # show needs no chat template nor a fast tokenizer: only the ids' tokens
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError) as e:
            raise ValueError(f"{folder}: cannot load a tokenizer from it ({one_line(e, 200)})") from None
    ref = resolve_model(name, build=build)  # a preset (ModelBuildError when not built and not `build`)
    if not ref.is_local and not build:
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(ref.path, "config.json", revision=ref.revision), str):
            return None
    return load_tokenizer(ref.path, ref.revision)


def sample_view(cache: Cache, s: CachedSample, tok: Any | None, *, top: int, positions: int) -> dict:
    """One sample as a dict (JSON-ready): its header and, for its first `positions` target
    positions (0: all), the true next token with the teacher's probability and rank for it
    (None where the cache does not hold it: past the top-k, or never drawn) and the teacher's
    `top` entries. Sampled targets give each drawn id's share of the draws."""
    P = len(s.target_positions)
    shown = P if positions == 0 else min(positions, P)
    nxt = s.input_ids[s.target_positions[:shown] + 1]  # int64 [shown]: the tokens the targets predict
    if cache.kind == "topk":
        ids = s.topk_ids[:shown]  # int64 [shown, k], by descending log-prob
        probs = np.exp(s.topk_logprobs[:shown].astype(np.float64))  # float64 [shown, k]
        rest = np.exp(s.tail_logprob[:shown].astype(np.float64))  # float64 [shown]
        rows = [(ids[p], probs[p], rest[p]) for p in range(shown)]
    else:
        rows = []
        for p in range(shown):
            lo, hi = s.sampled_offsets[p], s.sampled_offsets[p + 1]
            order = np.lexsort((s.sampled_ids[lo:hi], -s.sampled_counts[lo:hi]))  # most drawn first, then id
            ids = s.sampled_ids[lo:hi][order]
            rows.append((ids, s.sampled_counts[lo:hi][order] / s.num_draws, None))
    out = []
    for p, (ids, probs, rest) in enumerate(rows):
        hit = np.flatnonzero(ids == nxt[p])
        entry = {
            "position": int(s.target_positions[p]),
            "next": {
                **_token(tok, nxt[p]),
                "p": float(probs[hit[0]]) if len(hit) else None,
                "rank": int(hit[0]) + 1 if len(hit) else None,
            },
            "top": [{**_token(tok, i), "p": float(q)} for i, q in zip(ids[:top], probs[:top], strict=True)],
        }
        if rest is not None:
            entry["tail_p"] = float(rest)  # the mass outside the stored top-k
        out.append(entry)
    t = cache.manifest["targets"]
    return {
        "sample_id": s.sample_id,
        "source": s.source,
        "domain": s.domain,
        "tokens": len(s.input_ids),
        "target_positions": P,
        "targets": f"top-{t['k']}" if cache.kind == "topk" else f"sampled, {s.num_draws} draws",
        "shown": shown,
        "positions": out,
    }


def _token(tok: Any | None, i: int | np.integer) -> dict:
    """{"id": i} and, with a tokenizer, its piece as the vocabulary spells it (▁ / Ġ for a space)."""
    i = int(i)
    return {"id": i, "token": tok.convert_ids_to_tokens(i)} if tok is not None else {"id": i}


def format_view(view: dict, tokenizer_line: str) -> list[str]:
    """`sample_view` as text lines: one per position."""

    def name(t: dict) -> str:
        return repr(t["token"]) if "token" in t else f"#{t['id']}"

    def share(p: float | None) -> str:
        return "-" if p is None else f"{p:.3f}"

    domain = view["domain"] if view["domain"] is not None else "none"
    lines = [
        f"sample {view['sample_id']!r} (source {view['source']}, domain {domain}): {view['tokens']} tokens, "
        f"{view['target_positions']} target positions, {view['targets']}",
        tokenizer_line,
        f"{'t':>6}  {'next token':<20} {'teacher p':>9} {'rank':>4}  teacher's top entries (p)",
    ]
    for row in view["positions"]:
        n = row["next"]
        rank = "-" if n["rank"] is None else str(n["rank"])
        tops = ", ".join(f"{name(t)} {t['p']:.3f}" for t in row["top"])
        lines.append(f"{row['position']:>6}  {name(n):<20} {share(n['p']):>9} {rank:>4}  {tops}")
    if view["shown"] < view["target_positions"]:
        lines.append(f"first {view['shown']} of {view['target_positions']} target positions (--positions 0: all)")
    return lines
