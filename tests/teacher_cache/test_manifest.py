"""The manifest: config hash, header differences, assembling worker parts, validating what others wrote.

Parts and manifests come from a real two-worker run of tiny-mixtral (hf backend, CPU), edited
where a test needs another one."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from teacher_cache import open_cache
from teacher_cache.manifest import (
    ManifestError,
    assemble,
    codec_version,
    combine_backends,
    config_hash,
    header_differences,
    read_part,
    union_engines,
)
from teacher_cache.run import RunConfig, run
from teacher_cache.storage import as_location

# the settings that decide a cache's content (docs/FORMAT.md, config_hash)
HEADER_KEYS = ("format", "format_version", "teacher", "tokenizer", "targets", "attention", "data", "source")
HF = {"backend": "hf", "vllm_mode": None}
VLLM = {"backend": "vllm", "vllm_mode": "hidden"}


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory, chats_file) -> Path:
    out = tmp_path_factory.mktemp("manifest") / "cache"
    for w in (0, 1):
        run(
            RunConfig(
                teacher="tiny-mixtral", data=(str(chats_file),), out=str(out), backend="hf", top_k=4,
                shard_size=4, num_workers=2, worker_index=w, progress=False,
            )
        )  # fmt: skip
    return out


@pytest.fixture
def cache(tmp_path, two_workers) -> Path:
    dst = tmp_path / "cache"
    shutil.copytree(two_workers, dst)
    return dst


def part_file(cache: Path, w: int) -> Path:
    return cache / "parts" / f"worker-{w:05d}-of-00002.json"


def edit_part(cache: Path, w: int, edit) -> None:
    part = json.loads(part_file(cache, w).read_text())
    edit(part)
    part_file(cache, w).write_text(json.dumps(part))


def reversed_keys(x: object) -> object:
    """The same JSON value with every object's keys in the opposite order."""
    if isinstance(x, dict):
        return {k: reversed_keys(x[k]) for k in reversed(list(x))}
    return [reversed_keys(v) for v in x] if isinstance(x, list) else x


def test_config_hash_covers_every_setting_and_nothing_else(two_workers):
    """Changing any setting changes the hash (a run with it refuses the directory); the engine,
    versions and bookkeeping do not (a resume on another engine keeps its shards); nor does the
    order of keys (another writer may serialise them in another order)."""
    header = json.loads(part_file(two_workers, 0).read_text())
    h = config_hash(header)
    assert h == header["config_hash"] and h.startswith("sha256:")
    assert config_hash(reversed_keys(header)) == h
    for key in HEADER_KEYS:
        changed = {**header, key: {"other": header[key]}}
        assert config_hash(changed) != h, key
    bookkeeping = {"backend": VLLM, "engines": [], "codec_version": 1, "tool_version": "0", "config": {}, "shards": []}
    assert config_hash({**header, **bookkeeping, "worker": 1, "complete": False}) == h


def test_header_differences_name_at_most_three_paths(two_workers):
    a = json.loads(part_file(two_workers, 0).read_text())
    b = copy.deepcopy(a)
    b["teacher"]["dtype"], b["tokenizer"]["vocab_size"], b["targets"]["k"], b["source"] = "t", 7, 9, "s"
    assert header_differences(a, b) == ["source", "targets.k", "teacher.dtype"]  # sorted, the first three
    assert header_differences(a, b, limit=4) == ["source", "targets.k", "teacher.dtype", "tokenizer.vocab_size"]
    # where the teacher and the data were is provenance: their sha256s identify them
    b = copy.deepcopy(a)
    b["teacher"]["name"], b["teacher"]["path"], b["data"]["files"][0]["path"] = "t", "/elsewhere/t", "/x/d.jsonl"
    assert header_differences(a, b) == [] and config_hash(a) == config_hash(b)
    b["data"]["files"][0]["sha256"] = "sha256:00"
    assert header_differences(a, b) == ["data.files[0].sha256"] and config_hash(a) != config_hash(b)
    b = copy.deepcopy(a)
    b["data"]["files"].append({"path": "more.jsonl", "sha256": "sha256:00"})  # lists of another length
    assert header_differences(a, b) == ["data.files"]
    b["data"]["files"] = [{**a["data"]["files"][0], "sha256": "sha256:11"}]
    assert header_differences(a, b) == ["data.files[0].sha256"]
    assert header_differences(a, a) == []


def test_combined_backend_codec_version_and_engines():
    assert combine_backends([HF, HF, HF]) == HF
    assert combine_backends([HF, VLLM, HF]) == {"backend": "mixed", "vllm_mode": None, "parts": [HF, VLLM, HF]}
    # blocks are self-describing: a reader needs the highest version; none recorded means 1
    assert codec_version([{}, {"codec_version": 3}, {"codec_version": 2}]) == 3
    assert codec_version([{}, {}]) == 1
    e1, e2, e3 = {"backend": "hf", "torch": "2.5"}, {"backend": "hf", "torch": "2.6"}, {"backend": "vllm"}
    assert union_engines([[e1, e2], [e2, e3], [e1], []]) == [e1, e2, e3]


def test_assemble_waits_for_every_worker(cache):
    (cache / "manifest.json").unlink()
    edit_part(cache, 1, lambda p: p.update(complete=False))  # worker 1 killed after its last shard
    assert assemble(as_location(cache), 2) is None
    assert not (cache / "manifest.json").exists()


def test_assemble_refuses_parts_made_with_other_settings(cache):
    edit_part(cache, 1, lambda p: p.update(config_hash="sha256:" + "0" * 64))
    with pytest.raises(ManifestError, match=r"worker 1 of 2 was run with other settings than worker 0 \(config_hash "
                                            r"differ\): .*its part file parts/worker-00001-of-00002.json"):  # fmt: skip
        assemble(as_location(cache), 2)


def test_assembled_manifest_combines_every_part(cache):
    """Counts and bad records add up over workers, the wall time is the longest worker's (they run
    side by side), the codec version is the highest, engines are listed once, a worker's index
    is not part of the cache's config, and the result opens."""
    parts = [json.loads(part_file(cache, w).read_text()) for w in (0, 1)]
    engine = parts[0]["engines"][0]
    edits = [
        {"timing": {"wall_s": 5.0}, "bad_records": ["a.jsonl:3: bad"], "codec_version": 2},
        {"timing": {"wall_s": 7.0}, "bad_records": ["a.jsonl:9: bad"], "backend": VLLM, "engines": [engine, engine]},
    ]
    for w in (0, 1):
        edit_part(cache, w, lambda p, w=w: p.update(edits[w]))
    m = assemble(as_location(cache), 2)
    assert m == json.loads((cache / "manifest.json").read_text())
    counts = {k: sum(p["counts"][k] for p in parts) for k in parts[0]["counts"]}
    assert m["counts"] == counts and counts["samples"] == 12
    assert m["bad_records"] == ["a.jsonl:3: bad", "a.jsonl:9: bad"]
    assert m["timing"] == {"wall_s": 7.0, "tokens_per_s": counts["tokens"] / 7.0, "workers": 2}
    assert m["codec_version"] == 3 and m["engines"] == [engine]
    assert m["backend"] == {"backend": "mixed", "vllm_mode": None, "parts": [HF, VLLM]}
    assert "worker_index" in parts[1]["config"] and "worker_index" not in m["config"]
    assert [s["name"] for s in m["shards"]] == [s["name"] for p in parts for s in p["shards"]]
    assert len(list(open_cache(cache))) == 12


@pytest.mark.parametrize(
    "edit,why",
    [
        (lambda p: p.pop("data"), "it lacks the run's header keys"),
        (lambda p: p["counts"].pop("duplicates"), "counts must hold"),
        (lambda p: p["counts"].update(tokens=True), "counts must hold"),
        (lambda p: p["timing"].update(wall_s="5"), "timing.wall_s must be a number"),
        (lambda p: p.update(backend="hf"), "backend and config must be objects"),
        (lambda p: p.update(engines=["hf"]), "engines must be a list of objects"),
    ],
)
def test_a_complete_part_missing_what_assemble_reads_is_refused_by_name(cache, edit, why):
    edit_part(cache, 1, edit)
    with pytest.raises(ManifestError, match=f"malformed worker part \\({why}.*delete it to redo"):
        read_part(as_location(cache), 1, 2)
    with pytest.raises(ManifestError, match="malformed worker part"):
        assemble(as_location(cache), 2)


def _duplicate_first_shard(m: dict) -> None:
    m["shards"].append(dict(m["shards"][0]))
    m["counts"]["samples"] += m["shards"][0]["rows"]


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda m: m.update(codec_version=True), "codec version True is not supported"),
        (_duplicate_first_shard, "listed twice"),
        (lambda m: m["shards"][0].update(name="shard-w00000-000000.arrow/../../../etc/passwd"), "bad shard name"),
        (lambda m: m["shards"][0].update(name="sub/shard-w00000-000000.arrow"), "bad shard name"),
        (lambda m: m["shards"][0].update(rows=-1), "has no valid 'rows'"),
        (lambda m: m["shards"][0].update(bytes=True), "has no valid 'bytes'"),
        (lambda m: m["shards"][0].update(sha256=m["shards"][0]["sha256"].removeprefix("sha256:")), "has no sha256"),
        (lambda m: m["shards"][0]["chunks"].update(sha256=[h.upper() for h in m["shards"][0]["chunks"]["sha256"]]),
         "chunk hashes do not cover"),
        (lambda m: m["counts"].update(tokens=True), "counts.tokens must be a non-negative integer"),
        (lambda m: m["tokenizer"].update(vocab_size=0), r"tokenizer.vocab_size must be an integer in \[1, 2\*\*32\)"),
        # past the codec's 32-bit field: every row failed with a ValueError naming no file
        (lambda m: m["tokenizer"].update(vocab_size=1 << 32), r"tokenizer.vocab_size must be an integer in \[1, "),
        (lambda m: m["targets"].update(kind="dense"), "unknown target kind 'dense'"),
        (lambda m: m["targets"].update(k=0), "targets.k must be a positive integer"),
        (lambda m: m.update(targets={"kind": "sampled", "num_draws": 0}), "targets.num_draws must be an integer in"),
        (lambda m: m.update(targets={**m["targets"], "kind": "sampled", "num_draws": 50}),
         "targets.proposal None is not"),
        (lambda m: m.update(targets={**m["targets"], "kind": "sampled", "num_draws": 50, "proposal": "uniform"}),
         "targets.proposal 'uniform' is not 'teacher'"),
        (lambda m: m["targets"].update(temperature=2.0), "targets.temperature 2.0 is not 1.0"),
        (lambda m: m["targets"].update(temperature=True), "targets.temperature True is not 1.0"),
        (lambda m: m["targets"].pop("temperature"), "targets.temperature None is not 1.0"),
        (lambda m: m["targets"].update(logprobs="log2, raw"), "targets.logprobs 'log2, raw' is not 'natural log, raw'"),
        (lambda m: m.update(attention={"layers": [1], "top_k": 0}), "attention.top_k must be a positive integer"),
        (lambda m: m["teacher"].update(path=3), "bad teacher field"),
        (lambda m: m.update(engines=["hf"]), "bad engines"),
        (lambda m: m.update(format_version=2), "format version 2 is not supported"),
        (lambda m: m.update(codec_version=4), "codec version 4 is not supported"),
        (lambda m: m.update(codec_version="2"), "codec version '2' is not supported"),
        (lambda m: m.update(format="something-else"), "not a teacher-cache manifest"),
        (lambda m: m["shards"][0].update(name="../../etc/passwd"), "bad shard name"),
        (lambda m: m["counts"].update(samples=99), "counts.samples"),
        (lambda m: m.pop("tokenizer"), "lacks 'tokenizer'"),
        (lambda m: m["shards"][0]["chunks"]["sha256"].append("0" * 64), "chunk hashes do not cover"),
        (lambda m: m["shards"][0]["chunks"].update(size=1 << 40), "chunk size outside"),
        (lambda m: m["targets"].update(logprob_error=-1), "targets.logprob_error: .*multiple of 0.005"),
        (lambda m: m["targets"].update(logprob_error="0.02"), "targets.logprob_error: .*must be a number"),
    ],
)  # fmt: skip
def test_validate_refuses_each_bad_field_by_name_before_reading_a_shard(cache, edit, match):
    """docs/FORMAT.md: every field is checked before use, so a bad one is a one-line manifest
    error naming it, not a shard error (or a path outside the cache) further on."""
    mpath = cache / "manifest.json"
    m = json.loads(mpath.read_text())
    edit(m)
    mpath.write_text(json.dumps(m))
    with pytest.raises(ManifestError, match=match):
        open_cache(cache)
