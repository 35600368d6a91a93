"""Input records and the chat-template target mask, with the real Mistral tokenizer."""

from __future__ import annotations

import json

import pytest

from teacher_cache.records import BadRecordError, DataFileError, content_id, iter_records, parse_record
from teacher_cache.tokenize import tokenize_record


def test_pair_and_chat_forms_are_the_same_record():
    pair = parse_record({"prompt": "Hi", "response": "Hello"}, "f:1")
    chat = parse_record(
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}, "f:2"
    )
    assert pair.messages == chat.messages and pair.sample_id == chat.sample_id == content_id(chat.messages)
    assert parse_record({"id": 7, "prompt": "a", "response": "b"}, "f:3").sample_id == "7"


@pytest.mark.parametrize(
    "obj,why",
    [
        ([1, 2], "expected a JSON object"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0]"),
        ({"prompt": "x"}, "must both be strings"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]}, "no non-empty"),
        ({"prompt": "x", "response": "y", "domain": 3}, "'domain' must be a string"),
        ({"prompt": "x", "response": "y", "id": True}, "'id' must be"),
        ({"prompt": "x", "response": "caf\ud800"}, "lone surrogate"),  # json.loads('"\\ud800"') gives one
        ({"prompt": "x", "response": "y", "domain": "\udfff"}, "lone surrogate"),
    ],
)
def test_malformed_records_name_the_problem(obj, why):
    with pytest.raises(BadRecordError, match="f.jsonl:9") as err:
        parse_record(obj, "f.jsonl:9")
    assert why in str(err.value)


def test_empty_file_is_an_error(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n\n")
    with pytest.raises(DataFileError, match="no records"):
        list(iter_records([str(p)], skip_bad=False))


def test_unknown_extension(tmp_path):
    p = tmp_path / "data.csv"
    p.write_text("a,b\n")
    with pytest.raises(DataFileError, match="unknown data format"):
        list(iter_records([str(p)], skip_bad=False))


def test_assistant_mask_covers_every_assistant_turn_and_nothing_else(teacher_tok):
    rec = parse_record(
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"},
            ]
        },
        "f:1",
    )
    tk = tokenize_record(teacher_tok, rec, None)
    assert teacher_tok.decode(tk.input_ids) == (
        "<s>[INST] Be brief.\n\nHi there [/INST] Hello! How can I help?</s>[INST] 2+2? [/INST] 4</s>"
    )
    targets = tk.input_ids[tk.target_positions + 1]
    pieces = teacher_tok.convert_ids_to_tokens(targets.tolist())
    assert pieces == ["▁Hello", "!", "▁How", "▁can", "▁I", "▁help", "?", "</s>", "▁", "4", "</s>"]


def test_roles_must_alternate(teacher_tok):
    rec = parse_record(
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "user", "content": "b"},
                {"role": "assistant", "content": "c"},
            ]
        },
        "f:4",
    )
    with pytest.raises(BadRecordError, match="f:4: chat template rejected.*alternate"):
        tokenize_record(teacher_tok, rec, None)


def test_truncation_flags_and_keeps_only_what_fits(teacher_tok):
    rec = parse_record({"prompt": "Count: " + "one two three " * 20, "response": "Done counting now."}, "f:1")
    with pytest.raises(BadRecordError, match="truncation left no assistant token"):
        tokenize_record(teacher_tok, rec, 20)
    full = tokenize_record(teacher_tok, rec, None)
    cut = tokenize_record(teacher_tok, rec, len(full.input_ids) - 2)
    assert cut.truncated and not full.truncated
    assert list(cut.target_positions) == [t for t in full.target_positions if t + 1 < len(full.input_ids) - 2]


def test_skip_bad_reports_each_bad_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n{bad\n" + json.dumps({"x": 1}) + "\n")
    bad: list[str] = []
    got = list(iter_records([str(p)], skip_bad=True, bad=bad))
    assert len(got) == 1 and len(bad) == 2
    assert bad[0].startswith(f"{p}:2: invalid JSON") and bad[1].startswith(f"{p}:3: record has neither")
