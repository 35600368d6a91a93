"""Both backends (real vLLM on CPU, transformers) against an independent full-vocabulary forward."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch

from teacher_cache.targets import topk_from_logits
from tests.conftest import TEST_K

LOGPROB_TOL = 1e-3  # fp32 on CPU: vLLM and transformers kernels differ in summation order


@pytest.fixture(scope="module")
def reference(tiny_teacher, chats_tokenized):
    """Per sample: full log-softmax [T, V] and eager attention [L, H, T, T], one unpadded sample at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher.path, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    out = []
    with torch.no_grad():
        for s in chats_tokenized:
            res = model(input_ids=torch.from_numpy(s.input_ids)[None], output_attentions=True)
            logprobs = torch.log_softmax(res.logits[0].double(), dim=-1)  # [T, V]
            attn = torch.stack([a[0] for a in res.attentions])  # [L, H, T, T]
            out.append((logprobs, attn))
    return out


def assert_topk_matches(ids, logprobs, tail, ref_logprobs: torch.Tensor, positions: np.ndarray) -> None:
    """Same top-k up to ties, log-probs within tolerance, tail = log of the mass outside the ids."""
    ref = ref_logprobs[torch.from_numpy(positions)]  # [P, V] float64
    k = ids.shape[1]
    kth = torch.topk(ref, k, dim=-1).values[:, -1]  # [P]
    got = ref.gather(1, torch.from_numpy(ids))  # [P, k] reference log-probs of the returned ids
    # every returned id really is in the top-k (a tie at the boundary may pick either)
    assert torch.all(got >= kth[:, None] - LOGPROB_TOL)
    assert all(len(set(r)) == k for r in ids.tolist()), "ids distinct within each position"
    np.testing.assert_allclose(logprobs, got.numpy(), atol=LOGPROB_TOL)
    assert np.all(np.diff(logprobs, axis=1) <= 1e-6), "log-probs must be descending"
    outside = ref.scatter(1, torch.from_numpy(ids), float("-inf")).logsumexp(-1)  # [P]
    np.testing.assert_allclose(tail, outside.numpy(), atol=5e-3)


def test_target_positions_are_assistant_tokens(teacher_tok, chats_tokenized, chats_file):
    import json

    records = [json.loads(line) for line in chats_file.read_text().splitlines()]
    for rec, s in zip(records, chats_tokenized, strict=True):
        answers = [m["content"] for m in rec.get("messages", []) if m["role"] == "assistant"] or [rec.get("response")]
        predicted = s.input_ids[s.target_positions + 1]
        text = teacher_tok.decode(predicted)
        for answer in answers:
            assert answer.split()[0] in text
        # exactly the assistant tokens: content plus the closing </s>, nothing of the prompt
        assert teacher_tok.decode(predicted).count("</s>") == len(answers)
        assert "[INST]" not in text and "[/INST]" not in text


def test_the_projection_in_blocks_gives_each_sample_its_own_rows_logits():
    """Consecutive samples share a matmul of up to `block` rows, a longer one gets its own: each
    sample's logits are its rows' (as one matmul per sample), and no block is larger than needed."""
    from teacher_cache.backends import project_in_blocks

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(50, 8, generator=g)  # [V, D]
    sizes = [3, 0, 5, 9, 2, 2, 0]  # blocks of 6 rows: [3, 0], [5], [9] (longer than a block), [2, 2, 0]
    rows = [torch.randn(n, 8, generator=g) for n in sizes]
    got = list(project_in_blocks(rows, weight, block=6))
    assert [tuple(x.shape) for x in got] == [(n, 50) for n in sizes]
    for r, x in zip(rows, got, strict=True):
        torch.testing.assert_close(x, r @ weight.T, rtol=1e-6, atol=1e-5)
        assert x.is_contiguous()  # topk_from_logits(inplace=True) works on it in place
        assert x.untyped_storage().nbytes() <= max(6, len(r)) * 50 * 4  # float32 [<= max(block, P), V]
    assert got[2].untyped_storage().nbytes() == 5 * 50 * 4 and got[6].untyped_storage().nbytes() == 4 * 50 * 4
    assert list(project_in_blocks([], weight)) == []


def test_hf_backend_matches_reference(tiny_teacher, chats_tokenized, reference):
    from teacher_cache.backends.hf import HfBackend

    backend = HfBackend(tiny_teacher)
    outs = list(backend.forward(chats_tokenized))  # one padded batch of all samples
    for s, o, (ref_lp, _) in zip(chats_tokenized, outs, reference, strict=True):
        top = topk_from_logits(o.logits, TEST_K)
        assert_topk_matches(top.ids, top.logprobs, top.tail_logprob, ref_lp, s.target_positions)


@pytest.mark.slow
def test_vllm_hidden_matches_reference(vllm_hidden, chats_tokenized, reference):
    outs = list(vllm_hidden.forward(chats_tokenized))
    for s, o, (ref_lp, _) in zip(chats_tokenized, outs, reference, strict=True):
        top = topk_from_logits(o.logits, TEST_K)
        assert_topk_matches(top.ids, top.logprobs, top.tail_logprob, ref_lp, s.target_positions)


@pytest.mark.slow
def test_vllm_stock_prompt_logprobs_matches_reference(vllm_stock, chats_tokenized, reference):
    outs = list(vllm_stock.forward(chats_tokenized))
    for s, o, (ref_lp, _) in zip(chats_tokenized, outs, reference, strict=True):
        assert o.topk is not None and o.topk.ids.shape == (len(s.target_positions), TEST_K)
        assert_topk_matches(o.topk.ids, o.topk.logprobs, o.topk.tail_logprob, ref_lp, s.target_positions)


def test_attention_rows_match_eager_attention(tiny_teacher, chats_tokenized, reference):
    from teacher_cache.backends.hf import HfBackend

    backend = HfBackend(tiny_teacher, attention_layers=(0, 1), logits=False)
    outs = list(backend.forward(chats_tokenized))
    for s, o, (_, attn) in zip(chats_tokenized, outs, reference, strict=True):
        assert o.logits is None
        pos = torch.from_numpy(s.target_positions)
        for layer in (0, 1):
            expected = attn[layer].mean(0)[pos]  # [P, T] head-averaged eager attention rows
            got = o.attention[layer].cpu()  # the backend's device (a GPU where there is one)
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected.float(), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(got.sum(-1), torch.ones(len(pos)), atol=1e-5, rtol=0)


def test_the_attention_pass_loads_only_the_layers_it_summarises(tiny_teacher, chats_tokenized, reference, capfd):
    """Beside vLLM (logits=False) the attention pass stops at the deepest summarised layer: the
    layers after it change no row of the ones before, so their weights are left unread."""
    from teacher_cache.backends.hf import HfBackend

    backend = HfBackend(tiny_teacher, attention_layers=(0,), logits=False)
    assert backend.model.config.num_hidden_layers == 1 and len(backend.model.get_decoder().layers) == 1
    assert "tensors its config has no place for" not in capfd.readouterr().err  # layer 1's: left out, not odd
    for s, o, (_, attn) in zip(chats_tokenized, backend.forward(chats_tokenized), reference, strict=True):
        expected = attn[0].mean(0)[torch.from_numpy(s.target_positions)]  # [P, T] head-averaged rows
        torch.testing.assert_close(o.attention[0].cpu(), expected.float(), atol=1e-5, rtol=1e-4)
    assert HfBackend(tiny_teacher, attention_layers=(0,)).model.config.num_hidden_layers == 2  # logits: all


def test_the_hf_backend_projects_in_float32_for_a_bf16_teacher(tiny_teacher, chats_tokenized):
    """A bf16 output projection is ~0.2 nats off at logits ~40: the backend multiplies the bf16
    hidden state by the head in float32, as vLLM's hidden mode does."""
    import dataclasses

    from teacher_cache.backends.hf import HfBackend

    backend = HfBackend(dataclasses.replace(tiny_teacher, dtype="bfloat16"))
    # one sample per forward, so the reference below runs the same shapes (and kernels, on a GPU)
    outs = [o for s in chats_tokenized[:2] for o in backend.forward([s])]
    model = backend.model
    weight = model.get_output_embeddings().weight  # bfloat16 [V, D]
    assert weight.dtype == torch.bfloat16
    for s, o in zip(chats_tokenized[:2], outs, strict=True):
        with torch.no_grad():
            ids = torch.from_numpy(s.input_ids)[None].to(backend.device)  # int64 [1, T]
            hidden = model.get_decoder()(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
            hidden = hidden.last_hidden_state[0]  # bfloat16 [T, D]
        h = hidden[torch.from_numpy(s.target_positions).to(backend.device)]  # bfloat16 [P, D]
        assert o.logits.dtype == torch.float32
        torch.testing.assert_close(o.logits, h.float() @ weight.float().T, rtol=1e-5, atol=1e-5)


def test_attention_layer_out_of_range_is_refused(tiny_teacher):
    from teacher_cache.backends.hf import HfBackend

    with pytest.raises(ValueError, match="out of range"):
        HfBackend(tiny_teacher, attention_layers=(7,))


def test_cpu_tensor_parallel_ranks_get_disjoint_core_groups():
    from teacher_cache.backends.vllm_backend import VllmBackendError, _core_groups

    assert _core_groups([0, 1], 1) == "0,1"
    assert _core_groups([0, 1, 2, 3, 5], 2) == "0,1,2|3,5"
    with pytest.raises(VllmBackendError, match="--tensor-parallel-size 3 needs 3 CPU cores; this process may use 2"):
        _core_groups([0, 1], 3)


def test_a_checkpoint_that_lost_one_experts_tensor_is_refused_by_either_backend(tmp_path, tiny_teacher):
    """transformers fuses an MoE's experts as it loads them and reported a lost one only as "look
    at the CONVERSION entries of the above report" (hidden); vLLM loaded it, and its NaN logits
    were blamed on the data. Both are refused before loading, naming the tensor."""
    from safetensors.torch import load_file, save_file

    from teacher_cache.backends.hf import HfBackend
    from teacher_cache.backends.vllm_backend import VllmBackend
    from teacher_cache.models import resolve_model

    damaged = tmp_path / "teacher"
    shutil.copytree(tiny_teacher.path, damaged)
    weights = load_file(damaged / "model.safetensors")
    del weights["model.layers.0.block_sparse_moe.experts.1.w1.weight"]
    save_file(weights, damaged / "model.safetensors", metadata={"format": "pt"})
    ref = resolve_model(str(damaged))
    lacks = f"{damaged}: the checkpoint lacks weights its other tensors imply: model.layers.0.block_sparse_moe"
    for backend in (HfBackend, VllmBackend):
        with pytest.raises(ValueError, match=re.escape(lacks + ".experts.1.w1.weight")):
            backend(ref)


def test_weight_holes_follow_each_patterns_own_numbers():
    from teacher_cache.models import weight_holes

    dense = [f"model.layers.{i}.{w}.weight" for i in range(3) for w in ("self_attn.q_proj", "mlp.up_proj")]
    assert weight_holes(["model.embed_tokens.weight", *dense]) == []
    # experts on every other layer (hybrid MoE), attention on all: each pattern has its own layers
    moe = [f"model.layers.{i}.mlp.experts.{e}.w1.weight" for i in (1, 3) for e in range(4)]
    assert weight_holes(dense + moe) == []
    assert weight_holes(dense + moe[1:]) == ["model.layers.1.mlp.experts.0.w1.weight"]
    assert weight_holes(dense[1:]) == []  # a whole pattern's only copy in a layer: from_pretrained's check
