"""Attention rows (teacher_cache/attention.py), their top-k summary (targets.attention_summary),
and the checks that keep a model's logits and attention what this project computes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from teacher_cache import attention
from teacher_cache.models import load_causal_lm
from teacher_cache.targets import attention_summary


def _tiny_qwen2(folder: Path, **config) -> Path:
    """A random 2-layer Qwen2 whose first layer attends within a window of 4 keys and whose
    second attends to every earlier key (layer types, as Qwen2, Gemma 2/3 configs mix them)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    base = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(**{**base, **config})).save_pretrained(folder)
    return folder


def test_each_layer_is_captured_with_its_own_window(tmp_path):
    from transformers import AutoModelForCausalLM

    path = _tiny_qwen2(tmp_path / "qwen2")
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attention.register()).eval()
    assert attention.layer_windows(model.config) == [4, None]
    T = 12
    ids = torch.randint(0, 64, (1, T), generator=torch.Generator().manual_seed(1))  # [1, T]
    pos = torch.arange(T - 1)  # [P]
    capture = attention.RowCapture([pos], [T], attention.sliding_window_of(model.config))
    attention.attach(model, [0, 1], capture)
    with torch.no_grad():
        model(input_ids=ids)
    eager = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = eager(input_ids=ids, output_attentions=True).attentions
    for layer in (0, 1):
        torch.testing.assert_close(capture.rows[layer][0], ref[layer][0].mean(0)[pos], atol=1e-5, rtol=1e-4)
    outside = int(pos[-1]) - 4 + 1  # the last query's keys before its window: 0 .. outside - 1
    assert float(capture.rows[0][0][-1][:outside].sum()) == 0  # the windowed layer
    assert float(capture.rows[1][0][-1][:outside].sum()) > 0.01  # the full layer


def test_rows_stay_float32_under_a_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(4, 10, 8, generator=g), torch.randn(2, 10, 8, generator=g)  # [H, T, d], [Hkv, T, d]
    pos = torch.arange(10)
    exact = attention.head_averaged_rows(q, k, pos, 0.35)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rows = attention.head_averaged_rows(q, k, pos, 0.35)
    assert rows.dtype == torch.float32 and torch.equal(rows, exact)


def test_the_summary_tail_is_minus_inf_where_every_visible_key_is_kept():
    """Queries that see no more keys than the top-k keep them all: their tail is exactly 0
    (-inf in log), which 1 - sum(top-k) in float would not give; later rows keep the rest."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(4, 24, 8, generator=g), torch.randn(4, 24, 8, generator=g)
    rows = attention.head_averaged_rows(q, k, torch.arange(24), 1.0)  # [24, 24] float32, causal
    top_k = 8
    s = attention_summary(rows, top_k)
    early = torch.arange(24) < top_k  # query t sees t + 1 keys
    assert bool((torch.from_numpy(s.tail_logprob)[early] == -math.inf).all())
    kept = torch.topk(rows, top_k, dim=-1).values.double().sum(-1)
    assert bool(((1 - kept)[early] != 0).any()), "the old 1 - sum left rounding here"
    rest = (rows.double().sum(-1) - kept)[~early]  # float64 [P_late]
    torch.testing.assert_close(torch.from_numpy(s.tail_logprob)[~early].double(), rest.log(), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "arch, config, problem",
    [
        ("qwen2", {"final_logit_softcapping": 30.0}, r"its logits are transformed \(final_logit_softcapping\)"),
        ("qwen2", {"lm_head_multiplier": 0.25}, r"its logits are transformed \(lm_head_multiplier\)"),
        ("phi", {}, "its output layer has a bias"),
    ],
)
def test_a_model_whose_logits_are_not_h_times_the_head_is_refused(tmp_path, arch, config, problem):
    """Training, eval and the hf teacher compute logits as h @ lm_head.weight^T: a config that
    transforms them, or a head with a bias, would be silently wrong, so loading refuses it."""
    if arch == "qwen2":
        path = _tiny_qwen2(tmp_path / arch, **config)
    else:
        from transformers import PhiConfig, PhiForCausalLM

        path = tmp_path / arch
        PhiForCausalLM(
            PhiConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
        ).save_pretrained(path)
    with pytest.raises(ValueError, match=problem):
        load_causal_lm(str(path), progress=False)
    assert load_causal_lm(str(_tiny_qwen2(tmp_path / "plain")), progress=False) is not None


def test_attention_scores_that_are_soft_capped_are_refused(tmp_path):
    from transformers import AutoModelForCausalLM

    path = _tiny_qwen2(tmp_path / "capped", attn_logit_softcapping=50.0)
    model = AutoModelForCausalLM.from_pretrained(path)
    with pytest.raises(ValueError, match="attention scores are soft-capped"):
        attention.attach(model, [0], None)
