"""Head-averaged attention rows for chosen layers, in bounded memory.

transformers computes attention through a registered function; we register one that
calls the stock SDPA kernel for the layer's output and, only on layers that carry a
`RowCapture`, also recomputes softmax(q k^T) for the wanted query positions, chunk by
chunk, averaged over heads. Full [H, T, T] maps are never materialised, and layers
without a capture pay nothing. Used by the teacher (no grad) and by the student (with
grad, for the attention loss).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

IMPLEMENTATION = "teacher_cache_rows"


def head_averaged_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    positions: torch.Tensor,
    scaling: float,
    *,
    sliding_window: int | None = None,
    chunk: int = 256,
) -> torch.Tensor:
    """Attention probabilities of the queries at `positions`, averaged over heads.

    query float [H, T, d], key float [Hkv, T, d] (one sample, unpadded keys), positions
    int64 [P] -> float32 [P, T], each row summing to 1 over keys <= its position.
    """
    with torch.autocast(query.device.type, enabled=False):  # float32 scores under a bf16 autocast too
        return _rows(query, key, positions, scaling, sliding_window, chunk)


def _rows(
    query: torch.Tensor,
    key: torch.Tensor,
    positions: torch.Tensor,
    scaling: float,
    sliding_window: int | None,
    chunk: int,
) -> torch.Tensor:
    H, T, _ = query.shape
    rep = H // key.shape[0]
    k = key.repeat_interleave(rep, dim=0).float() if rep > 1 else key.float()  # [H, T, d]
    keys = torch.arange(T, device=query.device)  # [T]
    rows = []
    for start in range(0, len(positions), chunk):
        pos = positions[start : start + chunk]  # [c]
        q = query[:, pos].float()  # [H, c, d]
        scores = torch.matmul(q, k.transpose(1, 2)) * scaling  # [H, c, T]
        allowed = keys[None, :] <= pos[:, None]  # [c, T] causal
        if sliding_window is not None:
            allowed &= keys[None, :] > pos[:, None] - sliding_window
        scores = scores.masked_fill(~allowed, float("-inf"))
        rows.append(torch.softmax(scores, dim=-1).mean(dim=0))  # [c, T]
    if not rows:
        return query.new_zeros((0, T), dtype=torch.float32)
    return torch.cat(rows, dim=0)


@dataclass
class RowCapture:
    """Per-forward request: which query positions to summarise, per batch row.

    positions[b] int64 [P_b]; lengths[b] = unpadded length T_b (right padding).
    After the forward, rows[layer][b] float32 [P_b, T_b].
    """

    positions: list[torch.Tensor]
    lengths: list[int]
    sliding_window: int | None = None  # for layers whose attention call does not say its own
    rows: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def record(self, layer: int, query: torch.Tensor, key: torch.Tensor, scaling: float, window: int | None) -> None:
        # query [B, H, T, d], key [B, Hkv, T, d]; window: this layer's sliding window (None: full)
        self.rows[layer] = [
            head_averaged_rows(query[b, :, :n], key[b, :, :n], pos, scaling, sliding_window=window)
            for b, (pos, n) in enumerate(zip(self.positions, self.lengths, strict=True))
        ]


def sliding_window_of(config) -> int | None:
    """The attention window a transformers config applies, or None (full causal attention)."""
    if getattr(config, "use_sliding_window", True) is False:  # Qwen2-style configs keep a size but may not use it
        return None
    return getattr(config, "sliding_window", None)


def layer_windows(config) -> list[int | None]:
    """The sliding window of each decoder layer (None: full causal attention). Models that mix
    layer types (Gemma 2/3, Qwen2 with use_sliding_window) window only "sliding_attention" layers."""
    window, n = sliding_window_of(config), config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if window is None or not types:
        return [window] * n
    return [window if t == "sliding_attention" else None for t in types]


def _capturing_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    capture: RowCapture | None = getattr(module, "_row_capture", None)
    if capture is not None:
        scaling = kwargs.get("scaling") or getattr(module, "scaling", query.shape[-1] ** -0.5)
        # the layer's own window when its attention call passes one (per layer type in mixed models)
        window = kwargs.get("sliding_window", capture.sliding_window)
        capture.record(module.layer_idx, query, key, scaling, window)
    return out


def register() -> str:
    """Register the capturing attention with transformers; returns its implementation name.

    Its mask is SDPA's: transformers builds no mask at all (no padding, no sliding window)
    for an attention implementation without a registered mask function."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, _capturing_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    return IMPLEMENTATION


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "scaling")]
    return sorted(mods, key=lambda m: m.layer_idx)


def attach(model: torch.nn.Module, layers: list[int], capture: RowCapture | None) -> None:
    """Point the chosen layers at `capture` (None detaches)."""
    if layers and getattr(model.config, "attn_logit_softcapping", None) is not None:
        raise ValueError(
            "its attention scores are soft-capped (attn_logit_softcapping), which the row capture does not do"
        )
    mods = attention_modules(model)
    for layer in layers:
        if not 0 <= layer < len(mods):
            raise ValueError(f"attention layer {layer} out of range: the model has {len(mods)} layers")
        mods[layer]._row_capture = capture
