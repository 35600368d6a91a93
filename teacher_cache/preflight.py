"""What `teacher-cache run` refuses before --out is made: settings a teacher's config rules out
(its output rows against the tokenizer, its positions, its layers), read from a local teacher's
config.json (a hub teacher's once its engine has loaded it)."""

from __future__ import annotations

from pathlib import Path

from teacher_cache.config import RunConfig, RunError
from teacher_cache.errors import parse_json
from teacher_cache.models import LOGIT_TRANSFORMS, ModelRef, position_limit


def backend_name(cfg: RunConfig) -> str:
    """--backend with "auto" resolved: vllm where installed, else hf."""
    from teacher_cache.backends import vllm_available

    if cfg.backend != "auto":
        return cfg.backend
    return "vllm" if vllm_available() else "hf"


def check_vocab(teacher_config: dict, vocab: int, *, stock: bool = False) -> None:
    """A tokenizer with ids past the teacher's output layer, refused before --out is made (local
    checkpoints; a hub teacher's logits are checked as they come, run._vocab_logits, and a vLLM
    prompt_logprobs engine's config once loaded, run._cache_shards); with `stock` (vLLM's
    prompt_logprobs), an output layer padded past the tokenizer too: vLLM normalises over every
    row and ranks the extra ones in its top-k, which only the hidden mode drops."""
    rows = teacher_config.get("vocab_size")
    if isinstance(rows, int) and rows < vocab:
        raise RunError(vocab_message(rows, vocab))
    if stock and isinstance(rows, int) and rows > vocab:
        transforms = [k for k in LOGIT_TRANSFORMS if teacher_config.get(k) not in (None, 1, 1.0)]
        raise RunError(stock_padded_message(f"has {rows} rows,", vocab, transforms))


def stock_mode(cfg: RunConfig) -> bool:
    """Whether vLLM's own prompt log-probs make the targets (not logits projected here)."""
    return cfg.vllm_mode == "prompt_logprobs" and backend_name(cfg) == "vllm"


def stock_padded_message(rows: str, vocab: int, transforms: list[str] | None = None) -> str:
    """`transforms`: the teacher's logit transforms, which the modes that drop the extra rows refuse."""
    problem = (
        f"--vllm-mode prompt_logprobs: the teacher's output layer {rows} past its tokenizer's {vocab} tokens, "
        "and vLLM's log-probs are normalised over every row and rank the extra ones in the top-k"
    )
    if transforms:  # --vllm-mode hidden and --backend hf compute h @ lm_head.weight^T only
        return (
            f"{problem}; its logits are transformed ({', '.join(transforms)}), which --vllm-mode hidden and "
            "--backend hf refuse: no mode here can cache this teacher"
        )
    return f"{problem}: use --vllm-mode hidden or --backend hf (they drop the rows no token id names)"


def check_positions(cfg: RunConfig, teacher_config: dict) -> None:
    """--max-length past the positions a local teacher was trained on, refused before --out is made:
    the hf backend would extrapolate there silently (targets of no value), vLLM refuses late."""
    limit = position_limit(teacher_config)
    if limit is None:
        return
    if cfg.max_length > limit:
        raise RunError(
            f"--max-length {cfg.max_length} is past the {limit} positions {cfg.teacher} was trained on "
            f"(max_position_embeddings): use --max-length {limit} or less"
        )
    if cfg.max_length == limit and stock_mode(cfg):
        raise RunError(
            f"--vllm-mode prompt_logprobs needs one position more than --max-length {limit} (vLLM generates a "
            f"token after the prompt), past the {limit} {cfg.teacher} was trained on: use --max-length "
            f"{limit - 1} or less, or --vllm-mode hidden"
        )


def local_config(ref: ModelRef) -> dict:
    """A local teacher's config.json ({} for a hub teacher, whose config comes when it loads)."""
    config = Path(ref.path) / "config.json"
    if not (ref.is_local and config.is_file()):
        return {}
    parsed = parse_json(config.read_text())
    return parsed if isinstance(parsed, dict) else {}


def vocab_message(rows: int, vocab: int) -> str:
    return f"the teacher's output layer has {rows} rows but its tokenizer {vocab} tokens: ids past it have no logits"


def check_attention_layers(cfg: RunConfig, teacher_config: dict) -> None:
    """Attention layers past the teacher's last, refused before --out is made (local checkpoints:
    their config.json is at hand; a hub teacher's layers are checked when it loads)."""
    layers = teacher_config.get("num_hidden_layers")
    if cfg.attention_layers and isinstance(layers, int) and max(cfg.attention_layers) >= layers:
        raise RunError(f"attention layer {max(cfg.attention_layers)} out of range: {cfg.teacher} has {layers} layers")
