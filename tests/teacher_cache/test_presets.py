"""The preset registry and the locally built presets (real tokenizer, real weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from teacher_cache.models import MISTRAL_CHAT_TEMPLATE, ModelBuildError, resolve_model
from teacher_cache.presets import PRESETS, UnknownPresetError, get_preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_well_formed(name):
    p = get_preset(name)
    assert p.name == name and p.description and p.source
    if p.kind == "hub":
        assert p.hub_id and p.revision and p.needs_gpu
    if p.kind == "derived":
        assert p.base in PRESETS


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(UnknownPresetError) as err:
        resolve_model("gpt-17")
    for name in PRESETS:
        assert name in str(err.value)


def test_hub_presets_resolve_without_touching_the_hub():
    ref = resolve_model("mixtral")
    assert ref.path == "mistralai/Mixtral-8x7B-Instruct-v0.1" and not ref.is_local
    assert resolve_model("mistral-7b").path == "mistralai/Mistral-7B-v0.1"


def test_directory_without_checkpoint_is_refused(tmp_path):
    with pytest.raises(ModelBuildError, match=r"no config.json checkpoint$"):
        resolve_model(str(tmp_path))
    # a training run's folder (`eval --model runs/x`): the newest complete checkpoint is named
    for name, complete in (("checkpoint-2", True), ("checkpoint-10", True), ("checkpoint-11", False)):
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / "config.json").write_text("{}")
    with pytest.raises(ModelBuildError, match=r"a training run\? its latest checkpoint is .*/checkpoint-10\)$"):
        resolve_model(str(tmp_path))


def test_tiny_pair_shares_real_tokenizer_and_attention_shape(tiny_teacher, tiny_student, teacher_tok):
    from teacher_cache.models import mistral_tokenizer_file
    from teacher_cache.tokenize import load_tokenizer, tokenizer_fingerprint

    assert len(teacher_tok) == 32000 and teacher_tok.bos_token == "<s>" and teacher_tok.eos_token == "</s>"
    # the real sentencepiece model gives the same ids
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(mistral_tokenizer_file()))
    text = "Distillation moves a teacher's knowledge into a smaller student."
    assert teacher_tok(text, add_special_tokens=False).input_ids == sp.encode(text)
    student_tok = load_tokenizer(tiny_student.path)
    assert tokenizer_fingerprint(student_tok) == tokenizer_fingerprint(teacher_tok)
    assert teacher_tok.chat_template == MISTRAL_CHAT_TEMPLATE
    t = json.loads((Path(tiny_teacher.path) / "config.json").read_text())
    s = json.loads((Path(tiny_student.path) / "config.json").read_text())
    for key in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size"):
        assert t[key] == s[key], key
    assert t["model_type"] == "mixtral" and t["num_local_experts"] > 1 and s["model_type"] == "mistral"


def test_tiny_build_is_deterministic(tmp_path, monkeypatch, tiny_teacher):
    from safetensors.torch import load_file

    monkeypatch.setenv("TEACHER_CACHE_HOME", str(tmp_path))
    again = resolve_model("tiny-mixtral")
    assert again.path != tiny_teacher.path
    a = load_file(Path(tiny_teacher.path) / "model.safetensors")
    b = load_file(Path(again.path) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # readable by the team under a shared TEACHER_CACHE_HOME: the folder was 0700 (mkdtemp), the weights 0600
    from teacher_cache.storage import current_umask

    mask = current_umask()
    assert Path(again.path).stat().st_mode & 0o777 == 0o777 & ~mask
    assert {p.name: p.stat().st_mode & 0o777 for p in Path(again.path).iterdir()} == {
        p.name: 0o666 & ~mask for p in Path(again.path).iterdir()
    }


def test_tiny_models_load_in_transformers(tiny_teacher, tiny_student):
    from transformers import AutoModelForCausalLM

    for ref in (tiny_teacher, tiny_student):
        model = AutoModelForCausalLM.from_pretrained(ref.path)
        out = model(input_ids=torch.tensor([[1, 733, 16289, 28793]]))
        assert out.logits.shape == (1, 4, 32000) and torch.isfinite(out.logits).all()


@pytest.mark.slow
def test_smollm2_is_a_real_model_and_its_student_derives_from_it():
    from transformers import AutoModelForCausalLM

    from teacher_cache.tokenize import load_tokenizer

    ref = resolve_model("smollm2-135m")
    tok = load_tokenizer(ref.path)
    model = AutoModelForCausalLM.from_pretrained(ref.path)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    answer = tok.decode(model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :])
    assert "Paris" in answer
    student = resolve_model("smollm2-135m-half")
    cfg = json.loads((Path(student.path) / "config.json").read_text())
    assert cfg["num_hidden_layers"] == model.config.num_hidden_layers // 2
    AutoModelForCausalLM.from_pretrained(student.path)
