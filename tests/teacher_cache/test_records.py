"""Input records and the chat-template target mask, with the real Mistral tokenizer."""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from teacher_cache.records import BadRecordError, DataFileError, content_id, file_sha256, iter_records, parse_record
from teacher_cache.tokenize import tokenize_record


def test_pair_and_chat_forms_are_the_same_record():
    pair = parse_record({"prompt": "Hi", "response": "Hello"}, "f:1")
    chat = parse_record(
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}, "f:2"
    )
    assert pair.messages == chat.messages and pair.sample_id == chat.sample_id == content_id(chat.messages)
    assert parse_record({"id": 7, "prompt": "a", "response": "b"}, "f:3").sample_id == "7"
    assert parse_record({"id": 0, "prompt": "a", "response": "b"}, "f:4").sample_id == "0"  # a falsy id is an id


def test_content_id_is_the_documented_hash_of_role_and_content_only():
    """Ids of records without one are sha256 of the canonical JSON (sorted keys, UTF-8, no spaces),
    20 hex digits: caches made by other versions must give a record the same id (merge and resume
    compare ids). Keys other than role and content do not take part."""
    canonical = '[{"content":"Grüße","role":"user"},{"content":"Hallo","role":"assistant"}]'
    want = hashlib.sha256(canonical.encode()).hexdigest()[:20]
    messages = [{"role": "user", "content": "Grüße"}, {"role": "assistant", "content": "Hallo"}]
    assert content_id(messages) == want
    extra = [{**messages[0], "name": "bob"}, {**messages[1], "tool_calls": []}]
    rec = parse_record({"messages": extra}, "f:1")
    assert rec.messages == messages and rec.sample_id == want


@pytest.mark.parametrize(
    "obj,why",
    [
        ([1, 2], "expected a JSON object, got list; one JSON object per line is expected"),
        ({"messages": [{"role": "assistant", "content": "x"}], "prompt": "p", "response": "r"}, "keep one"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "robot", "content": "x"}]}, 'messages[0] has role "robot": expected system, user'),
        ({"messages": [{"content": "x"}]}, "messages[0] has no role: expected system, user or assistant"),
        ({"messages": [{"role": ["u"] * 50, "content": "x"}]}, 'messages[0] has role ["u", "u", "u", '),
        ({"prompt": "x"}, "must both be strings"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]}, "no non-empty"),
        ({"prompt": "x", "response": "y", "domain": 3}, "'domain' must be a string"),
        ({"prompt": "x", "response": "y", "domain": ""}, "'domain' must not be empty"),
        ({"prompt": "x", "response": "y", "id": True}, "'id' must be"),
        ({"prompt": "x", "response": "y", "id": ""}, "'id' must be"),
        ({"prompt": "x", "response": "y", "id": 1.5}, "'id' must be"),
        ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}, "messages[0]"),
        ({"prompt": "x", "response": "caf\ud800"}, "lone surrogate"),  # json.loads('"\\ud800"') gives one
        ({"prompt": "x", "response": "y", "domain": "\udfff"}, "lone surrogate"),
    ],
)
def test_malformed_records_name_the_problem(obj, why):
    with pytest.raises(BadRecordError, match="f.jsonl:9") as err:
        parse_record(obj, "f.jsonl:9")
    assert why in str(err.value)


def test_a_bad_record_says_how_to_skip_such_records(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\nnope\n')
    skip = "; rerun with --skip-bad to skip such records$"
    with pytest.raises(BadRecordError, match=r"d.jsonl:2: invalid JSON .*" + skip):
        list(iter_records([str(p)], skip_bad=False))
    bad: list[str] = []
    assert len(list(iter_records([str(p)], skip_bad=True, bad=bad))) == 1
    assert len(bad) == 1 and "--skip-bad" not in bad[0]  # the manifest lists what was skipped, not advice


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


def test_compressed_json_lines_read_as_the_plain_file_and_damage_is_one_line(tmp_path, chats_file):
    """.jsonl.gz (and .bz2, .xz, .zst) was refused as an "unknown data format"; the manifest's sha256
    is of the file as stored, as sha256sum gives it."""
    import bz2
    import gzip
    import lzma

    import zstandard

    raw = chats_file.read_bytes()
    plain = [(r.sample_id, r.messages, r.domain) for r in iter_records([str(chats_file)], skip_bad=False)]
    for ext, compress in ((".gz", gzip.compress), (".bz2", bz2.compress), (".xz", lzma.compress),
                          (".zst", zstandard.ZstdCompressor().compress)):  # fmt: skip
        packed = tmp_path / f"chats.jsonl{ext}"
        packed.write_bytes(compress(raw))
        assert [(r.sample_id, r.messages, r.domain) for r in iter_records([str(packed)], skip_bad=False)] == plain
        assert file_sha256(str(packed)) == "sha256:" + hashlib.sha256(packed.read_bytes()).hexdigest()
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(raw)[:200])
    with pytest.raises(DataFileError, match=rf"^{cut}: cannot decompress it \("):
        list(iter_records([str(cut)], skip_bad=False))
    parquet = tmp_path / "x.parquet.gz"  # Parquet compresses itself: only JSON lines take a suffix
    parquet.write_bytes(gzip.compress(b"PAR1"))
    with pytest.raises(DataFileError, match=r"unknown data format .*JSON lines may be compressed: .gz, .bz2"):
        list(iter_records([str(parquet)], skip_bad=False))


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


def test_a_pretty_printed_json_file_says_json_lines_are_expected(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"prompt": "a", "response": "b"}], indent=2))
    with pytest.raises(BadRecordError, match=r"d.json:1: invalid JSON .*; one JSON object per line is expected"):
        list(iter_records([str(p)], skip_bad=False))


def test_a_file_not_in_utf8_says_so(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes('{"prompt": "a", "response": "b"}\n'.encode("utf-16"))  # opens with a byte-order mark
    with pytest.raises(BadRecordError, match=r"d.jsonl:1: not UTF-8 text \(byte 0 of the line is b'\\xff'\); JSON"):
        list(iter_records([str(p)], skip_bad=False))
    p.write_bytes('\ufeff{"prompt": "a", "response": "b"}\n'.encode())  # UTF-8 with a byte-order mark: fine
    assert len(list(iter_records([str(p)], skip_bad=False))) == 1
    p.write_bytes('\ufeff\n{"prompt": "a", "response": "b"}\n'.encode())  # the mark alone on the first line
    assert len(list(iter_records([str(p)], skip_bad=False))) == 1


def test_empty_prompt_and_response_cells_beside_messages_are_no_second_sample():
    """A Parquet/datasets export of mixed rows may fill the unused columns with "" rather than null."""
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert parse_record({"messages": chat, "prompt": "", "response": ""}, "f:1").messages == chat


def test_parquet_rows_mix_chats_and_pairs_and_are_named_from_1(tmp_path):
    """In Parquet every row has every column: a pair row's `messages` is null, not a bad chat.
    A bad row is named by its 1-based row number, as JSONL lines are."""
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    p = tmp_path / "d.parquet"
    rows = [
        {"messages": chat, "prompt": None, "response": None},
        {"messages": None, "prompt": "a", "response": "b"},
        {"messages": None, "prompt": "c", "response": None},
    ]
    pq.write_table(pa.Table.from_pylist(rows), p)
    bad: list[str] = []
    got = list(iter_records([str(p)], skip_bad=True, bad=bad))
    assert [r.messages for r in got] == [
        chat,
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
    ]
    assert [r.where for r in got] == [f"{p}:1", f"{p}:2"]
    assert len(bad) == 1 and bad[0].startswith(f"{p}:3: 'prompt' and 'response'")


def test_parquet_rows_are_decoded_a_batch_at_a_time(tmp_path):
    """A Parquet file was read whole (the table, then every row as Python objects) on each of a
    run's passes over the data: ~1 GB for 384k short chats, growing with the file, where JSON lines
    stream. Reading the first record must not decode the whole file."""
    p = tmp_path / "d.parquet"
    rows = [{"id": f"r{i}", "prompt": f"q{i} " + "x" * 2000, "response": "y" * 2000} for i in range(10_000)]
    pq.write_table(pa.Table.from_pylist(rows), p, row_group_size=500)  # ~40 MB of text
    before = pa.total_allocated_bytes()
    records = iter_records([str(p)], skip_bad=False)
    first = next(records)
    held = pa.total_allocated_bytes() - before
    assert held < 15e6, f"{held / 1e6:.0f} MB of Arrow memory held to read one record"
    assert first.sample_id == "r0" and first.where == f"{p}:1"
    assert [r.where for r in records][-1] == f"{p}:10000"


def test_a_file_of_only_bad_records_is_skipped_not_called_empty(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("{bad\n" + json.dumps({"x": 1}) + "\n")
    bad: list[str] = []
    assert list(iter_records([str(p)], skip_bad=True, bad=bad)) == [] and len(bad) == 2


def test_an_empty_file_is_reported_even_after_another_files_bad_record(tmp_path):
    """With --skip-bad a file whose records were all skipped is not "empty"; a file with no
    record at all is, whatever earlier files skipped (the check is per file)."""
    a, empty = tmp_path / "a.jsonl", tmp_path / "empty.jsonl"
    a.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n{bad\n")
    empty.write_text("\n")
    bad: list[str] = []
    with pytest.raises(DataFileError, match="empty.jsonl: no records"):
        list(iter_records([str(a), str(empty)], skip_bad=True, bad=bad))
    assert len(bad) == 1
    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text("{bad\n")
    assert list(iter_records([str(only_bad)], skip_bad=True)) == []  # skipped, not empty, with or without a list


def test_json_extension_is_read_as_json_lines_and_a_directory_is_refused(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    assert len(list(iter_records([str(p)], skip_bad=False))) == 1
    (tmp_path / "folder.jsonl").mkdir()
    with pytest.raises(DataFileError, match="is a directory"):
        list(iter_records([str(tmp_path / "folder.jsonl")], skip_bad=False))


def test_file_sha256_is_the_prefixed_hex_digest_of_the_bytes(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"prompt": "a", "response": "b"}\n')
    assert file_sha256(str(p)) == "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest()


def test_a_data_url_of_a_missing_filesystem_or_a_name_with_a_star_is_handled(tmp_path):
    """A URL whose filesystem package is not installed is one line, not a traceback; a local
    name holding '*' is that file, not a pattern."""
    from teacher_cache.records import check_data_file

    with pytest.raises(DataFileError, match=r"adl://account/data.jsonl: .*"):
        check_data_file("adl://account/data.jsonl")  # adlfs is not a dependency
    star = tmp_path / "x*.jsonl"
    star.write_text(json.dumps({"id": "a", "prompt": "q", "response": "r"}) + "\n")
    check_data_file(str(star))
    assert [r.sample_id for r in iter_records([str(star)], skip_bad=False)] == ["a"]
