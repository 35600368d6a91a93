"""`teacher-cache run` end to end: real model, real shards, resume after kill -9, bad input."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from teacher_cache import codec, open_cache
from teacher_cache.manifest import ManifestError, assemble
from teacher_cache.merge import MergeError, merge
from teacher_cache.models import resolve_model
from teacher_cache.records import BadRecordError
from teacher_cache.run import RunConfig, RunError, run
from teacher_cache.storage import Location
from tests.procs import descendants

CLI = [sys.executable, "-m", "teacher_cache.cli"]


def cfg(data: Path, out: Path, **kw) -> RunConfig:
    base = dict(
        teacher="tiny-mixtral",
        data=(str(data),),
        out=str(out),
        backend="hf",
        top_k=8,
        shard_size=3,
        batch_size=2,
        progress=False,
    )
    return RunConfig(**{**base, **kw})


def rows(out: Path) -> dict[str, dict]:
    fields = (
        "source",
        "domain",
        "input_ids",
        "target_positions",
        "topk_ids",
        "topk_logprobs",
        "tail_logprob",
        "sampled_ids",
        "sampled_counts",
        "attention_ids",
        "attention_logprobs",
    )
    return {s.sample_id: {f: getattr(s, f) for f in fields} for s in open_cache(out)}


def assert_same_rows(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for sid in a:
        for f, v in a[sid].items():
            w = b[sid][f]
            if isinstance(v, np.ndarray) and v.dtype.kind == "f":
                # other batch compositions pad differently: float rounding may move a value across
                # one codec quantisation step (0.04 nats), never more
                np.testing.assert_allclose(v, w, rtol=0, atol=0.0401, err_msg=f"{sid}.{f}")
            elif isinstance(v, np.ndarray):
                np.testing.assert_array_equal(v, w, err_msg=f"{sid}.{f}")
            else:
                assert v == w, f"{sid}.{f}"


def test_run_writes_a_complete_verified_cache(tmp_path, chats_file):
    out = tmp_path / "cache"
    run(cfg(chats_file, out, attention_layers=(1,), attention_top_k=4))
    cache = open_cache(out)
    m = cache.manifest
    assert m["counts"]["samples"] == 12 and len(m["shards"]) == 4
    assert m["tokenizer"]["vocab_size"] == 32000 and m["targets"] == {
        "kind": "topk",
        "k": 8,
        "logprob_error": 0.02,
        "temperature": 1.0,
        "logprobs": "natural log, raw",
    }
    assert m["data"]["files"][0]["sha256"].startswith("sha256:")
    assert m["attention"]["layers"] == [1] and m["attention"]["source"] == "hf"
    samples = list(cache)
    assert sum(len(s.target_positions) for s in samples) == m["counts"]["target_positions"]
    for s in samples:
        P = len(s.target_positions)
        assert s.topk_ids.shape == (P, 8) and s.topk_logprobs.dtype == np.float32
        mass = np.exp(s.topk_logprobs.astype(np.float64)).sum(1) + np.exp(s.tail_logprob.astype(np.float64))
        np.testing.assert_allclose(mass, 1.0, atol=0.02)
        assert s.attention_ids.shape == (1, P, 4) and s.source == "tiny-mixtral"
    assert {s.domain for s in samples} == {"geography", "math", "code", None}
    done = subprocess.run([*CLI, "verify", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    shown = json.loads(subprocess.run([*CLI, "inspect", str(out), "--json"], capture_output=True, text=True).stdout)
    assert shown["samples"] == 12 and shown["bytes_per_target_position"] > 0
    human = subprocess.run([*CLI, "inspect", str(out)], capture_output=True, text=True).stdout.splitlines()
    assert '                   backend: {"backend": "hf", "vllm_mode": null}' in human  # was Python's repr, None


def test_finished_run_does_nothing_when_restarted(tmp_path, chats_file, capsys):
    out = tmp_path / "cache"
    run(cfg(chats_file, out))
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    # temps of writes a kill -9 cut short: the worker's own part's go, the manifest's once an hour old
    part = next(out.glob("parts/worker-*.json"))
    left = [part.with_name(f".{part.name}.4242-0badc0de.tmp"), out / ".manifest.json.4242-0badc0de.tmp"]
    fresh = out / ".manifest.json.4343-0badc0de.tmp"  # another machine's worker may be writing it now
    for tmp in (*left, fresh):
        tmp.write_text('{"half": ')
    os.utime(left[1], (time.time() - 7200,) * 2)
    run(cfg(chats_file, out))
    assert "nothing to do" in capsys.readouterr().err
    assert before == {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    assert not any(p.exists() for p in left) and fresh.exists()
    fresh.unlink()
    # a damaged manifest (written whole by a run, so damaged from outside): refused, with the way out
    manifest = (out / "manifest.json").read_bytes()
    (out / "manifest.json").write_bytes(manifest[:100])
    with pytest.raises(RunError, match=r"delete that file and run again \(parts/ rebuild it\); else use another"):
        run(cfg(chats_file, out))
    (out / "manifest.json").unlink()
    run(cfg(chats_file, out))
    assert json.loads((out / "manifest.json").read_bytes()) == json.loads(manifest)


def test_other_settings_into_the_same_directory_are_refused(tmp_path, chats_file):
    out = tmp_path / "cache"
    run(cfg(chats_file, out))
    shutil.rmtree(out / "parts")  # a finished cache needs only its manifest (a merged one has no parts)
    with pytest.raises(RunError, match=r"different settings \(targets.k differ\)"):
        run(cfg(chats_file, out, top_k=4))
    assert not (out / "parts").exists()  # a refused run leaves the cache as it was
    data = tmp_path / "chats.jsonl"  # same path and arguments, other content
    data.write_text(chats_file.read_text())
    run(cfg(data, tmp_path / "c2"))
    data.write_text(chats_file.read_text().replace("a", "b", 1))
    with pytest.raises(RunError, match=r"data.files\[0\].sha256 differ"):
        run(cfg(data, tmp_path / "c2"))


def test_the_same_teacher_and_data_at_other_paths_are_the_same_run(tmp_path, chats_file, capsys, monkeypatch):
    """A checkpoint and data moved (another machine, another working directory, a relative path)
    are the same run: their sha256s identify them, and the default source tag is the checkpoint
    folder's name, not the path typed. A teacher folder of another name is another tag."""
    teacher = resolve_model("tiny-mixtral").path
    for where in ("a", "b"):
        shutil.copytree(teacher, tmp_path / where / "mixtral-tiny")
        shutil.copy(chats_file, tmp_path / where / "chats.jsonl")
    out = tmp_path / "cache"
    run(cfg(tmp_path / "a" / "chats.jsonl", out, teacher=str(tmp_path / "a" / "mixtral-tiny")))
    assert open_cache(out).manifest["source"] == "mixtral-tiny"
    monkeypatch.chdir(tmp_path / "b")
    run(cfg(Path("chats.jsonl"), out, teacher="mixtral-tiny"))
    assert "nothing to do" in capsys.readouterr().err
    (tmp_path / "b" / "mixtral-tiny").rename(tmp_path / "b" / "other")
    with pytest.raises(RunError, match=r"different settings \(source differ\)"):
        run(cfg(Path("chats.jsonl"), out, teacher="other"))
    run(cfg(Path("chats.jsonl"), out, teacher="other", source="mixtral-tiny"))
    assert "nothing to do" in capsys.readouterr().err


def test_timing_counts_each_attempt_once(tmp_path, chats_file):
    """A part's timing.wall_s is the time of every attempt so far; a redo (here of a lost shard of a
    finished run that had been resumed once) adds only its own time."""
    out = tmp_path / "cache"
    run(cfg(chats_file, out))
    part_file = out / "parts" / "worker-00000-of-00001.json"
    part = json.loads(part_file.read_text())
    part["elapsed_before_s"], part["timing"]["wall_s"] = 600.0, 1000.0  # 600 s, then 400 s more
    part_file.write_text(json.dumps(part))
    sorted(out.glob("shard-*"))[-1].unlink()
    t0 = time.time()
    run(cfg(chats_file, out))
    took = time.time() - t0
    timing = json.loads(part_file.read_text())["timing"]
    assert 1000.0 < timing["wall_s"] <= 1000.0 + took
    assert timing["tokens_per_s"] == pytest.approx(open_cache(out).manifest["counts"]["tokens"] / timing["wall_s"])


def test_a_worker_resumes_only_with_its_own_backend(tmp_path, chats_file):
    out = tmp_path / "cache"
    run(cfg(chats_file, out))
    part = out / "parts" / "worker-00000-of-00001.json"  # as if killed after its last shard
    part.write_text(json.dumps({**json.loads(part.read_text()), "complete": False}))
    (out / "manifest.json").unlink()
    with pytest.raises(RunError, match="made with backend hf, vllm mode None, .*resume with the same --backend"):
        run(cfg(chats_file, out, backend="vllm"))
    run(cfg(chats_file, out))
    assert open_cache(out).manifest["backend"] == {"backend": "hf", "vllm_mode": None}


def test_a_run_that_failed_before_its_first_shard_runs_again_once_the_data_is_fixed(tmp_path, chats_file):
    data, out = tmp_path / "chats.jsonl", tmp_path / "cache"
    data.write_text(chats_file.read_text() + "{not json\n")
    with pytest.raises(BadRecordError, match="invalid JSON"):
        run(cfg(data, out, shard_size=100))
    assert not out.exists()  # the --out it made is removed again
    (out / "parts").mkdir(parents=True)  # as a kill -9 leaves it: the part file stays
    with pytest.raises(BadRecordError, match="invalid JSON"):
        run(cfg(data, out, shard_size=100))
    assert json.loads((out / "parts" / "worker-00000-of-00001.json").read_text())["shards"] == []
    data.write_text(chats_file.read_text())
    run(cfg(data, out, shard_size=100))
    assert len(list(open_cache(out))) == 12


def test_a_bad_record_found_mid_run_is_skipped_on_resume_keeping_the_finished_shards(tmp_path, chats_file):
    """A record that parses but cannot be tokenised (roles that do not alternate) is found only
    when its shard is reached: the run stops, says how to go on, and a rerun with --skip-bad (not
    another setting: it decides no row's content) resumes after the finished shards."""
    lines = chats_file.read_text().splitlines()
    bad = {"id": "late", "messages": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]}
    data, out = tmp_path / "d.jsonl", tmp_path / "c"
    data.write_text("\n".join([*lines, json.dumps(bad)]) + "\n")
    with pytest.raises(BadRecordError, match="d.jsonl:13: .*finished shards are kept: rerun with --skip-bad"):
        run(cfg(data, out))
    done = json.loads((out / "parts" / "worker-00000-of-00001.json").read_text())["shards"]
    assert len(done) == 4
    first = tmp_path / "first.jsonl"  # in the first shard: no finished shard to speak of
    first.write_text("\n".join([json.dumps(bad), *lines]) + "\n")
    with pytest.raises(BadRecordError, match=r"first.jsonl:1: [^;]*; rerun with --skip-bad to skip such records$"):
        run(cfg(first, tmp_path / "c1"))
    before = {d["name"]: (out / d["name"]).read_bytes() for d in done}
    run(cfg(data, out, skip_bad=True))
    m = open_cache(out).manifest
    assert m["counts"]["samples"] == 12 and m["counts"]["skipped_bad"] == 1
    assert all((out / name).read_bytes() == b for name, b in before.items())


def test_kill_midway_then_resume_equals_uninterrupted(tmp_path, chats_file):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    run(cfg(chats_file, clean, shard_size=2))
    args = [
        *CLI,
        "run",
        "--teacher",
        "tiny-mixtral",
        "--data",
        str(chats_file),
        "--out",
        str(killed),
        "--backend",
        "hf",
        "--top-k",
        "8",
        "--shard-size",
        "2",
        "--batch-size",
        "2",
        "--no-progress",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    part = killed / "parts" / "worker-00000-of-00001.json"
    deadline = time.time() + 120
    # durable shards, not the part's list: its rewrites are paced (at most 2 % of the run), so with
    # shards this small it may list the first and then all six
    while time.time() < deadline and len(list(killed.glob("shard-*.arrow"))) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 2 <= len(list(killed.glob("shard-*.arrow"))) < 6, "the kill must land mid-run"
    assert len(json.loads(part.read_text())["shards"]) >= 1  # the first shard is listed at once
    assert not (killed / "manifest.json").exists()
    with pytest.raises(ValueError, match="incomplete"):
        open_cache(killed)
    resumed = subprocess.run(args, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert not list(killed.glob("*.tmp"))
    assert_same_rows(rows(clean), rows(killed))
    a, b = open_cache(clean).manifest, open_cache(killed).manifest
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def test_workers_split_disjointly_and_assemble_one_manifest(tmp_path, chats_file):
    out = tmp_path / "cache"
    for w in range(3):
        if w < 2:
            run(cfg(chats_file, out, worker_index=w, num_workers=3))
            assert not (out / "manifest.json").exists()
    run(cfg(chats_file, out, worker_index=2, num_workers=3))
    ids = [s.sample_id for s in open_cache(out)]
    assert len(ids) == len(set(ids)) == 12
    assert_same_rows(rows(out), rows_single(tmp_path, chats_file))


def rows_single(tmp_path: Path, data: Path) -> dict:
    out = tmp_path / "single"
    run(cfg(data, out))
    return rows(out)


def test_domain_filters_and_source_tag(tmp_path, chats_file):
    out = tmp_path / "math"
    run(cfg(chats_file, out, only_domain="math", source="math-expert"))
    got = list(open_cache(out))
    assert {s.domain for s in got} == {"math"} and {s.source for s in got} == {"math-expert"}
    out2 = tmp_path / "general"
    run(cfg(chats_file, out2, exclude_domain="math"))
    assert len(open_cache(out2)) == 10


def test_sampled_targets(tmp_path, chats_file):
    out = tmp_path / "sampled"
    run(cfg(chats_file, out, targets="sampled", num_draws=20))
    for s in open_cache(out):
        P = len(s.target_positions)
        assert s.topk_ids is None and len(s.sampled_offsets) == P + 1 and s.num_draws == 20
        counts = np.add.reduceat(s.sampled_counts, s.sampled_offsets[:-1])
        np.testing.assert_array_equal(counts, 20)


def test_logprob_error_trades_fidelity_for_size(tmp_path, chats_file):
    """--logprob-error through the CLI: the manifest records it, the shards shrink, every value
    stays within it of the default cache's (itself within 0.02 of exact), verify accepts the
    looser mass; an off-grid value is one clear line and exit 2, before anything is written."""
    exact, loose = tmp_path / "exact", tmp_path / "loose"
    run(cfg(chats_file, exact, attention_layers=(1,), attention_top_k=4))
    args = ["--teacher", "tiny-mixtral", "--data", str(chats_file), "--backend", "hf", "--top-k", "8"]
    args += ["--shard-size", "3", "--attention-layers", "1", "--attention-top-k", "4", "--no-progress"]
    done = subprocess.run(
        [*CLI, "run", *args, "--out", str(loose), "--logprob-error", "0.2"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    m = open_cache(loose).manifest
    assert m["targets"]["logprob_error"] == 0.2 and m["attention"]["logprob_error"] == 0.2
    size = {d: sum(sh["bytes"] for sh in open_cache(d).manifest["shards"]) for d in (exact, loose)}
    assert size[loose] < size[exact]
    a, b = rows(exact), rows(loose)
    for sid in a:
        np.testing.assert_array_equal(a[sid]["topk_ids"], b[sid]["topk_ids"])
        for f in ("topk_logprobs", "attention_logprobs"):
            x, y = a[sid][f], b[sid][f]
            near = np.isfinite(x) & (x >= x[..., :1] - 10)
            assert np.abs(x - y)[near].max(initial=0) <= 0.2 + 0.02 + 1e-5, f"{sid}.{f}"
    done = subprocess.run([*CLI, "verify", str(loose)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    bad = tmp_path / "bad"
    done = subprocess.run(
        [*CLI, "run", *args, "--out", str(bad), "--logprob-error", "0.0125"], capture_output=True, text=True
    )
    assert done.returncode != 0 and "--logprob-error" in done.stderr and "multiple of 0.005" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not bad.exists()


def test_truncation_is_counted(tmp_path, chats_file):
    out = tmp_path / "short"
    run(cfg(chats_file, out, max_length=24, skip_bad=True))
    c = open_cache(out).manifest["counts"]
    assert c["truncated"] > 0
    assert all(len(s.input_ids) <= 24 for s in open_cache(out))


BAD_INPUTS = {
    "malformed line": ('{"prompt": "hi", "response": "yo"}\n{not json\n', "bad.jsonl:2: invalid JSON"),
    "missing messages": ('{"prompt": "hi", "response": "yo"}\n{"text": "hello"}\n', "bad.jsonl:2: record has neither"),
    "no assistant turn": ('{"messages": [{"role": "user", "content": "hi"}]}\n', "bad.jsonl:1: conversation has no"),
    "empty file": ("", "no records"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_fails_clearly_and_leaves_no_half_shard(tmp_path, case):
    text, message = BAD_INPUTS[case]
    data = tmp_path / "bad.jsonl"
    data.write_text(text)
    out = tmp_path / "cache"
    done = subprocess.run(
        [
            *CLI,
            "run",
            "--teacher",
            "tiny-mixtral",
            "--data",
            str(data),
            "--out",
            str(out),
            "--backend",
            "hf",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and message in last and "Traceback" not in done.stderr
    assert not list(out.glob("shard-*")) and not (out / "manifest.json").exists()


def test_skip_bad_counts_instead_of_failing(tmp_path, chats_file, capsys):
    data = tmp_path / "mixed.jsonl"
    data.write_text(chats_file.read_text() + "{oops\n" + '{"messages": [{"role": "user", "content": "x"}]}\n')
    out = tmp_path / "cache"
    run(cfg(data, out, skip_bad=True))
    m = open_cache(out).manifest
    assert m["counts"]["skipped_bad"] == 2 and m["counts"]["samples"] == 12
    assert any(":13: invalid JSON" in b for b in m["bad_records"])
    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text("{oops\n")
    run(cfg(only_bad, tmp_path / "empty", skip_bad=True))
    assert open_cache(tmp_path / "empty").manifest["counts"]["samples"] == 0
    assert "warning: every record of worker 0's share is malformed (1 skipped by --skip-bad" in capsys.readouterr().err
    two = tmp_path / "two"  # a line that does not parse belongs to no worker: counted once, by worker 0
    for w in range(2):
        run(cfg(data, two, skip_bad=True, worker_index=w, num_workers=2))
    m = open_cache(two).manifest
    assert m["counts"]["skipped_bad"] == 2 and len(m["bad_records"]) == 2 and m["counts"]["samples"] == 12


def test_the_summary_says_what_was_dropped_and_warns_of_an_empty_share(tmp_path, chats_file, capsys):
    """Repeated records were dropped without a word (only `inspect` showed them); a share whose
    every record was refused when tokenised made an empty cache without a warning."""
    data = tmp_path / "twice.jsonl"
    first = chats_file.read_text().splitlines(keepends=True)[0]
    data.write_text(chats_file.read_text() + first + first)
    run(cfg(data, tmp_path / "a"))
    log = capsys.readouterr().err
    assert "worker 0: 12 samples, " in log and ", 0 truncated, 2 repeated records dropped in " in log
    data.write_text(first + first)
    run(cfg(data, tmp_path / "one"))
    log = capsys.readouterr().err
    one = r"worker 0: 1 sample, \d+ target positions, 0 skipped, 0 truncated, 1 repeated record dropped in "
    assert re.search(one, log), log
    run(cfg(chats_file, tmp_path / "short", max_length=2, skip_bad=True))
    log = capsys.readouterr().err
    assert "warning: every record of worker 0's share was refused when tokenised (12 skipped by --skip-bad" in log
    assert open_cache(tmp_path / "short").manifest["counts"]["samples"] == 0


def test_a_repeated_id_with_another_domain_is_not_a_duplicate(tmp_path, chats_file):
    first = json.loads(chats_file.read_text().splitlines()[0])
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(first) + "\n" + json.dumps({**first, "domain": "law"}) + "\n")
    first_at = rf"reused for different content \(first at {data}:1\); rerun with --skip-bad"
    with pytest.raises(BadRecordError, match=rf"d.jsonl:2: id '[^']+' {first_at}"):
        run(cfg(data, tmp_path / "c"))


def test_workers_run_with_other_settings_are_named_when_they_meet(tmp_path, chats_file):
    """Workers started together see no shard of each other's before they finish: the last one to
    finish names the settings that differ and the part file to delete."""
    out, other = tmp_path / "c", tmp_path / "other"
    run(cfg(chats_file, out, worker_index=0, num_workers=2))
    run(cfg(chats_file, other, worker_index=1, num_workers=2, top_k=4))
    for f in (other / "parts").iterdir():
        shutil.copy(f, out / "parts" / f.name)
    for f in other.glob("shard-*"):
        shutil.copy(f, out / f.name)
    with pytest.raises(
        ManifestError,
        match=r"worker 1 of 2 was run with other settings than worker 0 \(targets.k "
        r"differ\): .*deleting its part file parts/worker-00001-of-00002.json",
    ):
        assemble(Location(out), 2)  # fmt: skip


def _padded_teacher(src: str, dst: Path, vocab: int) -> Path:
    """tiny-mixtral with its embeddings and output layer resized to `vocab` rows; the new output
    rows are made to win every position (the worst case of a padded vocabulary): they are
    +-100 x the first hidden dimensions, so one of them gives 100 x max |h_i| (the mean of the
    real rows x 50, as before, has a norm of 1.8 beside their 6.4: no position ranked one)."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(src, dst)
    model = AutoModelForCausalLM.from_pretrained(dst)
    model.resize_token_embeddings(vocab, mean_resizing=False)
    with torch.no_grad():
        head = model.get_output_embeddings().weight  # [vocab, D]
        extra = max(vocab - 32000, 0)
        basis = 100 * torch.eye(extra // 2 + 1, head.shape[1])  # [extra / 2 + 1, D]
        head[32000:] = torch.cat([basis, -basis])[:extra]
    model.save_pretrained(dst)
    return dst


def test_an_output_layer_padded_past_the_tokenizer_is_cut_to_it(tmp_path, chats_file):
    """Phi-3 / Qwen2.5 pad the output layer past the tokenizer: those columns name no token, so
    they are dropped before top-k and sampling (an id past the tokenizer used to stop the run);
    a tokenizer larger than the output layer is one line naming both sizes."""
    padded = _padded_teacher(resolve_model("tiny-mixtral").path, tmp_path / "padded", 32064)
    for targets in ("topk", "sampled"):
        out = tmp_path / targets
        run(cfg(chats_file, out, teacher=str(padded), targets=targets))
        for s in open_cache(out):
            ids = s.topk_ids if targets == "topk" else s.sampled_ids
            assert int(ids.max()) < 32000
    small = _padded_teacher(resolve_model("tiny-mixtral").path, tmp_path / "small", 31990)
    with pytest.raises(RunError, match="output layer has 31990 rows but its tokenizer 32000 tokens"):
        run(cfg(chats_file, tmp_path / "s", teacher=str(small)))


def test_vllm_stock_mode_refuses_an_output_layer_padded_past_the_tokenizer(tmp_path, chats_file):
    """vLLM's prompt log-probs are normalised over every output row and rank the padded ones in the
    top-k (the run built its engine, then stopped at the first record: "ids must lie in [0,
    vocab_size=32000)"): a local teacher is refused before --out is made."""
    padded = _padded_teacher(resolve_model("tiny-mixtral").path, tmp_path / "padded", 32064)
    plp = cfg(chats_file, tmp_path / "plp", teacher=str(padded), backend="vllm", vllm_mode="prompt_logprobs",
              max_length=256)  # fmt: skip
    with pytest.raises(RunError, match=r"has 32064 rows, past its tokenizer's 32000 tokens.*--vllm-mode hidden"):
        run(plp)
    assert not (tmp_path / "plp").exists()


def test_vllm_stock_mode_says_when_no_mode_can_take_a_padded_teacher(tmp_path, chats_file):
    """A padded output layer and a logit transform (logit_scale, as Cohere's): the refusal said "use
    --vllm-mode hidden or --backend hf", which refuse the transform ("use --vllm-mode prompt_logprobs")."""
    padded = _padded_teacher(resolve_model("tiny-mixtral").path, tmp_path / "padded", 32064)
    config = json.loads((padded / "config.json").read_text())
    (padded / "config.json").write_text(json.dumps({**config, "logit_scale": 0.5}))
    plp = cfg(chats_file, tmp_path / "plp", teacher=str(padded), backend="vllm", vllm_mode="prompt_logprobs",
              max_length=256)  # fmt: skip
    said = r"transformed \(logit_scale\), which --vllm-mode hidden and --backend hf refuse: no mode here can cache"
    with pytest.raises(RunError, match=said) as refused:
        run(plp)
    assert "use --vllm-mode hidden" not in str(refused.value)
    assert not (tmp_path / "plp").exists()


@pytest.mark.slow
def test_vllm_stock_mode_stops_at_an_id_past_the_tokenizer(tmp_path, chats_file, monkeypatch):
    """A teacher whose config is not read before the run (a hub one) is refused once its engine is
    loaded (its config then read from the files it loaded), else when vLLM's top-k holds an id past
    the tokenizer, in those words (not the codec's, naming a record): an engine whose extra rows
    never rank would have put their mass in the tail unsaid."""
    import teacher_cache.run as run_module
    from teacher_cache.backends.vllm_backend import VllmBackend

    padded = _padded_teacher(resolve_model("tiny-mixtral").path, tmp_path / "padded", 32064)
    engine = VllmBackend(resolve_model(str(padded)), mode="prompt_logprobs", top_k=8, max_model_len=257)
    plp = cfg(chats_file, tmp_path / "plp", backend="vllm", vllm_mode="prompt_logprobs", max_length=256)
    try:  # tiny-mixtral's config passes the check before the run; the engine given is the padded one
        with pytest.raises(RunError, match=r"has 32064 rows, past its tokenizer's 32000 tokens.*--vllm-mode hidden"):
            run(plp, backend=engine)
        assert not (tmp_path / "plp" / "shard-w00000-000000.arrow").exists()
        with monkeypatch.context() as m:  # the check at load skipped: the ids are the last line of defence
            m.setattr(run_module, "check_vocab", lambda *a, **kw: None)
            with pytest.raises(RunError, match=r"gave id 320\d\d, past its tokenizer's 32000 tokens"):
                run(cfg(chats_file, tmp_path / "plp2", backend="vllm", vllm_mode="prompt_logprobs", max_length=256),
                    backend=engine)  # fmt: skip
    finally:
        engine.close()


def test_max_length_past_the_teachers_positions_is_refused(tmp_path, chats_file):
    """--max-length beyond a local teacher's max_position_embeddings is one line, before --out
    exists (the hf backend would compute targets there by extrapolation, without a word)."""
    with pytest.raises(RunError, match="--max-length 4096 is past the 2048 positions tiny-mixtral was trained on"):
        run(cfg(chats_file, tmp_path / "long", max_length=4096))
    assert not (tmp_path / "long").exists()
    # vLLM's stock mode generates a token after the prompt: the default 2048 was vLLM's own traceback
    plp = cfg(chats_file, tmp_path / "plp", backend="vllm", vllm_mode="prompt_logprobs", max_length=2048)
    with pytest.raises(RunError, match="use --max-length 2047 or less, or --vllm-mode hidden$"):
        run(plp)
    assert not (tmp_path / "plp").exists()


def test_parquet_input(tmp_path, chats_file):
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = [json.loads(line) for line in chats_file.read_text().splitlines() if '"prompt"' in line]
    table = pa.Table.from_pylist([{"id": r["id"], "prompt": r["prompt"], "response": r["response"]} for r in recs])
    pq.write_table(table, tmp_path / "pairs.parquet")
    out = tmp_path / "cache"
    run(cfg(tmp_path / "pairs.parquet", out))
    assert sorted(s.sample_id for s in open_cache(out)) == sorted(r["id"] for r in recs)


@pytest.mark.slow
def test_vllm_run_matches_hf_run(tmp_path, chats_file, vllm_hidden):
    """The pipeline with the vLLM engine gives the hf pipeline's targets (up to fp32 kernel noise)."""
    out_v, out_h = tmp_path / "v", tmp_path / "h"
    run(cfg(chats_file, out_v, backend="vllm", top_k=16), backend=vllm_hidden)
    run(cfg(chats_file, out_h, top_k=16))
    assert open_cache(out_v).manifest["backend"]["backend"] == "vllm"
    merged = merge([str(out_v), str(out_h)], str(tmp_path / "merged"))  # same inputs: the first rows kept
    assert merged["counts"]["duplicates"] == 12 and merged["duplicates_with_other_targets"] > 0
    hv, hh = rows(out_v), rows(out_h)
    for sid in hh:
        np.testing.assert_array_equal(hv[sid]["target_positions"], hh[sid]["target_positions"])
        # each side is within the codec bound of its exact value; the exact values differ by ~1e-5
        tol = 2 * codec.topk_error_bound()["logprob_abs_err_within_10_nats"] + 1e-3
        np.testing.assert_allclose(hv[sid]["topk_logprobs"], hh[sid]["topk_logprobs"], atol=tol)
        assert (hv[sid]["topk_ids"][:, 0] == hh[sid]["topk_ids"][:, 0]).mean() > 0.95


@pytest.mark.slow
def test_a_run_on_cpu_runs_its_engine_in_its_own_process(tmp_path, chats_file, vllm_hidden, monkeypatch, capsys):
    """As a process of its own, vLLM's CPU worker busy-waits for 1 s after every request, on a core
    the projection and top-k after it need (docs/BENCHMARKS.md): a run's own engine (one rank, CPU)
    runs in the run's process, gives the same cache as an engine in worker processes (the session
    fixture: the default, safe beside other engines), and leaves nothing set for child processes."""
    import os

    from teacher_cache.backends.vllm_backend import VllmBackend

    clients = []
    describe = VllmBackend.describe

    def spy(self):
        clients.append(type(self.llm.llm_engine.engine_core).__name__)
        return describe(self)

    monkeypatch.setattr(VllmBackend, "describe", spy)
    own, shared = tmp_path / "own", tmp_path / "shared"
    run(cfg(chats_file, own, backend="vllm", top_k=16))
    assert "Loading safetensors" not in capsys.readouterr().err  # no progress: vLLM's loading bars neither
    run(cfg(chats_file, shared, backend="vllm", top_k=16, progress=True), backend=vllm_hidden)
    err = capsys.readouterr().err  # a given engine is not loaded, but the run still shows its bar
    assert "loading the teacher" not in err and "caching:" in err and "12/12" in err
    assert clients == ["InprocClient", "SyncMPClient"]
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ
    a, b = rows(own), rows(shared)
    assert a.keys() == b.keys()
    for sid in a:
        np.testing.assert_array_equal(a[sid]["topk_ids"][:, 0], b[sid]["topk_ids"][:, 0])
        tol = 2 * codec.topk_error_bound()["logprob_abs_err_within_10_nats"] + 1e-4
        np.testing.assert_allclose(a[sid]["topk_logprobs"], b[sid]["topk_logprobs"], atol=tol)


@pytest.mark.slow
def test_vllm_prompt_logprobs_takes_samples_truncated_to_max_length(tmp_path, chats_file):
    """vLLM's generate runner refuses a prompt as long as its max_model_len; a truncated sample is
    exactly --max-length long, so that mode's engine is built one token longer."""
    out = tmp_path / "c"
    run(cfg(chats_file, out, backend="vllm", vllm_mode="prompt_logprobs", max_length=48, shard_size=12))
    m = open_cache(out).manifest
    assert m["counts"]["truncated"] > 0 and m["counts"]["samples"] == 12


def test_workers_on_different_engines_make_a_mixed_manifest(tmp_path, chats_file, vllm_hidden):
    out = tmp_path / "cache"
    run(cfg(chats_file, out, top_k=16, worker_index=0, num_workers=2))
    run(cfg(chats_file, out, top_k=16, worker_index=1, num_workers=2, backend="vllm"), backend=vllm_hidden)
    backend = open_cache(out).manifest["backend"]
    assert backend["backend"] == "mixed"
    assert [b["backend"] for b in backend["parts"]] == ["hf", "vllm"]


@pytest.mark.slow
def test_cli_vllm_run_with_attention_from_an_hf_pass(tmp_path, chats_file):
    """The default backend (vllm where installed) through the CLI, split over two tensor-parallel
    ranks (CPU core groups here); attention comes from an hf pass."""
    out = tmp_path / "cache"
    done = subprocess.run(
        [
            *CLI,
            "run",
            "--teacher",
            "tiny-mixtral",
            "--data",
            str(chats_file),
            "--out",
            str(out),
            "--top-k",
            "8",
            "--max-length",
            "256",
            "--attention-layers",
            "1",
            "--tensor-parallel-size",
            "2",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        # the core binding of the session's own engine (one rank) is not for this one
        env={
            **{k: v for k, v in os.environ.items() if k != "VLLM_CPU_OMP_THREADS_BIND"},
            "VLLM_CPU_KVCACHE_SPACE": "1",
        },
    )
    assert done.returncode == 0, done.stderr[-2000:]
    m = open_cache(out).manifest
    assert m["backend"] == {"backend": "vllm", "vllm_mode": "hidden", "tensor_parallel_size": 2}
    assert m["engines"][0]["tensor_parallel_size"] == 2
    assert m["attention"]["source"] == "hf pass beside vllm"
    hf = tmp_path / "hf"
    run(cfg(chats_file, hf, top_k=8, max_length=256, attention_layers=(1,), shard_size=256, batch_size=16))
    # attention (both from hf) must be equal; top-k log-probs up to the engines' kernel noise
    got, want = rows(out), rows(hf)
    assert_same_rows(without_topk(copy.deepcopy(got)), without_topk(copy.deepcopy(want)))
    tol = 2 * codec.topk_error_bound()["logprob_abs_err_within_10_nats"] + 1e-3
    for sid, r in want.items():
        np.testing.assert_allclose(got[sid]["topk_logprobs"], r["topk_logprobs"], atol=tol)
        assert (got[sid]["topk_ids"][:, 0] == r["topk_ids"][:, 0]).mean() > 0.95


@pytest.mark.slow
def test_a_vllm_engine_killed_mid_run_is_one_line_and_keeps_the_shards(tmp_path):
    """The engine process dying (the OOM killer's kill -9) ends the run with one line that says
    what is kept and how to go on, not vLLM's traceback; the durable shards stay. (On CPU with
    one rank the engine runs in the run's own process unless the user asks for one of its own.)"""
    data = Path(__file__).resolve().parents[2] / "teacher_cache" / "sample_data" / "instructions.jsonl"
    out = tmp_path / "c"
    args = [*CLI, "run", "--teacher", "tiny-mixtral", "--backend", "vllm", "--data", str(data), "--out", str(out),
            "--top-k", "8", "--shard-size", "4", "--batch-size", "4", "--no-progress"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_OMP_THREADS_BIND"} | {"VLLM_CPU_KVCACHE_SPACE": "1"}
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"  # an engine process, as on a GPU or with --tensor-parallel-size > 1
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    part = out / "parts" / "worker-00000-of-00001.json"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (part.is_file() and json.loads(part.read_text() or "{}").get("shards")):
            time.sleep(0.05)
        engines = [p for p in descendants(proc.pid) if b"EngineCore" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert engines, "no vLLM engine process found under the run"
        for p in engines:
            os.kill(p, signal.SIGKILL)
        said, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert said == "", said[-3000:]  # vLLM's log (its own default: stdout) goes to stderr with ours
    # (the multiprocessing resource tracker may still warn after it, of the dead engine's shared memory)
    (line,) = [ln for ln in err.splitlines() if ln.startswith("Error")]
    assert line == (
        "Error: the vLLM engine failed (EngineDeadError: its process died): finished shards are kept; "
        "the same command resumes after them"
    )
    kept = json.loads(part.read_text())["shards"]
    assert kept and all((out / s["name"]).is_file() for s in kept)


def without_topk(got: dict) -> dict:
    for r in got.values():
        del r["topk_logprobs"], r["topk_ids"]
    return got


def test_resume_redoes_shards_its_part_lists_but_the_store_lost(tmp_path, chats_file):
    """A finished cache whose shard file went missing (or was truncated) is not 'nothing to do':
    the rerun redoes the shards from the first bad one, and the result equals a clean run. What
    a killed writer leaves (temp files, dot-files) does not block it."""
    out = tmp_path / "c"
    run(cfg(chats_file, out))
    clean = rows(out)
    manifest = open_cache(out).manifest
    names = [s["name"] for s in manifest["shards"]]
    (out / names[1]).unlink()
    (out / names[2]).write_bytes((out / names[2]).read_bytes()[:-10])
    (out / "manifest.json").unlink()
    (out / "manifest.json.tmp").write_text("{")  # an older writer's leftover
    (out / ".manifest.json.123-abcd.tmp").write_text("{")
    done = subprocess.run(
        [*CLI, "run", "--teacher", "tiny-mixtral", "--data", str(chats_file), "--out", str(out), "--backend", "hf",
         "--top-k", "8", "--shard-size", "3", "--batch-size", "2", "--no-progress"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"{names[1]} is missing, or not the size or sha256 its part file says: redoing worker 0" in done.stderr
    assert_same_rows(clean, rows(out))
    assert [s["sha256"] for s in open_cache(out).manifest["shards"]] == [s["sha256"] for s in manifest["shards"]]
    import torch
    import transformers

    (engine,) = open_cache(out).manifest["engines"]  # both runs: the same engine, listed once
    assert engine["backend"] == "hf" and engine["device"] == "cpu" and engine["dtype"] == "float32"
    assert engine["torch"] == torch.__version__ and engine["transformers"] == transformers.__version__
    assert subprocess.run([*CLI, "verify", str(out)], capture_output=True, text=True).returncode == 0


def test_resume_rereads_local_shards_and_redoes_a_damaged_one(tmp_path, chats_file, capsys):
    """A shard of the right size with one byte changed is not durable: its sha256 differs from
    what the part file recorded, so the resume redoes it instead of finishing a cache that
    verify would then refuse."""
    out = tmp_path / "c"
    run(cfg(chats_file, out))
    clean = rows(out)
    names = [s["name"] for s in open_cache(out).manifest["shards"]]
    damaged = bytearray((out / names[1]).read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    (out / names[1]).write_bytes(bytes(damaged))
    part = out / "parts" / "worker-00000-of-00001.json"  # as if killed after its last shard
    part.write_text(json.dumps({**json.loads(part.read_text()), "complete": False}))
    (out / "manifest.json").unlink()
    run(cfg(chats_file, out))
    assert f"{names[1]} is missing, or not the size or sha256" in capsys.readouterr().err
    assert_same_rows(clean, rows(out))
    assert subprocess.run([*CLI, "verify", str(out)], capture_output=True, text=True).returncode == 0


class _DiesAfter:
    """The real hf engine, made to fail after `n` batches: a run that dies part way (fault injection)."""

    name = "hf"

    def __init__(self, n: int) -> None:
        from teacher_cache.backends.hf import HfBackend

        self.engine, self.left = HfBackend(resolve_model("tiny-mixtral"), progress=False), n

    def describe(self) -> dict:
        return self.engine.describe()

    def forward(self, batch):
        if self.left == 0:
            raise RuntimeError("the machine went away")
        self.left -= 1
        return self.engine.forward(batch)

    def close(self) -> None:
        self.engine.close()


def test_a_redo_removes_the_manifest_until_it_ends(tmp_path, chats_file):
    """A finished cache that lost a shard is no longer complete: the redo removes manifest.json
    first, so a reader meanwhile (or after the redo dies) is told the cache is incomplete instead
    of reading a manifest that lists a shard being rewritten; the redo's end writes it again."""
    out = tmp_path / "c"
    run(cfg(chats_file, out))
    names = [s["name"] for s in open_cache(out).manifest["shards"]]
    (out / names[1]).unlink()
    with pytest.raises(RuntimeError, match="the machine went away"):
        run(cfg(chats_file, out), backend=_DiesAfter(0))
    assert not (out / "manifest.json").exists()
    with pytest.raises(ValueError, match="cache incomplete"):
        open_cache(out)
    run(cfg(chats_file, out))
    assert [s["name"] for s in open_cache(out).manifest["shards"]] == names


class _WaitsToStart(_DiesAfter):
    """The real hf engine, held at its first batch until `go` is set, then failing: a run caught
    between its first part file and its first shard."""

    def __init__(self) -> None:
        super().__init__(0)
        self.started, self.go = threading.Event(), threading.Event()

    def forward(self, batch):
        self.started.set()
        self.go.wait(120)
        return super().forward(batch)


def test_a_run_with_other_settings_is_refused_while_another_starts_in_the_same_out(tmp_path, chats_file):
    """Two runs with other settings and other worker indexes started together into one --out both
    passed the check of the other's part before either had a shard, and mixed their shards in one
    cache (verify: shard files not listed). A part with no shard yet whose worker's lock is held is
    a running run, and workers start one at a time from that check to their first part file."""
    out = tmp_path / "c"
    engine, ended = _WaitsToStart(), []

    def first_run() -> None:
        try:
            run(cfg(chats_file, out, worker_index=1, num_workers=2), engine)
        except RuntimeError as e:  # the engine's failure once let go
            ended.append(str(e))

    first = threading.Thread(target=first_run)
    first.start()
    try:
        assert engine.started.wait(120), "the first run never reached its first batch"
        with pytest.raises(RunError, match=r"worker 1 of 2 is being written now by a run with different settings"):
            run(cfg(chats_file, out, top_k=16))
    finally:
        engine.go.set()
        first.join()
    assert ended == ["the machine went away"]
    assert not list(out.glob("shard-*")), "the refused run wrote a shard"
    run(cfg(chats_file, out, top_k=16))  # the first run is gone (its part holds no shard): a failed start
    assert open_cache(out).manifest["targets"]["k"] == 16


def test_empty_parts_of_failed_starts_refuse_no_run(tmp_path, chats_file):
    """Parts with no shard, left by runs that failed at once (here as 2 workers), are failed starts:
    a run as 1 worker into that --out took its own lock (the index it shares with worker 0 of 2)
    for a live run writing that part, and refused itself."""
    out = tmp_path / "c"
    (out / "parts").mkdir(parents=True)  # not made by the runs: their failures leave their parts
    for worker in (0, 1):
        with pytest.raises(RuntimeError, match="the machine went away"):
            run(cfg(chats_file, out, worker_index=worker, num_workers=2), backend=_DiesAfter(0))
    parts = sorted(p.name for p in (out / "parts").glob("*.json"))
    assert parts == ["worker-00000-of-00002.json", "worker-00001-of-00002.json"]
    run(cfg(chats_file, out))
    assert len(open_cache(out)) == 12


def test_a_cache_folder_named_like_a_pattern_is_still_seen(tmp_path, chats_file):
    """Folders are listed literally: in team[law] (a glob pattern to fsspec, which matched
    nothing there) the checks before writing still see the cache, so a run with other settings
    or a merge into it is refused instead of overwriting it."""
    out = tmp_path / "team[law]"
    run(cfg(chats_file, out))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(RunError, match=r"different settings \(data.num_workers differ\)"):
        run(cfg(chats_file, out, num_workers=2))
    with pytest.raises(MergeError, match="exists and is not empty"):
        merge([str(out), str(out)], str(out))
    assert before == {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert open_cache(out).manifest["counts"]["samples"] == len(chats_file.read_text().splitlines())


def test_other_weights_with_the_same_config_are_another_teacher(tmp_path, chats_file, tiny_teacher):
    """A fine-tune has its base's config.json: the manifest's teacher.weights_sha256 tells them
    apart, so a rerun after the checkpoint's weights changed is refused, and so is merging a cache
    of each (two teachers' rows are not interchangeable)."""
    from safetensors.torch import load_file, save_file

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher.path, teacher)
    a, b = tmp_path / "a", tmp_path / "b"
    run(cfg(chats_file, a, teacher=str(teacher), only_domain="math"))
    assert open_cache(a).manifest["teacher"]["weights_sha256"].startswith("sha256:")
    weights = load_file(teacher / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3  # "fine-tuned": same names, shapes and config
    save_file(weights, teacher / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RunError, match=r"different settings \(teacher.weights_sha256 differ\)"):
        run(cfg(chats_file, a, teacher=str(teacher), only_domain="math"))
    run(cfg(chats_file, b, teacher=str(teacher), exclude_domain="math"))
    with pytest.raises(
        MergeError, match=r"teacher differs \(\S+teacher vs \S+teacher; weights_sha256: \"sha256:[0-9a-f]+\" vs"
    ):
        merge([str(a), str(b)], str(tmp_path / "m"))  # only the field that differs (two fine-tunes, one name)


def test_a_run_with_another_worker_count_or_settings_is_refused_before_it_writes(tmp_path, chats_file):
    """Shard names do not hold the worker count: a rerun with another --num-workers would
    overwrite a finished cache's shards, and a worker with other settings than the others would
    run its whole share before assemble refused it. Both are refused first, naming the field."""
    out = tmp_path / "c"
    run(cfg(chats_file, out))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(RunError, match=r"holds 4 shards of worker 0 of 1, made with different settings "
                                       r"\(data.num_workers differ\)"):  # fmt: skip
        run(cfg(chats_file, out, num_workers=2))
    assert before == {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    parts = sorted(p.name for p in (out / "parts").iterdir())
    assert parts == [".start.lock", ".worker-00000.lock", "worker-00000-of-00001.json"]
    (out / "parts" / "worker-00000-of-00001.json").unlink()  # parts gone, the manifest still says
    with pytest.raises(RunError, match=r"holds a finished cache made with different settings \(data.num_workers"):
        run(cfg(chats_file, out, num_workers=2))

    two = tmp_path / "two"
    run(cfg(chats_file, two, worker_index=0, num_workers=2))
    shards = sorted(p.name for p in two.glob("shard-*"))
    with pytest.raises(RunError, match=r"shards of worker 0 of 2, made with different settings \(targets.k differ"):
        run(cfg(chats_file, two, worker_index=1, num_workers=2, top_k=4))
    assert sorted(p.name for p in two.glob("shard-*")) == shards  # refused before its teacher ran
    run(cfg(chats_file, two, worker_index=1, num_workers=2))
    assert len(open_cache(two)) == 12


def test_shards_with_no_part_or_manifest_are_refused_not_overwritten(tmp_path, chats_file):
    """A folder of shards with neither a worker part nor a manifest (a killed merge's, or a cache
    whose parts/ and manifest.json were removed) is no run's: a run there overwrote some shards
    and finished with the others beside its own, unlisted (verify then failed). Refused, untouched."""
    old = tmp_path / "old"
    run(cfg(chats_file, old, shard_size=2))  # 6 shards
    out = tmp_path / "c"
    out.mkdir()
    for shard in old.glob("shard-*"):
        shutil.copy(shard, out / shard.name)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(RunError, match=r"holds shards but no manifest.json or worker part file \(shard-w00000-"):
        run(cfg(chats_file, out))  # 4 shards of 3
    assert before == {p.name: p.read_bytes() for p in out.iterdir()}


def test_data_that_changes_during_the_run_is_not_called_finished(tmp_path, chats_file, monkeypatch):
    """The manifest names each data file by its sha256 at the start; records appended while the
    run read the file ended up in the shards of a cache that named the file as it was before
    (252 samples from "the" 240-record file). The run refuses to call such a cache finished."""
    import teacher_cache.run as run_module

    data = tmp_path / "d.jsonl"
    shutil.copy(chats_file, data)
    real, appended = run_module._cache_shard, []

    def appending(*args, **kwargs):
        entry = real(*args, **kwargs)
        if not appended:  # once, after the first shard: a writer still filling the file
            with data.open("a") as f:
                f.write(json.dumps({"id": "late", "prompt": "Hi?", "response": "Hello."}) + "\n")
            appended.append(entry["name"])
        return entry

    monkeypatch.setattr(run_module, "_cache_shard", appending)
    out = tmp_path / "c"
    with pytest.raises(RunError, match=r"d.jsonl changed while this run read it .*not marked finished"):
        run(cfg(data, out))
    assert not (out / "manifest.json").exists()
    assert not json.loads((out / "parts" / "worker-00000-of-00001.json").read_text())["complete"]


def test_data_deleted_during_the_run_is_one_line_and_a_rerun_finishes(tmp_path, chats_file, monkeypatch):
    """The end-of-run check rereads each data file: one deleted since (still read through the open
    handle) gave a raw errno line. Now one line; with the file back, the same command finishes."""
    import teacher_cache.run as run_module

    data = tmp_path / "d.jsonl"
    shutil.copy(chats_file, data)
    real = run_module._cache_shard

    def deleting(*args, **kwargs):
        entry = real(*args, **kwargs)
        data.unlink(missing_ok=True)  # after the first shard; the reader's open handle goes on
        return entry

    monkeypatch.setattr(run_module, "_cache_shard", deleting)
    out = tmp_path / "c"
    with pytest.raises(RunError, match=r"d.jsonl cannot be read again to check .*not marked finished"):
        run(cfg(data, out))
    monkeypatch.setattr(run_module, "_cache_shard", real)
    shutil.copy(chats_file, data)
    run(cfg(data, out))
    assert len(open_cache(out)) == 12


@pytest.mark.parametrize(
    "part,why",
    [
        ("[]", "not an object"),
        (
            '{"config_hash": "x", "shards": [{"name": "../../x.arrow", "rows": 1, "bytes": 1}]}',
            "bad shard name '../../x.arrow'",
        ),
        ('{"config_hash": "x", "shards": [{"name": "shard-w00000-000000.arrow"}]}', "each shard needs a name, rows"),
    ],
)
def test_malformed_worker_part_is_one_line_naming_the_fix(tmp_path, chats_file, part, why):
    out = tmp_path / "c"
    (out / "parts").mkdir(parents=True)
    (out / "parts" / "worker-00000-of-00001.json").write_text(part)
    done = subprocess.run(
        [*CLI, "run", "--teacher", "tiny-mixtral", "--data", str(chats_file), "--out", str(out), "--backend", "hf"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert f"malformed worker part ({why}" in line and "delete it to redo this worker's shards" in line


FULL_DISK = """
"$@" 2> "$OUTSIDE/first.err"; echo $? > "$OUTSIDE/first.rc"
cp -a "$DISK/c" "$OUTSIDE/after_first"
mount -o remount,size=4m "$DISK"                   # space freed
"$@" 2> "$OUTSIDE/second.err"; echo $? > "$OUTSIDE/second.rc"
cp -a "$DISK/c" "$OUTSIDE/final"
"""


FULL_BEFORE = """
dd if=/dev/zero of="$DISK/filler" bs=4k 2>/dev/null   # fills the device
"$@" 2> "$OUTSIDE/err"; echo $? > "$OUTSIDE/rc"
ls -A "$DISK" > "$OUTSIDE/left"
"""


def test_a_disk_full_before_the_first_shard_says_nothing_was_kept_and_leaves_nothing(tmp_path, chats_file, small_disk):
    """The lock could not be written: the run said "finished shards are kept" (none were) and left
    --out behind with its lock file in it."""
    args = [*CLI, "run", "--teacher", "tiny-mixtral", "--data", str(chats_file), "--out", str(small_disk.disk / "c"),
            "--backend", "hf", "--no-progress"]  # fmt: skip
    small_disk.run(FULL_BEFORE, args, size="64k")
    err = small_disk.read("err")
    assert small_disk.read("rc").strip() == "1" and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (
        f"Error: no space left on the device of {small_disk.disk / 'c'}: nothing was written; the same command "
        "starts again, once there is space"
    )
    assert small_disk.read("left").split() == ["filler"]


@pytest.mark.slow
def test_a_full_disk_is_one_line_keeps_finished_shards_and_resumes(tmp_path, chats_file, small_disk):
    """A real full device with room for ~2 shards: one line, finished shards kept, resume completes."""
    disk, outside = small_disk.disk, small_disk.outside
    args = [*CLI, "run", "--teacher", "tiny-mixtral", "--data", str(chats_file), "--out", str(disk / "c"),
            "--backend", "hf", "--top-k", "8", "--shard-size", "2", "--batch-size", "2", "--no-progress"]  # fmt: skip
    small_disk.run(FULL_DISK, args, size="20k")
    first_err = small_disk.read("first.err")
    assert small_disk.read("first.rc").strip() == "1" and "Traceback" not in first_err, first_err
    last = first_err.strip().splitlines()[-1]
    said = re.fullmatch(
        rf"Error: no space left on the device of {re.escape(str(disk / 'c'))}: (\d+) finished shards? (are|is) kept; "
        r"the same command resumes after them, once there is space",
        last,
    )
    assert said, last
    # what the failed run had finished is intact: every shard its part lists, byte for byte
    kept = json.loads((outside / "after_first" / "parts" / "worker-00000-of-00001.json").read_text())["shards"]
    assert 1 <= len(kept) < 6, "the device must fill mid-run"
    assert int(said.group(1)) == len(kept)
    final = json.loads((outside / "final" / "manifest.json").read_text())["shards"]
    assert [s["sha256"] for s in kept] == [s["sha256"] for s in final[: len(kept)]]
    for s in kept:
        assert (outside / "after_first" / s["name"]).read_bytes() == (outside / "final" / s["name"]).read_bytes()
    second_err = small_disk.read("second.err")
    assert small_disk.read("second.rc").strip() == "0", second_err
    assert f"resuming: {len(kept)} shard{'s' * (len(kept) > 1)} already durable" in second_err
    clean = tmp_path / "clean"
    run(cfg(chats_file, clean, shard_size=2))
    assert_same_rows(rows(clean), rows(outside / "final"))


def test_an_incomplete_cache_says_which_workers_are_left(tmp_path, chats_file):
    """Workers of one run share one --out; run into two, each says what is missing; copied
    together, the finished parts need one more command to write the manifest."""
    w0, w1 = tmp_path / "w0", tmp_path / "w1"
    run(cfg(chats_file, w0, worker_index=0, num_workers=2))
    run(cfg(chats_file, w1, worker_index=1, num_workers=2))
    missing = r"2 workers, no part of worker\(s\) 0 here \(run them with this --out: the workers of one run share"
    with pytest.raises(ManifestError, match=r"cache incomplete \(no manifest.json yet\): " + missing):
        open_cache(w1)
    for f in [*w1.glob("shard-*"), *w1.glob("parts/*.json")]:
        shutil.copy(f, w0 / f.relative_to(w1))
    finished = r": all 2 workers are finished: rerun any worker's command with this --out to write manifest.json$"
    with pytest.raises(ManifestError, match=finished):
        open_cache(w0)
    run(cfg(chats_file, w0, worker_index=1, num_workers=2))  # "nothing to do", and the manifest
    assert len(list(open_cache(w0))) == 12


def test_manifests_say_where_data_and_merged_caches_were_not_as_typed(tmp_path, chats_file, monkeypatch):
    """Relative paths typed in one working directory mean nothing to a teammate reading the cache."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(chats_file, "chats.jsonl")
    run(cfg(Path("chats.jsonl"), Path("a")))
    run(cfg(Path("chats.jsonl"), Path("b")))
    merge(["a", "b"], "m")
    m = open_cache("m").manifest
    assert [f["path"] for f in m["data"]["files"]] == [str(tmp_path / "chats.jsonl")] * 2
    assert [e["path"] for e in m["merged_from"]] == [str(tmp_path / "a"), str(tmp_path / "b")]


def test_a_second_process_for_the_same_worker_is_refused_while_the_first_runs(tmp_path):
    """It deleted the first's half-written shard, and the first then listed that shard at 0 bytes
    in a cache it called complete. The lock is the OS's (flock): a killed run frees it."""
    data = Path(__file__).resolve().parents[2] / "teacher_cache" / "sample_data" / "instructions.jsonl"
    out = tmp_path / "c"
    args = ["run", "--teacher", "tiny-mixtral", "--data", str(data), "--out", str(out), "--backend", "hf"]
    first = subprocess.Popen(
        [sys.executable, "-m", "teacher_cache.cli", *args, "--top-k", "8", "--shard-size", "40", "--batch-size", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        lock = out / "parts" / ".worker-00000.lock"
        deadline = time.time() + 120
        while not (lock.exists() and lock.read_text().strip()) and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert lock.read_text() == f"{first.pid} worker-00000-of-00001.json\n"  # its pid and the part it writes
        with pytest.raises(RunError, match=rf"worker 0 of 1 is being written by another run \(pid {first.pid}\)"):
            run(RunConfig("tiny-mixtral", (str(data),), str(out), backend="hf", top_k=8, shard_size=40, progress=False))
        _, err = first.communicate(timeout=600)
        assert first.returncode == 0, err
    finally:
        first.kill()
        first.wait()
    assert len(open_cache(out)) == 240
    done = subprocess.run([sys.executable, "-m", "teacher_cache.cli", "verify", str(out)], capture_output=True)
    assert done.returncode == 0


def test_the_part_file_is_rewritten_at_most_two_percent_of_the_time():
    """The part grows ~0.5 KB per shard and is rewritten whole: after every one of 10^4 shards that is
    22 GiB of writes, and writes of 5-50 ms after every small shard took 20-60 % of a run. Each write
    waits until writes are 2 % of the time; a stop writes what is pending, so its stop line's "kept"
    shards are the part's."""
    from teacher_cache.parts import PartWrites

    written: list[int] = []

    def write(n: int, cost: float):
        return lambda: (time.sleep(cost), written.append(n))

    slow_shards = PartWrites()  # shards that outlast 50 writes (of well under 12 ms): each written at once
    for n in range(3):
        slow_shards.after_shard(write(n, 0.0))
        time.sleep(0.6)
    assert written == [0, 1, 2]
    written.clear()
    fast = PartWrites()
    fast.after_shard(write(0, 0.01))  # due: the first
    fast.after_shard(write(1, 0.01))  # 10 ms spent (under the old 50 ms "cheap" line): the next waits ~0.5 s
    fast.after_shard(write(2, 0.01))
    assert written == [0]
    fast.flush()  # a stop: the latest part (it lists every shard so far) is written
    fast.flush()  # nothing left
    assert written == [0, 2]


def test_settings_built_from_python_take_paths_and_refuse_wrong_types(chats_file):
    """data="train.jsonl" was read letter by letter ("--data names a file twice", "data file not found:
    t"), a Path out failed in json.dumps, top_k=8.5 deep inside torch.topk."""
    c = RunConfig(teacher="tiny-mixtral", data=chats_file, out=Path("/tmp/o"))
    assert c.data == (str(chats_file),) and c.out == "/tmp/o"
    assert RunConfig(teacher="tiny-mixtral", data=[chats_file, "b.jsonl"], out="o").data == (str(chats_file), "b.jsonl")
    for bad, message in (
        (dict(top_k=8.5), "top_k must be an int, got 8.5"),
        (dict(top_k="8"), "top_k must be an int, got '8'"),
        (dict(batch_size=True), "batch_size must be an int, got True"),
        (dict(skip_bad=1), "skip_bad must be True or False, got 1"),
        (dict(attention_layers=(0, 1.0)), r"attention_layers must be ints, got \(0, 1.0\)"),
        (dict(data=(chats_file, 3)), "data must be a str \\(a path may be a Path\\), got 3"),
        (dict(data=None), "data must be paths, got None"),  # was "'NoneType' object is not iterable"
        (dict(attention_layers=1), "attention_layers must be ints, got 1"),
        (dict(exclude_domain=5), "exclude_domain must be a str, strs or None, got 5"),
        (dict(exclude_domain=["law", 5]), r"exclude_domain must be a str, strs or None, got \('law', 5\)"),
    ):
        with pytest.raises(TypeError, match=message):
            RunConfig(**{"teacher": "tiny-mixtral", "data": (str(chats_file),), "out": "o", **bad})
    import numpy as np  # a notebook's numbers; lists stored as tuples (the settings stay hashable)

    c = RunConfig(teacher="tiny-mixtral", data=chats_file, out="o", top_k=np.int64(8), exclude_domain=["law", "tax"])
    assert c.top_k == 8 and type(c.top_k) is int and c.exclude_domain == ("law", "tax") and hash(c)
    with pytest.raises(ValueError, match="a location must be a non-empty path or URL, got ''"):
        open_cache("")  # was the root folder: "/: no manifest.json"


def test_a_numpy_float_logprob_error_is_the_bound_the_cli_reads(chats_file):
    """np.float32(0.02) passed the bound's check (within 1e-9 of 0.02) and was recorded as
    0.019999999552965164: the CLI's --logprob-error 0.02 then refused to resume that cache
    ("targets.logprob_error differ") and merge refused to join it with a 0.02 one."""
    import numpy as np

    for typed, bound in ((np.float32(0.02), 0.02), (np.float32(0.015), 0.015), (np.float64(0.1), 0.1)):
        c = RunConfig(teacher="tiny-mixtral", data=chats_file, out="o", logprob_error=typed)
        assert c.logprob_error == bound and type(c.logprob_error) is float
        assert c == RunConfig(teacher="tiny-mixtral", data=chats_file, out="o", logprob_error=bound)


def test_the_package_lists_its_lazy_names():
    """dir(teacher_cache) showed none of open_cache, CachedSample, Cache: no tab completion."""
    import teacher_cache

    assert {"open_cache", "CachedSample", "Cache"} <= set(dir(teacher_cache)) and "Cache" in teacher_cache.__all__
    assert teacher_cache.Cache.__name__ == "Cache"


class _Watched(_DiesAfter):
    """The real hf engine, with the lengths of each batch it is given noted."""

    def __init__(self) -> None:
        super().__init__(n=-1)  # never fails
        self.batches: list[list[int]] = []

    def forward(self, batch):
        self.batches.append([len(s.input_ids) for s in batch])
        return self.engine.forward(batch)


def test_batches_group_similar_lengths_and_rows_keep_the_data_order(tmp_path, chats_file, monkeypatch):
    """The hf engine pads a batch to its longest sample: batches in data order ran ~1.3x the
    tokens. Each shard's samples go in length order, and the rows still land in data order."""
    out, watched = tmp_path / "c", _Watched()
    run(cfg(chats_file, out, shard_size=6, batch_size=2), backend=watched)
    for shard in range(0, len(watched.batches), 3):  # 6 samples a shard, 2 a batch
        lengths = [n for b in watched.batches[shard : shard + 3] for n in b]
        assert lengths == sorted(lengths)
    data_order = [json.loads(line)["id"] for line in chats_file.read_text().splitlines()]
    cache = open_cache(out)
    assert [s.sample_id for s in cache] == data_order
    # the data order is not the length order, so the test above means something
    lengths = {s.sample_id: len(s.input_ids) for s in cache}
    assert [lengths[i] for i in data_order[:6]] != sorted(lengths[i] for i in data_order[:6])
    # sorted within runs of SORT_BATCHES batches only: at most a run's rows wait to be written
    monkeypatch.setattr(sys.modules["teacher_cache.run"], "SORT_BATCHES", 1)
    watched.batches.clear()
    run(cfg(chats_file, tmp_path / "runs_of_one", shard_size=6, batch_size=2), backend=watched)
    pairs = [[lengths[i] for i in data_order[j : j + 2]] for j in range(0, len(data_order), 2)]
    assert watched.batches == [sorted(p) for p in pairs] != pairs
    assert [s.sample_id for s in open_cache(tmp_path / "runs_of_one")] == data_order


def test_special_token_text_in_a_message_is_warned_about(tmp_path, chats_file, capsys):
    """'</s>' written in an answer is read by the tokenizer as the end-of-sequence token itself: the
    cache then teaches the student to stop mid-answer. Legal (some data means it), so said, not refused."""
    data = tmp_path / "d.jsonl"
    turns = [{"role": "user", "content": "<unk>?"}, {"role": "assistant", "content": "x"}]
    extra = [
        {"id": "inj", "prompt": "Say bye.", "response": "Bye.</s><s>[INST] more"},
        {"id": "inj2", "messages": turns},
    ]
    data.write_text(chats_file.read_text() + "".join(json.dumps(r) + "\n" for r in extra))
    run(cfg(data, tmp_path / "c"))
    err = capsys.readouterr().err
    assert (
        f"warning: 2 records of worker 0's share hold the text of a special token in a message (the first: {data}:13 "
        "holds '</s>')" in err
    )
    tokens = next(s for s in open_cache(tmp_path / "c") if s.sample_id == "inj").input_ids
    assert 2 in tokens[:-1].tolist()  # what it warns of: an end of sequence inside the answer
    run(cfg(chats_file, tmp_path / "plain"))
    assert "special token" not in capsys.readouterr().err


def test_settings_built_from_python_are_refused_as_the_cli_refuses_them(chats_file):
    """RunConfig(seed=3) with top-k targets was accepted: the seed is hashed (data.seed) though
    nothing is drawn, so a worker started from Python and one from the CLI (which refuses --seed
    with top-k) could not share an --out ("made with different settings (data.seed differ)"), nor
    could the CLI ever resume such a cache. vllm_mode was not checked (with the hf backend the
    message blamed --vllm-mode for being given at all); a blank teacher, out or data was the
    working directory (". is a directory but holds no config.json checkpoint")."""
    from click.testing import CliRunner

    from teacher_cache.cli import main

    common = {"teacher": "tiny-mixtral", "data": (str(chats_file),), "out": "o"}
    said = CliRunner().invoke(main, ["run", "--teacher", "tiny-mixtral", "--data", str(chats_file), "--out", "o",
                                     "--seed", "3"]).output  # fmt: skip
    assert "--seed has no effect with --targets topk" in said
    for bad, message in (
        (dict(seed=3), "--seed has no effect with --targets topk"),
        (dict(vllm_mode="prompt-logprobs", backend="hf"), "unknown vllm mode 'prompt-logprobs' \\(hidden, prompt_"),
        (dict(teacher=""), "--teacher must not be empty"),
        (dict(out=" "), "--out must not be empty"),
        (dict(data=(str(chats_file), "")), "--data must not be empty"),
    ):
        with pytest.raises(RunError, match=message):
            RunConfig(**{**common, **bad})
    assert RunConfig(**common, targets="sampled", seed=3).seed == 3
    # settings the others leave unused and that are not hashed: one dict of settings makes either kind
    assert RunConfig(**common, targets="sampled", top_k=8, logprob_error=0.05, attention_top_k=4).top_k == 8
    assert RunConfig(**common, num_draws=10).num_draws == 10


def test_find_takes_an_integer_id_as_records_store_it(tmp_path):
    """A record's integer id 7 is stored as "7" (README: 7 and "7" are one id), but find(7) read
    every shard and then raised KeyError: 7; find(7.0) did the same."""
    data = tmp_path / "ints.jsonl"
    data.write_text(
        "".join(json.dumps({"id": i, "prompt": f"Count to {i}.", "response": "1, 2, 3."}) + "\n" for i in (5, 7))
    )
    run(cfg(data, tmp_path / "c"))
    cache = open_cache(tmp_path / "c")
    assert cache.find(7).sample_id == "7" and cache.find(np.int64(5)).sample_id == "5"
    assert cache.find("7").sample_id == "7" and cache.find().sample_id == "5"
    with pytest.raises(KeyError):
        cache.find(8)
    with pytest.raises(TypeError, match="sample_id must be a str, an int or None, got 7.0"):
        cache.find(7.0)
