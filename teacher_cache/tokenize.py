"""Chat template -> token ids plus the positions that get teacher targets.

A target position t is one whose next token (input_ids[t + 1]) belongs to an assistant
turn, as in instruction tuning. Assistant spans are found in character space by
rendering the conversation prefix by prefix (the text an assistant turn adds to the
rendering, after the generation prompt of the turn before it), then mapped to tokens
through the fast tokenizer's offsets. That works for any chat template whose
rendering of a prefix is a prefix of the full rendering (Mistral, ChatML, Llama).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from teacher_cache.errors import one_line
from teacher_cache.records import BadRecordError, Record


@dataclass(frozen=True)
class Tokenized:
    """A record tokenised with the chat template: ids and the positions that predict assistant tokens."""

    input_ids: np.ndarray  # int64 [T]
    target_positions: np.ndarray  # int64 [P], sorted; input_ids[t + 1] is an assistant token
    truncated: bool


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def load_tokenizer(path: str, revision: str | None = None, *, trust_remote_code: bool = False) -> Any:
    """The model's own tokenizer (a transformers fast tokenizer with a chat template)."""
    from transformers import AutoTokenizer

    local = Path(path)
    if local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_FILES):  # transformers' words run long
        raise ValueError(f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}): copy the model's tokenizer there")
    if not local.is_dir():  # a hub id: the first thing every command fetches
        check_hub(path, revision)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # no tokenizer files, or ones transformers cannot build
        raise ValueError(f"{path}: cannot load its tokenizer ({one_line(e, 300)})") from None
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"{path}: a fast tokenizer is needed (offsets map assistant spans to tokens)")
    if not tok.chat_template:
        raise ValueError(f"{path}: the tokenizer has no chat template")
    return tok


def check_hub(repo: str, revision: str | None) -> None:
    """Before transformers reaches for a hub model that is not in the local Hugging Face cache (it
    retried for ~50 s without a network, and waited forever on a proxy that never answers): the hub
    must answer within TEACHER_CACHE_HUB_TIMEOUT seconds (default 10), else one line on what to do.
    With HF_HUB_OFFLINE=1 the hub is not asked: a model not in the cache is refused at once."""
    from huggingface_hub import HfApi, is_offline_mode, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(try_to_load_from_cache(repo, "config.json", revision=revision), str):
        return  # downloaded before: transformers can fall back on it
    fetch = (
        f"download it where the hub is reachable (hf download {repo}) and copy ~/.cache/huggingface here, "
        "or give a local checkpoint folder"
    )
    if is_offline_mode():  # HF_HUB_OFFLINE, as the hub library reads it
        raise ValueError(f"{repo}: a hub model, not in the local Hugging Face cache, and HF_HUB_OFFLINE is set: "
                         f"{fetch}")  # fmt: skip
    timeout = float(os.environ.get("TEACHER_CACHE_HUB_TIMEOUT") or 10)
    try:
        HfApi().model_info(repo, revision=revision, timeout=timeout)
    except HfHubHTTPError as e:  # it answered: no such repo or revision, or gated without a token
        raise ValueError(
            f"{repo}: the Hugging Face hub refuses it ({one_line(e, 160)}); a gated model needs "
            "`hf auth login` with a token that has access, or give a local checkpoint folder"
        ) from None
    except Exception as e:  # no network, DNS, a proxy that never answers: httpx/requests errors
        why = one_line(e, 120) if str(e).strip() else f"no answer in {timeout:g} s"
        raise ValueError(
            f"{repo}: a hub model, not in the local Hugging Face cache, and the hub cannot be reached ({why}): {fetch}"
        ) from None


def tokenizer_fingerprint(tok: Any) -> str:
    """sha256 over the vocabulary (token -> id) and the special tokens: equal iff ids mean the same."""
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    specials = {k: str(v) for k, v in sorted(tok.special_tokens_map.items())}
    blob = json.dumps({"vocab": vocab, "special": specials}, ensure_ascii=False).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def chat_template_hash(tok: Any) -> str:
    """sha256 of the tokenizer's chat template: the target positions depend on it."""
    return "sha256:" + hashlib.sha256(str(tok.chat_template).encode()).hexdigest()


def _render(tok: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_char_spans(tok: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation; return the text and the [start, end) spans of assistant turns."""
    full = _render(tok, messages, False)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = _render(tok, messages[:i], True)
        upto = _render(tok, messages[: i + 1], False)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise ValueError("chat template renders prefixes inconsistently; cannot locate assistant turns")
        end = len(upto)
        while end > len(before) and upto[end - 1].isspace():  # template layout after the turn's end token
            end -= 1
        spans.append((len(before), end))
    return full, spans


def special_text_finder(tok: Any) -> Callable[[list[dict[str, str]]], str | None]:
    """-> a function giving the first special token's text found in a conversation's contents
    (None if none). Such text ("</s>" in an answer, "<|im_end|>" in a code sample) is read by the
    tokenizer as the control token itself, not as text: a student would learn to end, or start a
    turn, mid-answer. One regex scan per message."""
    texts = {t for t in tok.all_special_tokens if t}
    texts |= {a.content for a in getattr(tok, "added_tokens_decoder", {}).values() if a.special and a.content}
    if not texts:
        return lambda messages: None
    pattern = re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)))

    def find(messages: list[dict[str, str]]) -> str | None:
        for m in messages:
            hit = pattern.search(m["content"])
            if hit:
                return hit.group(0)
        return None

    return find


def tokenize_record(tok: Any, record: Record, max_length: int | None) -> Tokenized:
    """Token ids and target positions of one record (truncated to max_length tokens)."""
    try:
        text, spans = assistant_char_spans(tok, record.messages)
    except Exception as e:  # the template's own checks (role order) surface as jinja errors
        raise BadRecordError(record.where, f"chat template rejected the conversation: {e}") from None
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = np.asarray(enc["input_ids"], dtype=np.int64)  # [T]
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)  # [T, 2] char [start, end)
    is_assistant = np.zeros(len(input_ids), dtype=bool)  # [T]
    for start, end in spans:
        is_assistant |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
    truncated = max_length is not None and len(input_ids) > max_length
    if truncated:
        input_ids, is_assistant = input_ids[:max_length], is_assistant[:max_length]
    target_positions = np.flatnonzero(is_assistant[1:]).astype(np.int64)  # [P]
    if len(target_positions) == 0:
        why = "truncation left no assistant token" if truncated else "no assistant token after tokenisation"
        raise BadRecordError(record.where, why)
    return Tokenized(input_ids, target_positions, bool(truncated))
