"""Chat template -> token ids and target positions, with the real tiny-mixtral tokenizer (its files
copied, then a template or a config key changed where a test needs another kind of tokenizer)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from teacher_cache.records import BadRecordError, parse_record
from teacher_cache.tokenize import load_tokenizer, tokenize_record, tokenizer_fingerprint

# ChatML-like: a generation prompt before each assistant turn and a newline after its end token
CHATML = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TWO_TURNS = {
    "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "See you"},
    ]
}


# what Mistral's own tokenizer.json does with the text it is given: prepend <s>
ADD_BOS = {
    "type": "TemplateProcessing",
    "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
    "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
    "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
}


def tokenizer_copy(tmp_path: Path, model_dir: str, template: str | None = None, post_processor=None, **config):
    """load_tokenizer on a copy of the model's tokenizer files; template replaces the chat template
    ("" drops it), post_processor the one in tokenizer.json, config keys are set in
    tokenizer_config.json."""
    dst = tmp_path / "tok"
    dst.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(Path(model_dir) / name, dst / name)
    if template == "":
        (dst / "chat_template.jinja").unlink()
    elif template is not None:
        (dst / "chat_template.jinja").write_text(template)
    for name, edits in (
        ("tokenizer.json", {"post_processor": post_processor} if post_processor else {}),
        ("tokenizer_config.json", config),
    ):
        (dst / name).write_text(json.dumps({**json.loads((dst / name).read_text()), **edits}))
    return load_tokenizer(str(dst))


def target_pieces(tok, messages: dict, max_length: int | None = None) -> list[str]:
    tk = tokenize_record(tok, parse_record(messages, "f:1"), max_length)
    return tok.convert_ids_to_tokens(tk.input_ids[tk.target_positions + 1].tolist())


def test_template_layout_around_an_assistant_turn_is_not_a_target(tmp_path, tiny_teacher):
    """Only the turn's own text and end token are targets: not the generation prompt before it
    (rendered with add_generation_prompt) nor the newline the template puts after it."""
    tok = tokenizer_copy(tmp_path, tiny_teacher.path, CHATML)
    assert target_pieces(tok, TWO_TURNS) == ["Hello", "▁there", "</s>", "See", "▁you", "</s>"]


def test_a_template_whose_prefixes_render_differently_is_refused(tmp_path, tiny_teacher):
    """Spans come from rendering prefixes; a template that renders a prefix as something else
    (here it starts with the message count) cannot be mapped and is refused, not guessed."""
    tok = tokenizer_copy(tmp_path, tiny_teacher.path, "{{ messages | length }}" + CHATML)
    with pytest.raises(BadRecordError, match="f:1: chat template rejected.*inconsistently"):
        target_pieces(tok, TWO_TURNS)


def test_a_tokenizer_that_adds_bos_itself_still_gives_one_bos(tmp_path, tiny_teacher, teacher_tok):
    """Real Mistral tokenizers add <s> when asked for special tokens; the template already writes
    it, so the text is tokenised without them: one <s>, the same ids as the tokenizer that adds none."""
    tok = tokenizer_copy(tmp_path, tiny_teacher.path, post_processor=ADD_BOS)
    assert tok("Hi").input_ids[0] == tok.bos_token_id  # the copy does add it
    rec = parse_record(TWO_TURNS, "f:1")
    got, want = tokenize_record(tok, rec, None), tokenize_record(teacher_tok, rec, None)
    assert got.input_ids.tolist() == want.input_ids.tolist() and got.input_ids.tolist().count(tok.bos_token_id) == 1
    assert got.target_positions.tolist() == want.target_positions.tolist()


def test_a_tokenizer_without_a_chat_template_is_refused(tmp_path, tiny_teacher):
    with pytest.raises(ValueError, match="no chat template"):
        tokenizer_copy(tmp_path, tiny_teacher.path, "")


def test_a_checkpoint_without_tokenizer_files_says_so_in_a_few_words(tmp_path, tiny_teacher):
    """transformers' own message about it was cut mid-sentence at 300 characters."""
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_bytes((Path(tiny_teacher.path) / "config.json").read_bytes())
    with pytest.raises(ValueError) as e:
        load_tokenizer(str(bare))
    assert str(e.value) == (
        f"{bare}: no tokenizer files (tokenizer.json, tokenizer.model, tokenizer_config.json): "
        "copy the model's tokenizer there"
    )


def test_a_sample_of_exactly_max_length_is_not_truncated(teacher_tok):
    rec = parse_record(TWO_TURNS, "f:1")
    full = tokenize_record(teacher_tok, rec, None)
    fits = tokenize_record(teacher_tok, rec, len(full.input_ids))
    assert not fits.truncated and fits.input_ids.tolist() == full.input_ids.tolist()
    assert tokenize_record(teacher_tok, rec, len(full.input_ids) - 1).truncated


def test_fingerprint_is_the_same_for_every_load_and_sees_the_special_tokens(tmp_path, tiny_teacher, teacher_tok):
    """A fresh load (its vocabulary dict in another order) fingerprints the same; the same
    vocabulary with another end-of-sequence token does not (ids would not mean the same)."""
    assert tokenizer_fingerprint(load_tokenizer(tiny_teacher.path)) == tokenizer_fingerprint(teacher_tok)
    other_eos = tokenizer_copy(tmp_path, tiny_teacher.path, eos_token="<unk>")
    assert other_eos.get_vocab() == teacher_tok.get_vocab()
    assert tokenizer_fingerprint(other_eos) != tokenizer_fingerprint(teacher_tok)
