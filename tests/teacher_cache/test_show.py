"""`teacher-cache show`: one sample's targets as the cache holds them, tokens named by the teacher's tokenizer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from teacher_cache import open_cache
from teacher_cache.run import RunConfig, run
from teacher_cache.tokenize import load_tokenizer

TC = [sys.executable, "-m", "teacher_cache.cli"]


def sh(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*TC, "show", *args], capture_output=True, text=True, timeout=300, env=env)


def make(out: Path, chats_file: Path, **kw) -> Path:
    run(RunConfig(teacher="tiny-mixtral", data=(str(chats_file),), out=str(out), backend="hf", shard_size=5,
                  progress=False, **kw))  # fmt: skip
    return out


@pytest.fixture(scope="module")
def topk_cache(tmp_path_factory, chats_file) -> Path:
    return make(tmp_path_factory.mktemp("show") / "topk", chats_file, top_k=8)


@pytest.fixture(scope="module")
def sampled_cache(tmp_path_factory, chats_file) -> Path:
    return make(tmp_path_factory.mktemp("show") / "sampled", chats_file, targets="sampled", num_draws=20)


def last_sample(cache: Path):
    """The last sample (in the last shard: `show` must look past the first)."""
    return list(open_cache(cache))[-1]


def test_topk_view_is_the_cached_rows_with_the_true_next_token(topk_cache, teacher_tok):
    s = last_sample(topk_cache)
    done = sh([str(topk_cache), s.sample_id, "--json", "--positions", "0", "--top", "3"])
    assert done.returncode == 0, done.stderr
    view = json.loads(done.stdout)
    P = len(s.target_positions)
    assert (view["sample_id"], view["targets"], view["target_positions"], view["shown"]) == (s.sample_id, "top-8", P, P)
    for p, row in enumerate(view["positions"]):
        t = int(s.target_positions[p])
        nxt = int(s.input_ids[t + 1])
        assert row["position"] == t and row["next"]["id"] == nxt
        assert row["next"]["token"] == teacher_tok.convert_ids_to_tokens(nxt)
        assert [e["id"] for e in row["top"]] == s.topk_ids[p, :3].tolist()
        np.testing.assert_allclose([e["p"] for e in row["top"]], np.exp(s.topk_logprobs[p, :3]), rtol=1e-6)
        np.testing.assert_allclose(row["tail_p"], np.exp(s.tail_logprob[p]), rtol=1e-6)
        hit = np.flatnonzero(s.topk_ids[p] == nxt)
        if len(hit):
            assert row["next"]["rank"] == hit[0] + 1
            np.testing.assert_allclose(row["next"]["p"], np.exp(s.topk_logprobs[p, hit[0]]), rtol=1e-6)
        else:  # past the top-k: the cache does not hold its probability
            assert row["next"]["rank"] is None and row["next"]["p"] is None


def test_text_view_names_tokens_and_says_how_many_positions_it_left_out(topk_cache, teacher_tok):
    s = next(iter(open_cache(topk_cache)))
    done = sh([str(topk_cache), "--positions", "2"])  # no id: the cache's first sample
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"sample {s.sample_id!r} (source tiny-mixtral")
    assert "the teacher's tokenizer" in lines[1]
    first = lines[3].split()
    assert first[0] == str(s.target_positions[0])
    assert first[1] == repr(teacher_tok.convert_ids_to_tokens(int(s.input_ids[s.target_positions[0] + 1])))
    assert lines[-1] == f"first 2 of {len(s.target_positions)} target positions (--positions 0: all)"


def test_sampled_view_gives_each_drawn_ids_share_most_drawn_first(sampled_cache):
    s = last_sample(sampled_cache)
    done = sh([str(sampled_cache), s.sample_id, "--json", "--positions", "0", "--top", "50"])
    assert done.returncode == 0, done.stderr
    view = json.loads(done.stdout)
    assert view["targets"] == "sampled, 20 draws"
    for p, row in enumerate(view["positions"]):
        lo, hi = s.sampled_offsets[p], s.sampled_offsets[p + 1]
        drawn = dict(zip(s.sampled_ids[lo:hi].tolist(), s.sampled_counts[lo:hi].tolist(), strict=True))
        assert {e["id"]: round(e["p"] * 20) for e in row["top"]} == drawn
        shares = [e["p"] for e in row["top"]]
        assert shares == sorted(shares, reverse=True) and "tail_p" not in row
        nxt = row["next"]
        assert nxt["p"] == (drawn[nxt["id"]] / 20 if nxt["id"] in drawn else None)


def test_without_the_teachers_tokenizer_ids_are_shown_and_nothing_is_built(topk_cache, tmp_path):
    """Another machine: the teacher's folder is not there, nor the preset built; show must not
    build it (minutes for a real one)."""
    cache, home = tmp_path / "cache", tmp_path / "home"
    shutil.copytree(topk_cache, cache)
    m = json.loads((cache / "manifest.json").read_text())
    m["teacher"]["path"] = str(tmp_path / "on-another-machine")  # provenance: not in the config hash
    (cache / "manifest.json").write_text(json.dumps(m))
    done = sh([str(cache), "--positions", "1"], env={**os.environ, "TEACHER_CACHE_HOME": str(home)})
    assert done.returncode == 0, done.stderr
    assert "token ids only" in done.stdout.splitlines()[1] and "#" in done.stdout.splitlines()[3]
    assert not (home / "models").exists()


def test_a_foreign_tokenizer_an_unknown_id_and_a_damaged_shard_are_one_line_errors(topk_cache, tiny_teacher, tmp_path):
    other = tmp_path / "other-tok"
    tok = load_tokenizer(tiny_teacher.path)  # a fresh one: the session's is shared
    tok.add_tokens(["<an-extra-token>"])  # one id more: another fingerprint
    tok.save_pretrained(other)
    for args, says in [
        ([str(topk_cache), "--tokenizer", str(other)], "not the cache's tokenizer"),
        ([str(topk_cache), "no-such-id"], "no sample 'no-such-id'"),
        # a file, not a folder (a tokenizer.json), and a name that is no preset: one line, not a traceback
        ([str(topk_cache), "--tokenizer", str(other / "tokenizer.json")], "not a preset"),
        ([str(topk_cache), "--tokenizer", "no-such-preset"], "not a preset"),
    ]:
        done = sh(args)
        assert done.returncode == 1 and done.stderr.count("\n") == 1 and says in done.stderr, done.stderr
    cache = tmp_path / "damaged"
    shutil.copytree(topk_cache, cache)
    shard = cache / open_cache(cache).shard_names[-1]
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    shard.write_bytes(bytes(blob))
    done = sh([str(cache), last_sample(topk_cache).sample_id])
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and shard.name in done.stderr, done.stderr


def test_a_tokenizer_folder_without_a_chat_template_is_enough_to_name_tokens(topk_cache, tiny_teacher, tmp_path):
    """show names tokens only: the cache's vocabulary is what counts, not a chat template (run needs one)."""
    tok = load_tokenizer(tiny_teacher.path)
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "tok")
    cfg = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert not cfg.get("chat_template") and not (tmp_path / "tok" / "chat_template.jinja").exists()
    done = sh([str(topk_cache), "--positions", "1", "--tokenizer", str(tmp_path / "tok")])
    assert done.returncode == 0, done.stderr
    assert f"tokens: {tmp_path / 'tok'}'s tokenizer" in done.stdout and "▁" in done.stdout
