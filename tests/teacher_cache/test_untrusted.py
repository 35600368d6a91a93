"""A cache from elsewhere is untrusted: tampered shards and manifests are refused by name; merge."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from teacher_cache import codec, open_cache
from teacher_cache.inspection import summary
from teacher_cache.manifest import ManifestError, config_hash
from teacher_cache.merge import MergeError, merge
from teacher_cache.run import RunConfig, run
from teacher_cache.shards import SCHEMA, ShardError, checksums_of

CLI = [sys.executable, "-m", "teacher_cache.cli"]


@pytest.fixture(scope="module")
def good_cache(tmp_path_factory, chats_file) -> Path:
    out = tmp_path_factory.mktemp("good") / "cache"
    run(
        RunConfig(
            teacher="tiny-mixtral",
            data=(str(chats_file),),
            out=str(out),
            backend="hf",
            top_k=8,
            attention_layers=(1,),
            attention_top_k=4,
            shard_size=6,
            progress=False,
        )
    )
    return out


@pytest.fixture
def cache(tmp_path, good_cache) -> Path:
    dst = tmp_path / "cache"
    shutil.copytree(good_cache, dst)
    return dst


def first_shard(cache: Path) -> Path:
    return cache / json.loads((cache / "manifest.json").read_text())["shards"][0]["name"]


def rewrite_shard(
    cache: Path, edit, schema: pa.Schema | None = None, compression: str | None = None, index: int = 0
) -> None:
    """Replace a shard (the first by default) by an edited copy and fix its size and sha256 in the
    manifest, so only the deeper checks can catch the change."""
    path = cache / json.loads((cache / "manifest.json").read_text())["shards"][index]["name"]
    table = pa.ipc.open_file(pa.BufferReader(path.read_bytes())).read_all()
    rows = table.to_pylist()
    edit(rows)
    target = schema or table.schema
    new = pa.Table.from_pylist(rows, schema=target)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, target, options=pa.ipc.IpcWriteOptions(compression=compression)) as w:
        w.write_table(new)
    data = sink.getvalue().to_pybytes()
    path.write_bytes(data)
    mpath = cache / "manifest.json"
    m = json.loads(mpath.read_text())
    m["shards"][index].update(checksums_of(data))
    mpath.write_text(json.dumps(m))


def refused(cache: Path, match: str) -> None:
    with pytest.raises((ShardError, ManifestError), match=match):
        list(open_cache(cache))
    done = subprocess.run([*CLI, "verify", str(cache)], capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert match.split(".*")[0].replace("\\", "") in done.stderr


def test_verify_passes_an_untouched_cache(good_cache):
    done = subprocess.run([*CLI, "verify", str(good_cache)], capture_output=True, text=True)
    assert done.returncode == 0 and "ok: 12 samples" in done.stdout
    assert "verifying: 100%" in done.stderr and "12/12" in done.stderr  # progress, on stderr
    quiet = subprocess.run([*CLI, "verify", str(good_cache), "--no-progress"], capture_output=True, text=True)
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_flipped_byte_fails_the_checksum(cache):
    p = first_shard(cache)
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    refused(cache, "sha256 mismatch")


def test_random_bytes_behind_valid_checksums_are_refused_by_name(cache):
    """A shard whose bytes changed *and* whose manifest hashes were recomputed (a writer bug, or a
    crafted cache from elsewhere): corrupt IPC messages, zstd buffers, string offsets, invalid
    UTF-8, schema metadata. Each read ends in a ShardError naming the shard (one line), or, when
    the change hit bytes that still decode to valid rows, reads through; never another error."""
    path = first_shard(cache)
    clean = path.read_bytes()
    mpath = cache / "manifest.json"
    manifest = json.loads(mpath.read_text())
    entry = manifest["shards"][0]
    rng = np.random.default_rng(0)
    refusals = 0
    for _ in range(80):
        data = bytearray(clean)
        for _ in range(int(rng.integers(1, 4))):
            data[int(rng.integers(8, len(data) - 8))] = int(rng.integers(0, 256))
        path.write_bytes(bytes(data))
        entry.update(checksums_of(bytes(data), entry["chunks"]["size"]))
        mpath.write_text(json.dumps(manifest))
        try:
            for _ in open_cache(cache):
                pass
        except ShardError as e:
            assert entry["name"] in str(e) and "\n" not in str(e), str(e)
            refusals += 1
    assert refusals >= 60  # most changes land in structure, buffers or metadata


def test_truncated_shard(cache):
    p = first_shard(cache)
    p.write_bytes(p.read_bytes()[:-100])
    refused(cache, "bytes stored, manifest says")


def test_other_schema(cache):
    schema = SCHEMA.set(SCHEMA.get_field_index("input_ids"), pa.field("input_ids", pa.list_(pa.int64())))
    meta = pa.ipc.open_file(pa.BufferReader(first_shard(cache).read_bytes())).schema.metadata
    rewrite_shard(cache, lambda rows: None, schema.with_metadata(meta))
    refused(cache, re.escape(str(first_shard(cache))) + ": schema differs")


def test_token_id_outside_the_vocabulary(cache):
    def edit(rows):
        rows[2]["input_ids"][3] = 40000

    rewrite_shard(cache, edit)
    refused(cache, "row 2: token id outside the vocabulary")


def test_target_id_outside_the_vocabulary(cache):
    def edit(rows):
        P = len(rows[1]["target_positions"])
        ids = np.tile(np.arange(8), (P, 1))
        ids[0, 0] = 50000  # a valid block for a 65536 vocabulary, not for this one
        lps = np.tile(np.linspace(-0.5, -4, 8, dtype=np.float32), (P, 1))
        rows[1]["targets"] = codec.encode_topk(ids, lps, np.full(P, -3.0, np.float32), vocab_size=65536)

    rewrite_shard(cache, edit)
    refused(cache, "row 1: .*")


def test_a_top_k_row_that_names_an_id_twice(cache):
    """The encoder refuses repeated ids, but a crafted block with a valid CRC can hold them: the
    reader refuses it (a repeated id would count its mass twice, and a KL could turn negative)."""

    def edit(rows):
        ids, lps, tail = codec.decode_topk(rows[1]["targets"], vocab_size=32000)
        ids[0, 1] = ids[0, 0]
        rows[1]["targets"] = unchecked_topk(ids, lps, tail, 32000)
        assert (codec.decode_topk(rows[1]["targets"], vocab_size=32000)[0] == ids).all()  # the codec takes it

    rewrite_shard(cache, edit)
    refused(cache, "row 1: a top-k row names the same id twice")


def test_an_attention_row_that_names_a_key_twice(cache):
    """The same for attention rows: a key named twice would count its weight twice (the attention
    KL of a student equal to the teacher came out negative)."""

    def edit(rows):
        T, P = len(rows[0]["input_ids"]), len(rows[0]["target_positions"])
        ids, lps, tail = codec.decode_topk(rows[0]["attention"][0], vocab_size=T)
        ids[-1] = ids[-1, 0]  # the last query (it sees the most keys) names its first key 4 times
        lps[-1], tail[-1] = np.log(np.float32(0.25)), -np.inf
        rows[0]["attention"] = [unchecked_topk(ids, lps, tail, T)]
        assert codec.decode_topk(rows[0]["attention"][0], vocab_size=T, max_positions=P)[0].shape == (P, 4)

    rewrite_shard(cache, edit)
    refused(cache, "row 0: an attention row names the same key twice")


def unchecked_topk(ids: np.ndarray, lps: np.ndarray, tail: np.ndarray, V: int) -> bytes:
    """encode_topk's body past its input checks: a block as a careless or hostile writer makes it."""
    mode, n_uniq, widths, streams = codec._topk_streams(ids, lps, tail, codec.ZSTD_LEVEL)
    chunks = [c for stream in streams.values() for c in stream]
    frames = codec._compress(chunks, codec.ZSTD_LEVEL)
    P, k = ids.shape
    header = codec._TOPK_HEADER.pack(
        codec.MAGIC, codec.CODEC_VERSION, codec.KIND_TOPK, mode, len(frames), P, k, V, n_uniq, *widths,
        sum(map(len, chunks)), sum(map(len, frames)),
    )  # fmt: skip
    return codec._finish(header, frames)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda m: m["data"].update(max_length="16"), "data.max_length must be an integer >= 2"),
        (lambda m: m["shards"][0].update(config_hash=None), "has a config_hash that is not a string"),
        (lambda m: m.update(bad_records=None), "bad_records must be a list"),
        (lambda m: m["shards"][0]["chunks"].update(size=1), r"chunk size outside \[4096, "),
        (lambda m: m["shards"][0].update(name=m["shards"][0]["name"] + "\n"), "bad shard name"),
        (lambda m: m["targets"].update(kind="sampled", num_draws=1 << 31, proposal="teacher"),
         r"targets.num_draws must be an integer in \[1, 65536\]"),
        # a trainer allocated an index of 24 bytes per listed row before reading a shard (192 GiB)
        (lambda m: (m["shards"][0].update(rows=2**33), m["counts"].update(samples=2**33 + 6)),
         r"lists 8589934592 rows in .* bytes"),
        (lambda m: m.update(format_version=True), "format version True is not supported"),
    ],
)  # fmt: skip
def test_manifest_fields_the_reader_bounds_by(cache, edit, match):
    mpath = cache / "manifest.json"
    m = json.loads(mpath.read_text())
    edit(m)
    mpath.write_text(json.dumps(m))
    refused(cache, match)


def forge_settings(cache: Path, edit) -> None:
    """Edit the manifest's settings as a forger (or a test of other settings) would: its
    config_hash recomputed and every shard's metadata made to match, so only the checks of the
    rows themselves can tell."""
    mpath = cache / "manifest.json"
    m = json.loads(mpath.read_text())
    edit(m)
    new_hash = m["config_hash"] = config_hash(m)
    mpath.write_text(json.dumps(m))
    for index, entry in enumerate(m["shards"]):
        meta = dict(pa.ipc.open_file(pa.BufferReader((cache / entry["name"]).read_bytes())).schema.metadata)
        inner = json.loads(meta[b"teacher_cache"])
        meta[b"teacher_cache"] = json.dumps({**inner, "config_hash": new_hash}).encode()
        rewrite_shard(cache, lambda rows: None, SCHEMA.with_metadata(meta), index=index)


def test_rows_longer_than_the_manifests_max_length(cache):
    """An 18 KB shard held a 100M-token row."""
    forge_settings(cache, lambda m: m["data"].update(max_length=16))
    refused(cache, r"row 0: .*tokens, past the cache's max_length 16")


def test_a_vocabulary_past_the_codecs_32_bits_is_a_manifest_error(cache):
    """Forged with its config hash recomputed: every row failed with the codec's ValueError
    ("vocab_size must be in [1, 2**32)"), which named neither the manifest nor a shard."""
    forge_settings(cache, lambda m: m["tokenizer"].update(vocab_size=1 << 32))
    refused(cache, r"manifest.json: tokenizer.vocab_size must be an integer in \[1, 2\*\*32\)")


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["data"].update(only_domain="law"),  # eval and DAE would take every sample as law's
        lambda m: m["data"].update(exclude_domain="math"),
        lambda m: m["tokenizer"].update(fingerprint="sha256:" + "1" * 64),
        lambda m: m["teacher"].update(weights_sha256="sha256:" + "2" * 64),
        lambda m: m["targets"].update(logprob_error=0.04),
        lambda m: m["data"]["files"][0].update(sha256="sha256:" + "3" * 64),
        lambda m: m.update(source="mixtral"),
    ],
    ids=["only_domain", "exclude_domain", "tokenizer", "weights", "logprob_error", "data_file", "source"],
)
def test_settings_edited_after_the_run_are_refused(cache, edit):
    """The config hash is recomputed from the manifest's settings, not taken on trust."""
    mpath = cache / "manifest.json"
    m = json.loads(mpath.read_text())
    edit(m)
    mpath.write_text(json.dumps(m))
    refused(cache, "its settings do not hash to its config_hash: edited after the run")


def test_only_a_merged_caches_shards_carry_their_own_config_hash(cache, good_cache, tmp_path):
    """A shard of another run, listed with that run's hash, in a cache that is not a merge."""
    merged = tmp_path / "merged"
    merge([str(good_cache), str(cache)], str(merged), progress=False)  # the copy's rows are dropped as repeats
    mpath = cache / "manifest.json"
    m = json.loads(mpath.read_text())
    m["shards"][0]["config_hash"] = "sha256:" + "4" * 64
    mpath.write_text(json.dumps(m))
    refused(cache, "has a config_hash of its own, which only a merged cache's have")

    assert len(list(open_cache(merged))) == 12  # as merged
    mpath = merged / "manifest.json"
    good = json.loads(mpath.read_text())
    other = "sha256:" + "6" * 64
    for edit, match in [
        (lambda m: m["merged_from"][0].update(config_hash="sha256:" + "5" * 64), "merged_from does not hash"),
        (lambda m: m["shards"][0].pop("config_hash"), "of a merged cache has no config_hash"),
        (lambda m: m.update(merged_from=[]), "merged_from must list each source's config_hash"),
        # a merged cache's settings were not checked at all: a student whose tokenizer swaps ids,
        # or attention layers listed in another order, trained on silently
        (lambda m: m["tokenizer"].update(fingerprint=other), "tokenizer.fingerprint differ from the run sha256:"),
        (lambda m: m["attention"].update(layers=[0]), "attention.layers\\[0\\] differ from"),  # its rows are layer 1's
        (lambda m: m["teacher"].update(weights_sha256=other), "teacher.weights_sha256 differ from the run"),
        (lambda m: m["runs"][0]["settings"]["tokenizer"].update(fingerprint=other), "runs: settings that do not hash"),
        (lambda m: m["shards"][0].update(config_hash=other), "names a run \\(config_hash\\) that runs does not list"),
        (lambda m: m["data"].update(max_length=1 << 20), "data.max_length differ from what its runs give"),
        (lambda m: m["data"].update(only_domain="math"), "data.only_domain differ from what its runs give"),
        (lambda m: m.pop("runs"), "one merged before teacher-cache 0.2.1 has none: merge its sources again"),
    ]:
        m = json.loads(json.dumps(good))
        edit(m)
        mpath.write_text(json.dumps(m))
        refused(merged, match)


def test_a_manifest_hashed_the_0_1_0_way_still_opens(good_cache):
    """teacher-cache 0.1.0 hashed the paths too; its manifests (and shards) carry that hash."""
    from teacher_cache.manifest import config_hash_v010, validate

    m = json.loads((good_cache / "manifest.json").read_text())
    m["config_hash"] = config_hash_v010(m)
    assert m["config_hash"] != config_hash(m)
    validate(m, "old")


def test_block_that_lies_about_its_size(cache):
    def edit(rows):
        blob = bytearray(rows[0]["targets"])
        blob[8:12] = (10**9).to_bytes(4, "little")  # the header's position count
        rows[0]["targets"] = bytes(blob)

    rewrite_shard(cache, edit)
    refused(cache, "row 0: .*")


def test_a_record_batch_that_would_decompress_past_what_its_rows_can_hold(cache):
    """A decompression bomb in Arrow's own zstd buffers: 40 MB of token ids in a few KB. The
    batch's declared sizes are read from its metadata and refused before Arrow decompresses it."""

    def edit(rows):
        rows[0]["input_ids"] = np.zeros(10_000_000, np.int32)

    rewrite_shard(cache, edit, compression="zstd")
    assert first_shard(cache).stat().st_size < 100_000
    refused(cache, r"a record batch of 6 rows declares .*4\d{7} bytes decompressed, more than its rows can hold")


def test_lengths_that_disagree(cache):
    def edit(rows):
        rows[0]["target_positions"] = rows[0]["target_positions"][:-1]  # the block still holds P rows

    rewrite_shard(cache, edit)
    refused(cache, "row 0: .*(targets hold|exceeds max_positions)")


def _attention_key_after_query(rows):
    """Row 0's attention block, rebuilt so its first query's top key lies after that query."""
    T, pos = len(rows[0]["input_ids"]), np.array(rows[0]["target_positions"])
    ids = np.zeros((len(pos), 4), np.int64)  # [P, 4] keys 0..3 (distinct, never after the query)
    ids[:] = np.arange(4)
    ids[0, 0] = pos[0] + 1  # a key the query cannot see
    lps = np.tile(np.log(np.float32([0.4, 0.3, 0.2, 0.05])), (len(pos), 1))
    rows[0]["attention"] = [codec.encode_topk(ids, lps, np.full(len(pos), np.log(0.05), np.float32), vocab_size=T)]


def _metadata(edit):
    """An edit that changes the shard's schema metadata (rewrite_shard's schema argument)."""

    def schema(cache: Path) -> pa.Schema:
        meta = dict(pa.ipc.open_file(pa.BufferReader(first_shard(cache).read_bytes())).schema.metadata)
        return SCHEMA.with_metadata(edit(meta))

    return schema


def _with_config_hash(meta: dict) -> dict:
    inner = json.loads(meta[b"teacher_cache"])
    return {**meta, b"teacher_cache": json.dumps({**inner, "config_hash": "sha256:" + "0" * 64}).encode()}


@pytest.mark.parametrize(
    "edit,schema,match",
    [
        (lambda rows: rows[0]["target_positions"].__setitem__(-1, len(rows[0]["input_ids"]) - 1), None,
         r" row 0: target positions not strictly increasing within \[0, "),
        (lambda rows: rows[1]["target_positions"].reverse(), None, " row 1: target positions not strictly increasing"),
        (_attention_key_after_query, None, " row 0: attention key after its query"),
        (lambda rows: rows.pop(), None, ": 5 rows, manifest says 6"),
        (lambda rows: rows.append(rows[0]), None, ": more rows than the 6 the manifest lists"),
        (lambda rows: None, _metadata(_with_config_hash), ": made by a different run than this manifest describes"),
        (lambda rows: None, _metadata(lambda m: {k: v for k, v in m.items() if k != b"teacher_cache"}),
         ": no teacher_cache metadata in the schema"),
        (lambda rows: None, _metadata(lambda m: {**m, b"teacher_cache": b"[1, 2]"}),
         ": unreadable teacher_cache metadata"),
        (lambda rows: rows[0].update(input_ids=None), None, ": column input_ids holds nulls"),
        (lambda rows: rows[1].update(target_positions=None), None, ": column target_positions holds nulls"),
        (lambda rows: rows[0]["input_ids"].__setitem__(3, None), None, ": column input_ids holds nulls"),
        (lambda rows: rows[2].update(sample_id=None), None, ": column sample_id holds nulls"),
        (lambda rows: rows[2].update(targets=None), None, ": column targets holds nulls"),
        (lambda rows: rows[0]["attention"].__setitem__(0, None), None, ": column attention holds nulls"),
        # 63 MB of schema metadata took ~1 GB of memory to verify (and verified ok)
        (lambda rows: None, _metadata(lambda m: {**m, b"junk": b"x" * (2 << 20)}),
         ": a schema of .* bytes, over the reader's limit of 1048576"),
        # the trainer failed on it in torch ("cannot reshape tensor of 0 elements"), naming no row
        (lambda rows: rows[0].update(input_ids=[], target_positions=[]), None, " row 0: a row with no tokens"),
    ],
)  # fmt: skip
def test_rows_that_break_the_readers_checks_are_refused_by_name(cache, edit, schema, match):
    """Named with the cache's location: every cache has a shard-w00000-000000.arrow (train and
    eval mix several), and the schema, metadata and null checks named the file alone."""
    rewrite_shard(cache, edit, schema(cache) if schema else None)
    refused(cache, re.escape(str(first_shard(cache))) + match)


def test_a_shard_with_an_empty_record_batch_is_read(cache):
    """A record batch of 0 rows (another writer's; Arrow allows it) omits its length from the
    flatbuffer (the default, 0): it read as 'malformed record batch message (field 0 missing)'."""
    path = first_shard(cache)
    reader = pa.ipc.open_file(pa.BufferReader(path.read_bytes()))
    table = reader.read_all()
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.ipc.new_file(sink, reader.schema, options=options) as w:
        w.write_batch(
            table.slice(0, 0).to_batches()[0]
            if table.slice(0, 0).to_batches()
            else pa.RecordBatch.from_pylist([], schema=reader.schema)
        )
        w.write_table(table)
    data = sink.getvalue().to_pybytes()
    assert pa.ipc.open_file(pa.BufferReader(data)).num_record_batches == 1 + reader.num_record_batches
    path.write_bytes(data)
    mpath = cache / "manifest.json"
    m = json.loads(mpath.read_text())
    m["shards"][0].update(checksums_of(data))
    mpath.write_text(json.dumps(m))
    assert len(list(open_cache(cache))) == m["counts"]["samples"]


def _reencoded(column: str, change) -> callable:
    """A rewrite_shard edit: row 0's `column` block (the first attention layer's for "attention")
    decoded, changed by change(ids, lps, tail, V) -> (lps, tail, max_error), encoded again by the
    official encoder: valid bytes, wrong values."""

    def edit(rows: list[dict]) -> None:
        row = rows[0]
        V = 32000 if column == "targets" else len(row["input_ids"])
        blob = row[column] if column == "targets" else row[column][0]
        ids, lps, tail = codec.decode_topk(blob, vocab_size=V)
        lps, tail, err = change(ids, lps, tail, V)
        new = codec.encode_topk(ids, lps, tail, vocab_size=V, max_error=err)
        if column == "targets":
            row["targets"] = new
        else:
            row["attention"][0] = new

    return edit


@pytest.mark.parametrize(
    "edit,match",
    [
        # every log-prob 0: a mass of k, which train renormalised into a uniform teacher
        (_reencoded("targets", lambda i, lp, t, V: (np.zeros_like(lp), np.full_like(t, -np.inf), 0.02)),
         "a top-k row's probabilities and tail sum to 8, not 1 within the cache's error bound"),
        (_reencoded("targets", lambda i, lp, t, V: (np.full_like(lp, -np.inf), np.full_like(t, -np.inf), 0.02)),
         "a top-k row's probabilities and tail sum to 0, not 1"),
        (_reencoded("attention", lambda i, lp, t, V: (np.full_like(lp, -np.inf), np.full_like(t, -np.inf), 0.02)),
         "an attention row's weights and tail sum to 0, not 1"),
        # the manifest says 0.02 nats: blocks of a coarser bound were read as if they held to it
        (_reencoded("targets", lambda i, lp, t, V: (lp, t, 1.275)),
         "encoded with a log-prob error bound of 1.275 nats, expected 0.02"),
    ],
)  # fmt: skip
def test_blocks_that_decode_but_hold_no_distribution_are_refused_by_name(cache, edit, match):
    rewrite_shard(cache, edit)
    refused(cache, f"{first_shard(cache).name} row 0: .*{match}")


def test_attention_rows_in_a_cache_that_declares_none(cache):
    forge_settings(cache, lambda m: m.update(attention=None))
    refused(cache, "row 0: attention present but the manifest declares none")


def test_a_shard_over_the_readers_size_limit_says_so(cache, monkeypatch):
    import teacher_cache.cache

    monkeypatch.setattr(teacher_cache.cache, "MAX_SHARD_BYTES", 1000)  # 4 GiB in real use
    size = first_shard(cache).stat().st_size
    with pytest.raises(ShardError, match=f"{first_shard(cache).name}: {size} bytes, over the reader's limit of 1000"):
        list(open_cache(cache))


@pytest.mark.parametrize("stand_in", ["directory", "dangling link"])
def test_a_folder_or_a_dangling_link_in_place_of_a_shard_is_named(cache, stand_in):
    """They read as '4096 bytes stored' and '0 bytes stored' (and as missing from verify)."""
    shard = first_shard(cache)
    shard.unlink()
    if stand_in == "directory":
        shard.mkdir()
        refused(cache, f"{shard.name}: a directory, not a shard file")
    else:
        shard.symlink_to(cache / "gone.arrow")
        refused(cache, f"{shard.name}: a symbolic link to {cache / 'gone.arrow'}, which does not exist, not a shard")


@pytest.mark.parametrize("stand_in", ["directory", "link to a directory"])
def test_a_folder_in_place_of_the_manifest_is_named(cache, stand_in):
    """It read as "3: is a directory" (the number of the descriptor opened), naming no file."""
    path = cache / "manifest.json"
    path.unlink()
    if stand_in == "directory":
        path.mkdir()
    else:
        path.symlink_to(cache / "parts", target_is_directory=True)
    for command in ("verify", "inspect"):
        done = subprocess.run([*CLI, command, str(cache)], capture_output=True, text=True)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.strip() == f"Error: {path}: a directory, not a regular file", done.stderr
    with pytest.raises(ManifestError, match="manifest.json: a directory, not a regular file"):
        open_cache(cache)


@pytest.mark.parametrize("where", ["shard", "empty shard", "manifest"])
def test_a_fifo_in_place_of_a_shard_or_the_manifest_is_named_not_waited_on(cache, where):
    """Opening a FIFO waits for a writer: inspect hung on a manifest.json FIFO, and train, verify
    and merge on a shard FIFO listed at 0 bytes (a FIFO's listed size; at other sizes it read as
    '0 bytes stored'); tar and rsync copy FIFOs. Run in subprocesses with a timeout, so a
    regression fails instead of hanging the suite."""
    path = first_shard(cache) if where != "manifest" else cache / "manifest.json"
    if where == "empty shard":  # listed with no rows in 0 bytes, the size a FIFO lists at
        m = json.loads((cache / "manifest.json").read_text())
        m["counts"]["samples"] -= m["shards"][0]["rows"]
        m["shards"][0].update(bytes=0, rows=0)
        (cache / "manifest.json").write_text(json.dumps(m))
    path.unlink()
    os.mkfifo(path)
    for command in ("verify", "inspect") if where == "manifest" else ("verify",):  # inspect reads no shard
        done = subprocess.run([*CLI, command, str(cache)], capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
        assert f"{path.name}: a FIFO, not a " in done.stderr, done.stderr
    if where != "manifest":
        with pytest.raises(ShardError, match=f"{path.name}: a FIFO, not a shard file"):
            open_cache(cache).check_files()


def test_a_cache_still_being_written_says_to_wait_not_to_resume(cache):
    """Readers of a cache a run is writing were told "its command, run again, resumes it", which
    the run's lock would refuse; with the worker's lock held they are told to wait, naming its pid."""
    from teacher_cache.manifest import worker_lock_name
    from teacher_cache.storage import exclusive

    (cache / "manifest.json").unlink()
    part = cache / "parts" / "worker-00000-of-00001.json"
    part.write_text(json.dumps({**json.loads(part.read_text()), "complete": False}))
    with exclusive(cache / worker_lock_name(0)), pytest.raises(ManifestError) as held:
        open_cache(cache)
    assert str(held.value).endswith(f"a run is writing it now (pid {os.getpid()}): wait for it to finish")
    with pytest.raises(ManifestError, match="the run is unfinished: its command, run again, resumes it"):
        open_cache(cache)  # the lock released: a run that stopped


def test_missing_shard_file(cache):
    first_shard(cache).unlink()
    refused(cache, "listed in the manifest but missing from")


@pytest.mark.parametrize("damage", ["cut", "gone"])
def test_a_lost_or_cut_last_shard_is_found_when_the_cache_opens(cache, tmp_path, damage):
    """Not when training reaches that shard (after steps and checkpoints): one listing at open
    compares every shard's size with the manifest's, for check, train and eval alike."""
    last = cache / json.loads((cache / "manifest.json").read_text())["shards"][-1]["name"]
    if damage == "cut":
        last.write_bytes(last.read_bytes()[:5000])
        why = f"{last.name}: 5000 bytes stored, manifest says"
    else:
        last.unlink()
        why = f"{last.name}: listed in the manifest but missing from {cache}"
    with pytest.raises(ShardError, match=why):
        open_cache(cache)
    assert summary(str(cache))["samples"] == 12  # inspect still shows what the manifest says
    st = [sys.executable, "-m", "student_train.cli"]
    for args in (["check"], ["train", "--out", str(tmp_path / "run")]):
        done = subprocess.run(
            [*st, *args, "--student", "tiny-mistral", "--cache", str(cache)], capture_output=True, text=True
        )
        assert done.returncode == 1 and why in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "run").exists()


def test_sampled_rows_with_another_number_of_draws(tmp_path, chats_file):
    out = tmp_path / "sampled"
    run(RunConfig(teacher="tiny-mixtral", data=(str(chats_file),), out=str(out), backend="hf", targets="sampled",
                  num_draws=16, shard_size=6, progress=False))  # fmt: skip

    def edit(rows):
        P = len(rows[0]["target_positions"])
        offsets, ids, counts = np.arange(P + 1), np.full(P, 5), np.full(P, 7)  # one id drawn 7 times
        rows[0]["targets"] = codec.encode_sampled(offsets, ids, counts, vocab_size=32000, num_draws=7)

    rewrite_shard(out, edit)
    refused(out, r"row 0: num_draws=7, expected 16")  # before the block is decompressed


def test_verify_reports_counts_and_source_tags_the_rows_do_not_bear_out(cache):
    """Recorded, not used to decide anything, so the reader passes them; verify reads every row."""
    forge_settings(cache, lambda m: m.update(source="someone-else"))  # the rows' tags say otherwise
    mpath = cache / "manifest.json"
    m = json.loads(mpath.read_text())
    first = m["shards"][0]
    first["tokens"] += 1
    m["counts"]["target_positions"] -= 2
    mpath.write_text(json.dumps(m))
    assert len(list(open_cache(cache))) == 12
    done = subprocess.run([*CLI, "verify", str(cache), "--no-progress"], capture_output=True, text=True)
    problems = [ln for ln in done.stderr.splitlines() if ln.startswith("PROBLEM")]
    tokens, positions = first["tokens"] - 1, m["counts"]["target_positions"] + 2
    assert done.returncode == 1 and len(problems) == 14
    assert f"PROBLEM: {first['name']}: rows hold {tokens} tokens, its entry says {tokens + 1}" in problems
    assert f"PROBLEM: counts.target_positions: rows hold {positions}, the manifest says {positions - 2}" in problems
    tags = [p for p in problems if "source tag 'tiny-mixtral', the manifest's is 'someone-else'" in p]
    assert len(tags) == 12  # one per row


def test_verify_reports_a_sample_stored_twice(cache):
    """A shard copied under a new name and listed (sizes and counts fixed up): every row opens,
    but the trainer would see those samples twice an epoch. run and merge keep one row per id."""
    mpath = cache / "manifest.json"
    m = json.loads(mpath.read_text())
    copy = {**m["shards"][0], "name": "shard-w00000-000009.arrow"}
    shutil.copy(cache / m["shards"][0]["name"], cache / copy["name"])
    m["shards"].append(copy)
    m["counts"] = {k: v + copy.get(k, 0) if k in ("tokens", "target_positions") else v for k, v in m["counts"].items()}
    m["counts"]["samples"] += copy["rows"]
    mpath.write_text(json.dumps(m))
    assert len(list(open_cache(cache))) == 18
    done = subprocess.run([*CLI, "verify", str(cache), "--no-progress"], capture_output=True, text=True)
    problems = [ln for ln in done.stderr.splitlines() if ln.startswith("PROBLEM")]
    assert done.returncode == 1 and len(problems) == 6, done.stderr
    first = [s.sample_id for s in open_cache(cache).iter_shard(m["shards"][0]["name"])]
    expected = f"PROBLEM: sample {first[0]!r}: stored 2 times ({m['shards'][0]['name']}, {copy['name']})"
    assert problems[:5] == [expected.replace(repr(first[0]), repr(sid)) for sid in first[:5]]
    assert problems[5] == "PROBLEM: ... and 1 more sample ids stored more than once"


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda m: m["data"].update(only_domain="math"), "domain {d!r} in a cache of domain 'math' only"),
        (lambda m: m["data"].update(exclude_domain=["math", "code"]), "which the cache excludes"),
    ],
    ids=["only_domain", "exclude_domain"],
)
def test_verify_checks_each_rows_domain_against_the_filter(cache, edit, match):
    """Settings that hash (as a merged cache's need not) but rows of other domains."""
    domains = {s.sample_id: s.domain for s in open_cache(cache)}
    forge_settings(cache, edit)
    done = subprocess.run([*CLI, "verify", str(cache), "--no-progress"], capture_output=True, text=True)
    problems = [ln for ln in done.stderr.splitlines() if ln.startswith("PROBLEM")]
    if "only" in match:
        wrong = [sid for sid, d in domains.items() if d != "math"]
        assert len(problems) == len(wrong) > 0
        assert all(match.format(d=domains[p.split(" sample ")[1].split(":")[0]]) in p for p in problems)
    else:
        wrong = [sid for sid, d in domains.items() if d in ("math", "code")]
        assert len(problems) == len(wrong) > 0 and all(match in p for p in problems)
    assert done.returncode == 1


def test_verify_and_inspect_print_a_caches_strings_as_one_escaped_line(cache):
    """A sample id or teacher name holding a newline and an escape sequence printed a forged
    "PROBLEM: nothing, all fine" line and recoloured the terminal."""
    evil = "x\nPROBLEM: nothing, all fine\x1b[32m"
    rewrite_shard(cache, lambda rows: rows[0].update(sample_id=evil, domain="geography"))
    forge_settings(cache, lambda m: (m["data"].update(only_domain="math"), m["teacher"].update(name=evil)))
    done = subprocess.run([*CLI, "verify", str(cache), "--no-progress"], capture_output=True, text=True)
    assert done.returncode == 1 and "sample x\\nPROBLEM: nothing, all fine\\x1b[32m: domain" in done.stderr
    shown = subprocess.run([*CLI, "inspect", str(cache)], capture_output=True, text=True)
    assert shown.returncode == 0 and "x\\nPROBLEM: nothing, all fine\\x1b[32m" in shown.stdout
    assert "only_domain: math\n" in shown.stdout and "max_length: 2048\n" in shown.stdout  # a DAE cache's role
    for out in (done.stderr, shown.stdout):
        assert "\x1b" not in out and not any(line.startswith("PROBLEM: nothing") for line in out.splitlines())


def test_shard_not_in_manifest_is_reported(cache):
    shutil.copy(first_shard(cache), cache / "shard-w00009-000000.arrow")
    done = subprocess.run([*CLI, "verify", str(cache)], capture_output=True, text=True)
    assert done.returncode == 1 and "not listed in the manifest" in done.stderr


def _json_paths(x: object, pre: tuple = ()):
    yield pre
    items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else ()
    for k, v in items:
        yield from _json_paths(v, (*pre, k))


def test_manifest_fields_of_the_wrong_type_are_refused_by_name(cache):
    """Any field of the manifest replaced by a value of another type (or dropped), one to three at a
    time: reading every sample and `inspect` either work or fail with ManifestError / ShardError;
    never a TypeError, KeyError or AttributeError from code that trusted the type."""
    mpath = cache / "manifest.json"
    good = json.loads(mpath.read_text())
    paths = [p for p in _json_paths(good) if p]
    values = [None, 0, -1, 1, "x", [], {}, 1e308, True, 2**70, [1], {"a": 1}]
    rng = random.Random(0)
    refusals = 0
    for _ in range(300):
        m = json.loads(json.dumps(good))
        for _ in range(rng.randint(1, 3)):
            *parents, last = rng.choice(paths)
            try:
                node = functools.reduce(lambda n, key: n[key], parents, m)
                if isinstance(node, dict) and rng.random() < 0.2:
                    del node[last]
                else:
                    node[last] = rng.choice(values)
            except (KeyError, IndexError, TypeError):  # an earlier edit removed or replaced the parent
                pass
        mpath.write_text(json.dumps(m))
        try:
            for _ in open_cache(cache):
                pass
            summary(str(cache))
        except (ManifestError, ShardError):
            refusals += 1
    assert refusals >= 150


def test_manifest_names_the_codec_version_and_older_caches_without_it_still_open(cache, good_cache):
    """The manifest says which codec version its blocks need (assembled from the worker parts);
    manifests written before it was recorded have none and mean version 1, which still reads."""
    mpath = cache / "manifest.json"
    m = json.loads(mpath.read_text())
    assert m["codec_version"] == codec.CODEC_VERSION == 3
    del m["codec_version"]
    mpath.write_text(json.dumps(m))
    got = [(s.sample_id, s.topk_ids.tolist()) for s in open_cache(cache)]
    assert got == [(s.sample_id, s.topk_ids.tolist()) for s in open_cache(good_cache)]


def test_cache_from_an_older_writer_without_chunk_hashes_is_read_whole_and_checked(cache, good_cache):
    """Entries without "chunks" (written before per-chunk hashes) are one chunk: the whole shard is
    fetched and checked against its sha256 before any row is used."""
    mpath = cache / "manifest.json"
    m = json.loads(mpath.read_text())
    for entry in m["shards"]:
        del entry["chunks"]
    mpath.write_text(json.dumps(m))
    old = [(s.sample_id, s.topk_ids) for s in open_cache(cache)]
    assert [(s.sample_id, s.topk_ids.tolist()) for s in open_cache(good_cache)] == [(i, t.tolist()) for i, t in old]
    p = first_shard(cache)
    data = bytearray(p.read_bytes())
    data[100] ^= 0xFF
    p.write_bytes(bytes(data))
    refused(cache, r"sha256 mismatch \(corrupted")


def test_merge_workers_into_one_cache(tmp_path, chats_file):
    common = dict(teacher="tiny-mixtral", data=(str(chats_file),), backend="hf", top_k=8, progress=False)
    a, b = tmp_path / "a", tmp_path / "b"
    run(RunConfig(out=str(a), only_domain="math", **common))
    repeated = tmp_path / "repeated.jsonl"  # b's data repeats its first record: b keeps it once
    lines = chats_file.read_text().splitlines(keepends=True)
    repeated.write_text("".join([*lines, lines[0]]))
    run(RunConfig(out=str(b), exclude_domain="math", **{**common, "data": (str(repeated),)}))
    assert open_cache(b).manifest["counts"]["duplicates"] == 1
    with pytest.raises(MergeError, match=r": targets \(kind, k, draws, logprob_error\) differs \(k: 8 vs 4\)$"):
        c = tmp_path / "c"
        run(RunConfig(out=str(c), **{**common, "top_k": 4}))
        merge([str(a), str(c)], str(tmp_path / "bad"))
    done = subprocess.run(
        [*CLI, "merge", str(a), str(b), str(b), "--out", str(tmp_path / "m")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "12 samples" in done.stdout and "(10 duplicate rows dropped)" in done.stdout, done.stdout  # b's own: not
    assert open_cache(tmp_path / "m").manifest["counts"]["duplicates"] == 1 + 1 + 10  # b's twice, and the merge's
    assert "checking: 100%" in done.stderr and "writing: 100%" in done.stderr  # progress over shards
    # a math expert's cache merged with the rest: no single domain, so stage two reads it all as general
    assert f"warning: the merged cache has no single domain ({a} (--only-domain math), {b} (no domain filter)" in (
        done.stderr
    )
    merged = open_cache(tmp_path / "m")
    assert merged.manifest["data"]["only_domain"] is None
    assert merged.manifest["codec_version"] == codec.CODEC_VERSION
    assert sorted(s.sample_id for s in merged) == sorted(s.sample_id for s in [*open_cache(a), *open_cache(b)])
    assert subprocess.run([*CLI, "verify", str(tmp_path / "m")], capture_output=True).returncode == 0


def test_merge_from_another_filesystem_copies_whole_files(tmp_path, good_cache):
    """A source on another device (/dev/shm) cannot be hard-linked: its shards are copied to a spool
    beside the destination and renamed, never written in place under their final names."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no /dev/shm on a filesystem of its own here")
    src = Path(tempfile.mkdtemp(prefix="tc-merge-", dir=shm)) / "cache"
    try:
        shutil.copytree(good_cache, src)
        merge([str(src), str(good_cache)], str(tmp_path / "m"))
    finally:
        shutil.rmtree(src.parent)
    dest = tmp_path / "m"
    assert not [p.name for p in dest.rglob("*") if p.name.endswith(".tmp")]
    shards = sorted(dest.glob("shard-*.arrow"))
    assert shards and all(p.stat().st_nlink == 1 for p in shards)  # copies, not links to the source
    assert [(s.sample_id, s.topk_ids.tolist()) for s in open_cache(dest)] == [
        (s.sample_id, s.topk_ids.tolist()) for s in open_cache(good_cache)
    ]
    assert subprocess.run([*CLI, "verify", str(dest)], capture_output=True).returncode == 0


MERGE_ONTO_A_FULL_DISK = """
"$@" 2> "$OUTSIDE/merge.err"; echo $? > "$OUTSIDE/merge.rc"
cp -a "$DISK/m" "$OUTSIDE/left"
"$@" 2> "$OUTSIDE/again.err"; echo $? > "$OUTSIDE/again.rc"
"""


@pytest.mark.slow
def test_merge_onto_a_full_disk_leaves_no_partial_shard(good_cache, small_disk):
    """A real full device with room for about half the shards: one line, every shard left under its
    name whole, no spool, and a retry names the leftovers."""
    dest = small_disk.disk / "m"
    shards = sorted(good_cache.glob("shard-*.arrow"))
    pages = [-(-p.stat().st_size // 4096) for p in shards]  # tmpfs allocates whole 4 KiB pages
    args = [*CLI, "merge", str(good_cache), str(good_cache), "--out", str(dest), "--no-progress"]
    small_disk.run(MERGE_ONTO_A_FULL_DISK, args, size=4096 * sum(pages[: len(pages) // 2]))
    err = small_disk.read("merge.err")
    assert small_disk.read("merge.rc").strip() == "1" and "Traceback" not in err, err
    *warned, line = err.strip().splitlines()
    assert warned == [
        f"warning: {good_cache} is the same cache as {good_cache} (same manifest): every row of it is a duplicate, "
        "kept once"
    ]
    assert line == (
        f"Error: no space left on the device of {dest}: the merge is unfinished; free space, delete {dest} "
        "and merge again"
    )
    whole = {hashlib.sha256(p.read_bytes()).hexdigest() for p in shards}
    left = sorted((small_disk.outside / "left").iterdir())
    assert left and all(p.name.startswith("shard-") and p.name.endswith(".arrow") for p in left), left
    assert all(hashlib.sha256(p.read_bytes()).hexdigest() in whole for p in left), "a partial shard was left"
    assert "holds an unfinished merge" in small_disk.read("again.err")


def test_merge_keeps_the_first_of_repeats_computed_in_other_batches(tmp_path, chats_file):
    """Caches of overlapping data whose shared samples ran in other batches (other padding, so
    other float rounding) merge: the same input is the same sample, the first row is kept and
    the manifest counts the repeats whose targets differ."""
    common = dict(teacher="tiny-mixtral", backend="hf", top_k=8, progress=False)
    head = tmp_path / "head.jsonl"
    head.write_text("".join(chats_file.read_text().splitlines(keepends=True)[:3]))
    run(RunConfig(out=str(tmp_path / "a"), data=(str(chats_file),), batch_size=12, **common))
    run(RunConfig(out=str(tmp_path / "b"), data=(str(head),), batch_size=1, **common))
    done = subprocess.run(
        [*CLI, "merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    merged = open_cache(tmp_path / "m")
    other = merged.manifest["duplicates_with_other_targets"]
    assert merged.manifest["counts"]["duplicates"] == 3 and 0 <= other <= 3
    assert ("with other target values" in done.stdout) == (other > 0)
    first = {s.sample_id: s.topk_logprobs for s in open_cache(tmp_path / "a")}
    assert all(np.array_equal(s.topk_logprobs, first[s.sample_id]) for s in merged)
    info = summary(str(tmp_path / "m"))  # what `inspect` shows of a merge
    assert info["duplicates"] == 3 and info["merged_from"] == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert info["duplicates_with_other_targets"] == other
    assert "duplicates_with_other_targets" not in summary(str(tmp_path / "a"))
    assert info["data_files"] == [str(chats_file), str(head)] and info["wall_s"] is None
    mpath = tmp_path / "m" / "manifest.json"
    for foreign in (5, ["a"], [{"where": "a"}]):  # its config hash is made of its sources': checked
        mpath.write_text(json.dumps({**json.loads(mpath.read_text()), "merged_from": foreign}))
        with pytest.raises(ManifestError, match="merged_from must list each source's config_hash"):
            summary(str(tmp_path / "m"))


def test_merge_refuses_a_source_row_the_trainer_would_refuse_before_writing(tmp_path, good_cache, cache):
    """A source row with garbage targets was merged (exit 0) and found only by a later verify or
    train of the merged cache, which named the merged shard, not the source's."""
    rewrite_shard(cache, lambda rows: rows[2].update(targets=b"garbage"))
    out = tmp_path / "merged"
    done = subprocess.run(
        [*CLI, "merge", str(good_cache), str(cache), "--out", str(out)], capture_output=True, text=True
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert f"{cache / first_shard(cache).name} row 2: blob truncated" in done.stderr, done.stderr
    assert not out.exists()


def test_merge_refuses_same_id_with_different_content(tmp_path, chats_file):
    other = tmp_path / "other.jsonl"
    rec = json.loads(chats_file.read_text().splitlines()[0])
    rec["messages"][1]["content"] = "Paris, of course."
    other.write_text(json.dumps(rec) + "\n")
    common = dict(teacher="tiny-mixtral", backend="hf", top_k=8, progress=False)
    run(RunConfig(out=str(tmp_path / "a"), data=(str(chats_file),), **common))
    run(RunConfig(out=str(tmp_path / "b"), data=(str(other),), **common))
    done = subprocess.run(
        [*CLI, "merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1, done.stderr
    a, b = (tmp_path / n / "shard-w00000-000000.arrow" for n in "ab")
    assert done.stderr.strip().splitlines()[-1] == (
        f"Error: sample id 'geo-1' is in {a} row 0 and {b} row 0 with different content (tokens, target positions, "
        "domain or source)"
    )


def test_merge_counts_from_the_rows_not_from_fields_no_reader_checks(tmp_path, good_cache):
    """A source manifest's per-shard token and position counts, `truncated` and
    `duplicates_with_other_targets` are recorded, not validated: merge counts tokens and positions
    from the rows it reads anyway, and takes a count that is not one as 0, instead of a traceback
    after the shards were written."""
    a = tmp_path / "a"
    shutil.copytree(good_cache, a)
    m = json.loads((a / "manifest.json").read_text())
    true_tokens = m["counts"]["tokens"]
    del m["shards"][0]["tokens"]
    m["shards"][1]["target_positions"] = 10**9
    m["shards"][1]["truncated"] = None
    m["duplicates_with_other_targets"] = "3"
    (a / "manifest.json").write_text(json.dumps(m))
    merged = merge([str(a), str(good_cache)], str(tmp_path / "m"))
    assert merged["counts"]["tokens"] == true_tokens and merged["duplicates_with_other_targets"] == 0
    done = subprocess.run([*CLI, "verify", str(tmp_path / "m")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_merge_takes_the_longest_max_length_and_an_absent_chat_template(tmp_path, good_cache):
    """The merged manifest's data.max_length bounds every row the reader takes, so it is the
    largest of its sources'; a manifest without tokenizer.chat_template_sha256 (the reader takes
    it) merges instead of a KeyError."""
    a, b = tmp_path / "a", tmp_path / "b"
    for d, longest in ((a, 2048), (b, 4096)):
        shutil.copytree(good_cache, d)
        forge_settings(
            d, lambda m, n=longest: (m["data"].update(max_length=n), m["tokenizer"].pop("chat_template_sha256"))
        )
    merged = merge([str(a), str(b)], str(tmp_path / "m"))
    assert merged["data"]["max_length"] == 4096 and len(list(open_cache(tmp_path / "m"))) == 12


def test_merge_into_a_folder_inside_a_cache_is_refused(tmp_path, good_cache):
    """A merged cache nested in another would trip the outer one's resume ('files that are not a
    cache's') and verify; refused, as train refuses such an --out, before anything is written."""
    shutil.copytree(good_cache, tmp_path / "a")
    with pytest.raises(MergeError, match=r"is inside the teacher cache .*a: use a directory of its own"):
        merge([str(good_cache), str(tmp_path / "a")], str(tmp_path / "a" / "sub"))
    assert not (tmp_path / "a" / "sub").exists()


def test_merge_keeps_a_domain_filter_only_where_every_source_has_it(tmp_path, good_cache):
    """A domain cache (--only-domain) merged with a general one is not a domain cache: the trainer
    would route all its rows as domain samples (the first cache's filter used to be kept)."""
    for name, domain in (("law1", "law"), ("law2", "law"), ("general", None)):
        shutil.copytree(good_cache, tmp_path / name)
        forge_settings(tmp_path / name, lambda m, d=domain: m["data"].update(only_domain=d))
    mixed = merge([str(tmp_path / "law1"), str(tmp_path / "general")], str(tmp_path / "mixed"))
    same = merge([str(tmp_path / "law1"), str(tmp_path / "law2")], str(tmp_path / "same"))
    assert mixed["data"]["only_domain"] is None and same["data"]["only_domain"] == "law"


def test_merge_into_a_killed_merges_leftovers_says_what_they_are(tmp_path, good_cache):
    dest = tmp_path / "m"
    dest.mkdir()
    (dest / "shard-w00000-000000.arrow").write_bytes(b"half")  # a merge killed before its manifest
    with pytest.raises(MergeError, match="holds an unfinished merge .*delete it and merge again"):
        merge([str(good_cache), str(good_cache)], str(dest))
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(MergeError, match="exists and is not empty"):
        merge([str(good_cache), str(good_cache)], str(dest))
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)  # dot-files alone are not a merge's leftovers to delete
    with pytest.raises(MergeError, match="exists and is not empty"):
        merge([str(good_cache), str(good_cache)], str(repo))
    with pytest.raises(MergeError, match="is a file, not a directory for the merged cache"):
        merge([str(good_cache), str(good_cache)], str(dest / "notes.txt"))


def test_reading_a_manifest_allocates_its_size_not_the_limit(good_cache, tmp_path):
    """The read asks for the stated size + 1 byte (a read allocates what it asks for: 256 MiB per
    open_cache before); more bytes than stated (a file being written) are refused, and a device
    file before it is read."""
    import tracemalloc

    from teacher_cache.storage import Location

    tracemalloc.start()
    try:
        open_cache(good_cache)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak} bytes at peak"
    with pytest.raises(ValueError, match="zero: a character device, not a regular file"):
        Location("/dev").read_json("zero", 1 << 20)
    (tmp_path / "m.json").write_text("[" + "1," * 100 + "1]")
    with pytest.raises(ValueError, match=r"implausibly large \(203 bytes\)"):
        Location(tmp_path).read_json("m.json", 100)


def test_a_manifest_nested_too_deeply_or_with_lone_surrogates_is_one_line(cache):
    """json's parser raises RecursionError (neither ValueError nor OSError) on deep nesting, and
    a lone surrogate in a string cannot be printed as UTF-8: neither may become a traceback."""
    manifest = cache / "manifest.json"
    good = json.loads(manifest.read_text())
    good["teacher"]["name"] = "\ud800"  # provenance, not a setting (outside the config hash)
    manifest.write_text(json.dumps(good))  # json.dumps escapes it as \ud800
    shown = subprocess.run([*CLI, "inspect", str(cache)], capture_output=True)
    assert shown.returncode == 0 and b"\\ud800" in shown.stdout, shown.stderr
    manifest.write_text("[" * 100_000 + "]" * 100_000)
    for command in ("inspect", "verify"):
        done = subprocess.run([*CLI, command, str(cache)], capture_output=True, text=True)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.strip().splitlines()[-1].endswith("manifest.json: not valid JSON (nested too deeply)")


def test_a_cache_and_its_samples_behave_as_python_values(good_cache):
    """A notebook's `cache` shows what it is (it was <...Cache object at 0x...>), and comparing two
    samples (numpy fields) raised "The truth value of an array ... is ambiguous": samples compare
    by identity now."""
    cache = open_cache(good_cache)
    assert repr(cache) == f"<Cache {good_cache}: {len(cache)} samples, top-8, {len(cache.shard_names)} shards>"
    first, again = next(iter(cache)), next(iter(cache))
    assert first == first and first != again and len({first, again}) == 2
