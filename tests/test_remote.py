"""Caches on an object store: a real S3 server (moto, its own process) on loopback, reached by s3fs.

Every step goes through the public CLIs with s3:// URLs, as a user sharing caches would:
data on S3 -> two cache workers writing to S3 -> merge with a cache made another day ->
verify -> train from the merged cache over the network.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import pytest

from teacher_cache import open_cache
from teacher_cache.manifest import ManifestError
from teacher_cache.run import RunConfig, run
from teacher_cache.shards import ShardError

TC = [sys.executable, "-m", "teacher_cache.cli"]
ST = [sys.executable, "-m", "student_train.cli"]
RUN = ["run", "--teacher", "tiny-mixtral", "--backend", "hf", "--top-k", "8", "--shard-size", "2", "--no-progress"]


def sh(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=600, **kw)


def ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("Error")]
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.fixture(scope="module")
def s3_data(s3_server, chats_file) -> tuple[str, str]:
    """The test chats split in two files on S3: 'monday' (8 records) and 'tuesday' (4)."""
    fs = fsspec.filesystem("s3")
    lines = chats_file.read_text().splitlines(keepends=True)
    monday, tuesday = f"{s3_server}/data/monday.jsonl", f"{s3_server}/data/tuesday.jsonl"
    fs.pipe_file(monday, "".join(lines[:8]).encode())
    fs.pipe_file(tuesday, "".join(lines[8:]).encode())
    return monday, tuesday


def rows(cache) -> dict[str, tuple]:
    return {s.sample_id: (s.input_ids, s.topk_ids, s.topk_logprobs, s.tail_logprob) for s in cache}


@pytest.mark.slow
def test_two_workers_write_to_s3_then_merge_verify_and_train_over_the_network(s3_server, s3_data, tmp_path):
    monday, tuesday = s3_data
    a, b, merged = (f"{s3_server}/caches/{n}" for n in ("monday", "tuesday", "merged"))
    workers = [
        subprocess.Popen(
            [*TC, *RUN, "--data", monday, "--out", a, "--num-workers", "2", "--worker-index", str(w)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(2)
    ]
    for w in workers:
        _, err = w.communicate(timeout=600)
        assert w.returncode == 0, err[-3000:]
    ok(sh([*TC, *RUN, "--data", tuesday, "--out", b]))

    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(a.removeprefix("s3://")))
    assert "manifest.json" in names and not [n for n in names if n.endswith(".tmp")]
    assert {n[:12] for n in names if n.startswith("shard-")} == {"shard-w00000", "shard-w00001"}

    # what came back over the network is what a local run of the same data computes
    local = tmp_path / "local"
    (tmp_path / "monday.jsonl").write_bytes(fs.cat_file(monday))
    run(RunConfig("tiny-mixtral", (str(tmp_path / "monday.jsonl"),), str(local), backend="hf", top_k=8, progress=False))
    remote_rows, local_rows = rows(open_cache(a)), rows(open_cache(local))
    assert remote_rows.keys() == local_rows.keys() and len(remote_rows) == 8
    for sid, got in remote_rows.items():
        for x, y in zip(got, local_rows[sid], strict=True):
            np.testing.assert_allclose(x, y, rtol=0, atol=0.0401)  # one codec step: batching differs

    ok(sh([*TC, "merge", a, b, "--out", merged]))
    verified = ok(sh([*TC, "verify", merged]))
    assert "ok: 12 samples" in verified.stdout
    info = json.loads(ok(sh([*TC, "inspect", merged, "--json"])).stdout)
    assert info["samples"] == 12 and info["data_files"] == [monday, tuesday] and info["merged_from"] == [a, b]
    assert info["tokenizer_fingerprint"].startswith("sha256:") and info["targets"]["k"] == 8

    run_dir = tmp_path / "run"
    ok(
        sh(
            [
                *ST,
                "train",
                "--student",
                "tiny-mistral",
                "--cache",
                merged,
                "--out",
                str(run_dir),
                "--max-steps",
                "4",
                "--batch-size",
                "3",
                "--num-workers",
                "2",  # forked dataloader workers reconnect to S3 (async clients are not fork-safe)
                "--no-progress",
            ]
        )
    )
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and all(np.isfinite(m["kd"]) for m in metrics)
    lines = (run_dir / "samples.rank0.jsonl").read_text().splitlines()
    seen = {sid for line in lines for sid in json.loads(line)["samples"]}
    assert len(seen) == 12  # 4 steps x 3 samples: every merged sample came over the network


def test_reader_streams_checked_chunks_without_downloading_the_shard_first(s3_server, chats_file):
    """The first sample is decoded before the shard's last chunk is fetched, and only from chunks
    whose sha256 matched: a corrupted last chunk stops the stream there, naming the chunk."""
    out = f"{s3_server}/caches/streamed"
    run(
        RunConfig(
            "tiny-mixtral",
            (str(chats_file),),
            out,
            backend="hf",
            top_k=8,
            attention_layers=(1,),
            attention_top_k=4,
            shard_size=12,
            chunk_bytes=4096,
            progress=False,
        )
    )
    cache = open_cache(out)
    (entry,) = cache.manifest["shards"]
    n_chunks = len(entry["chunks"]["sha256"])
    assert n_chunks >= 4, entry["bytes"]
    clean = next(iter(cache.iter_shard(entry["name"])))

    fs = fsspec.filesystem("s3")
    key = f"{out}/{entry['name']}"
    data = bytearray(fs.cat_file(key))
    data[-10] ^= 0xFF  # inside the last chunk (the footer)
    fs.pipe_file(key, bytes(data))

    stream = open_cache(out).iter_shard(entry["name"])
    first = next(stream)
    assert first.sample_id == clean.sample_id and np.array_equal(first.topk_ids, clean.topk_ids)
    with pytest.raises(ShardError, match=f"sha256 mismatch in chunk {n_chunks - 1} of {n_chunks}"):
        list(stream)
    done = sh([*TC, "verify", out])
    assert done.returncode == 1 and f"sha256 mismatch in chunk {n_chunks - 1}" in done.stderr


def test_unreachable_or_foreign_locations_fail_in_one_line(s3_server, s3_data, chats_file, tmp_path):
    err = one_line_error(sh([*TC, *RUN, "--data", str(chats_file), "--out", "s3://no-such-bucket/cache"]))
    assert "cannot write to s3://no-such-bucket/cache" in err
    err = one_line_error(sh([*TC, "inspect", f"{s3_server}/nothing-here"]))
    assert err.endswith(f"{s3_server}/nothing-here: does not exist"), err
    err = one_line_error(sh([*TC, "inspect", "s3://no-such-bucket/cache"]))
    assert err.endswith("s3://no-such-bucket/cache: does not exist (no bucket s3://no-such-bucket)"), err
    err = one_line_error(sh([*TC, "verify", f"{s3_server}/data"]))  # a folder of other things
    assert err.endswith(f"{s3_server}/data: no manifest.json (not a teacher cache)"), err
    err = one_line_error(sh([*TC, *RUN, "--data", f"{s3_server}/data/missing.jsonl", "--out", str(tmp_path / "c")]))
    assert "missing.jsonl" in err
    assert not Path(tmp_path / "c" / "manifest.json").exists()


@pytest.mark.slow
def test_worker_killed_while_writing_to_s3_resumes_to_the_same_shards(s3_server, s3_data, tmp_path):
    import os
    import signal
    import time

    monday, _ = s3_data
    clean, killed = f"{s3_server}/caches/clean", f"{s3_server}/caches/killed"
    args = [*TC, *RUN, "--shard-size", "1", "--batch-size", "1", "--data", monday]
    ok(sh([*args, "--out", clean]))
    spools = tmp_path / "tmp"
    spools.mkdir()
    proc = subprocess.Popen(
        [*args, "--out", killed],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "TMPDIR": str(spools)},
    )
    fs = fsspec.filesystem("s3")
    part = f"{killed}/parts/worker-00000-of-00001.json"
    deadline = time.time() + 300
    while time.time() < deadline:
        fs.invalidate_cache()
        if fs.exists(part) and len(json.loads(fs.cat_file(part))["shards"]) >= 1:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    fs.invalidate_cache()
    before = len(json.loads(fs.cat_file(part))["shards"])
    assert 1 <= before < 8 and not fs.exists(f"{killed}/manifest.json"), "the kill must land mid-run"
    env = {**os.environ, "TMPDIR": str(spools)}
    resumed = ok(sh([*args, "--out", killed], env=env))
    assert not list(spools.glob(f"*-{proc.pid}-*")), "the killed worker's spool files are swept on resume"
    assert f"resuming: {before} shard{'s' * (before > 1)} already durable" in resumed.stderr
    a, b = open_cache(clean).manifest, open_cache(killed).manifest
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def test_a_json_file_replaced_by_another_process_is_read_whole_and_new(s3_server):
    """A worker's part file is rewritten (one PUT) by its worker while others read it. The read
    takes no size from an earlier listing: s3fs answers size() from its listing cache, and a size
    from before the rewrite made a reader refuse the new, longer file (a flaky two-worker run)."""
    from teacher_cache.storage import Location

    here = Location(f"{s3_server}/race")
    here.write_json("parts/p.json", {"shards": []})
    assert here.glob("parts/*.json") == ["parts/p.json"]  # the listing now sits in s3fs's cache
    longer = {"shards": [f"shard-{i:05d}" for i in range(50)]}
    writer = f"from teacher_cache.storage import Location; Location({here.url!r}).write_json('parts/p.json', {longer})"
    ok(sh([sys.executable, "-c", writer]))
    assert here.read_json("parts/p.json", 1 << 20) == longer
    assert here.size("parts/p.json") == len(fsspec.filesystem("s3").cat_file(here.path("parts/p.json")))
    with pytest.raises(ValueError, match=r"implausibly large \(over 100 bytes\)"):
        here.read_json("parts/p.json", 100)


def test_spools_of_dead_processes_are_swept_and_live_ones_kept(tmp_path):
    from teacher_cache.storage import SPOOL_PREFIX, sweep_spools

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import os

    mine = tmp_path / f"{SPOOL_PREFIX}{os.getpid()}-abc-shard-00000.arrow.tmp"
    parent = tmp_path / f"{SPOOL_PREFIX}{os.getppid()}-abc-shard-00001.arrow.tmp"
    stale = tmp_path / f"{SPOOL_PREFIX}{dead.pid}-abc-shard-00002.arrow.tmp"
    other = tmp_path / "teacher-cache-unrelated.tmp"
    for p in (mine, parent, stale, other):
        p.write_bytes(b"x")
    assert sweep_spools(str(tmp_path)) == [stale]
    assert mine.exists() and parent.exists() and other.exists() and not stale.exists()


def test_an_unreachable_or_credential_less_store_is_one_line(tmp_path):
    """botocore's own errors (not OSError) become one line naming the object; an endpoint that
    refuses connections fails after the client's bounded retries instead of retrying for minutes."""
    import os
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "x",
           "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    for cmd in (["inspect", "s3://bucket/cache"], ["verify", "s3://bucket/cache"]):
        done = subprocess.run([*TC, *cmd], capture_output=True, text=True, env=env, timeout=240)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
        (line,) = done.stderr.strip().splitlines()
        assert line.startswith("Error: s3://bucket/cache/manifest.json: EndpointConnectionError"), line
    # writes too (a network lost mid-run): a StorageError naming the object, not botocore's own
    spool = tmp_path / "spool"
    writes = f"""
from pathlib import Path
from teacher_cache.storage import Location, StorageError
where, spool = Location("s3://bucket/cache"), Path({str(spool)!r})
for write in (lambda: where.write_json("parts/p.json", {{}}), lambda: where.publish(spool, "shard.arrow")):
    spool.write_bytes(b"x")
    try:
        write()
    except StorageError as e:
        print(e)
"""
    done = subprocess.run([sys.executable, "-c", writes], capture_output=True, text=True, env=env, timeout=240)
    said = done.stdout.splitlines()
    assert len(said) == 2, done.stdout + done.stderr[-3000:]
    assert said[0].startswith("s3://bucket/cache/parts/p.json: EndpointConnectionError: "), said
    assert said[1].startswith("s3://bucket/cache/shard.arrow: EndpointConnectionError: "), said


@pytest.mark.slow
def test_a_cache_on_gcs_is_written_verified_merged_and_trained_from(gcs_server, chats_file, tmp_path):
    """gs:// end to end on a real GCS-protocol server: the same CLIs and checks as on S3."""
    cache, merged = f"{gcs_server}/caches/chats", f"{gcs_server}/caches/merged"
    ok(sh([*TC, *RUN, "--data", str(chats_file), "--out", cache]))
    assert "ok: 12 samples" in ok(sh([*TC, "verify", cache, "--no-progress"])).stdout
    local = tmp_path / "local"
    run(RunConfig("tiny-mixtral", (str(chats_file),), str(local), backend="hf", top_k=8, shard_size=2, progress=False))
    remote_rows, local_rows = rows(open_cache(cache)), rows(open_cache(local))
    assert remote_rows.keys() == local_rows.keys() and len(remote_rows) == 12
    for sid, got in remote_rows.items():
        for x, y in zip(got, local_rows[sid], strict=True):
            np.testing.assert_array_equal(x, y)  # same batches, same engine: the same bytes
    ok(sh([*TC, "merge", cache, str(local), "--out", merged, "--no-progress"]))  # a server-side copy and a local one
    assert "ok: 12 samples" in ok(sh([*TC, "verify", merged, "--no-progress"])).stdout
    run_dir = tmp_path / "run"
    ok(sh([*ST, "train", "--student", "tiny-mistral", "--cache", merged, "--out", str(run_dir), "--max-steps", "2",
           "--batch-size", "3", "--no-progress"]))  # fmt: skip
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]

    fs = fsspec.filesystem("gs")
    shard = sorted(p for p in fs.ls(cache.removeprefix("gs://")) if p.rsplit("/", 1)[1].startswith("shard-"))[0]
    data = bytearray(fs.cat_file(shard))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(shard, bytes(data))
    done = sh([*TC, "verify", cache, "--no-progress"])
    assert done.returncode == 1 and "sha256 mismatch" in done.stderr and "Traceback" not in done.stderr
    err = one_line_error(sh([*TC, "inspect", "gs://no-such-bucket/cache"]))
    assert err.endswith("gs://no-such-bucket/cache: does not exist (no bucket gs://no-such-bucket)"), err


def test_a_cache_served_by_a_plain_http_server_is_read_and_a_lost_shard_found_at_open(tmp_path, chats_file):
    """fsspec's http lists files without sizes: the open-time check asks each shard's size instead."""
    import urllib.request

    from tests.conftest import _free_port, _serve

    local = tmp_path / "cache"
    run(RunConfig("tiny-mixtral", (str(chats_file),), str(local), backend="hf", top_k=8, shard_size=5, progress=False))
    port = _free_port()
    cmd = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(tmp_path), str(port)]
    url = f"http://127.0.0.1:{port}/cache"
    server = _serve(cmd, lambda: urllib.request.urlopen(url + "/manifest.json", timeout=1), "http server")
    try:
        assert {n: None for n in open_cache(local).shard_names} == open_cache(url).where.sizes("shard-*.arrow")
        assert rows(open_cache(url)).keys() == rows(open_cache(local)).keys()
        last = local / open_cache(local).shard_names[-1]
        last.write_bytes(last.read_bytes()[:1000])
        with pytest.raises(ShardError, match=f"{last.name}: 1000 bytes stored, manifest says"):
            open_cache(url)
    finally:
        server.kill()
        server.wait()


def test_a_web_server_without_range_support_serves_a_cache_of_many_chunks(tmp_path):
    """python -m http.server answers a byte range with the whole file: the reader keeps that file
    and serves the shard's later chunks from it (each still checked against its sha256), where it
    took the whole file for chunk 0 and failed its checksum."""
    import urllib.request

    from tests.conftest import _free_port, _serve

    data = str(Path(__file__).resolve().parents[1] / "teacher_cache" / "sample_data" / "instructions.jsonl")
    local = tmp_path / "cache"
    run(RunConfig("tiny-mixtral", (data,), str(local), backend="hf", top_k=8, shard_size=60, chunk_bytes=4096,
                  progress=False))  # fmt: skip
    entries = json.loads((local / "manifest.json").read_text())["shards"]
    assert min(len(e["chunks"]["sha256"]) for e in entries) > 5  # several chunks per shard
    port = _free_port()
    cmd = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(tmp_path), str(port)]
    url = f"http://127.0.0.1:{port}/cache"
    server = _serve(cmd, lambda: urllib.request.urlopen(url + "/manifest.json", timeout=1), "http server")
    try:
        expected = rows(open_cache(local))
        got = rows(open_cache(url))
        assert got.keys() == expected.keys()
        assert all(all(np.array_equal(a, b) for a, b in zip(got[k], expected[k], strict=True)) for k in got)
        ok(sh([*TC, "verify", url, "--no-progress"]))
        err = one_line_error(sh([*TC, "merge", str(local), url, "--out", url + "-merged"]))  # it takes no writes
        assert err.startswith(f"Error: cannot write to {url}-merged: "), err
        shard = local / entries[1]["name"]
        damaged = bytearray(shard.read_bytes())
        at = len(damaged) // 2
        damaged[at] ^= 1
        shard.write_bytes(bytes(damaged))
        done = sh([*TC, "verify", url, "--no-progress"])
        assert done.returncode == 1 and f"{shard.name}: sha256 mismatch in chunk {at // 4096} of " in done.stderr
    finally:
        server.kill()
        server.wait()


def test_a_web_server_that_is_down_or_silent_is_named_not_taken_for_a_missing_cache(tmp_path, monkeypatch):
    """fsspec's http says a file does not exist when it cannot reach the server, and aiohttp waits
    5 minutes on a server that accepts and never answers."""
    import socket

    from teacher_cache import storage
    from tests.conftest import _free_port

    down = f"http://127.0.0.1:{_free_port()}/cache"
    err = one_line_error(sh([*TC, "inspect", down]))
    assert err.startswith(f"Error: {down}/manifest.json: the server does not answer (ClientConnectorError"), err
    assert "bucket" not in err
    run_args = ["run", "--teacher", "tiny-mixtral", "--backend", "hf", "--out", str(tmp_path / "c")]
    err = one_line_error(sh([*TC, *run_args, "--data", f"{down}/chats.jsonl"]))  # was "data file not found"
    assert err.startswith(f"Error: {down}/chats.jsonl: the server does not answer (ClientConnectorError"), err
    assert not (tmp_path / "c").exists()

    monkeypatch.setattr(storage, "HTTP_TIMEOUTS", {"sock_connect": 1, "sock_read": 1})
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/cache"
        with pytest.raises(storage.StorageError, match=r"/cache/manifest.json: the server does not answer \("):
            open_cache(url)


NO_SIZE_SERVER = """
import functools, sys
from http.server import HTTPServer, SimpleHTTPRequestHandler

class NoSize(SimpleHTTPRequestHandler):  # shards sent without a Content-Length (HTTP/1.0: until it closes)
    def send_header(self, key, value):
        if key.lower() != "content-length" or not self.path.endswith(".arrow"):
            super().send_header(key, value)

handler = functools.partial(NoSize, directory=sys.argv[1])
HTTPServer(("127.0.0.1", int(sys.argv[2])), handler).serve_forever()
"""


def test_a_web_server_that_gives_no_size_for_a_shard_is_named(tmp_path, chats_file):
    """fsspec's http gives a size of None for a file served without a Content-Length: opening the
    cache failed with "TypeError: int() argument must be ..., not 'NoneType'"."""
    import urllib.request

    from tests.conftest import _free_port, _serve

    local = tmp_path / "cache"
    run(RunConfig("tiny-mixtral", (str(chats_file),), str(local), backend="hf", top_k=8, shard_size=6, progress=False))
    port = _free_port()
    url = f"http://127.0.0.1:{port}/cache"
    cmd = [sys.executable, "-c", NO_SIZE_SERVER, str(tmp_path), str(port)]
    server = _serve(cmd, lambda: urllib.request.urlopen(url + "/manifest.json", timeout=1), "http server")
    try:
        first = open_cache(local).shard_names[0]
        said = f"Error: {url}/{first}: the server does not say its size (no Content-Length)"
        check = [*ST, "check", "--student", "tiny-mistral", "--cache", url]
        for args in ([*TC, "verify", url, "--no-progress"], check):
            assert one_line_error(sh(args)) == said
    finally:
        server.kill()
        server.wait()


FLOOD = 256 << 20  # bytes a flooding server sends after the file


@contextlib.contextmanager
def _web_server(root: Path, misbehave: dict[str, int | str]) -> Iterator[tuple[str, dict[str, int]]]:
    """A real web server on loopback (a thread of this process) serving `root`, except for the paths
    in `misbehave` (which may change while it serves): a status (403, 503, ...) instead of the file;
    "stall": the headers and half the body, then nothing until the server stops; "flood": the file,
    whatever range was asked, then FLOOD bytes more (as much as its Content-Length says). Yields
    its URL and the bytes each flooded path got sent."""
    import functools
    import http.server
    import threading

    stop, sent = threading.Event(), {}

    class Misbehaving(http.server.SimpleHTTPRequestHandler):
        def send_head(self):
            if isinstance(misbehave.get(self.path), int):
                self.send_error(misbehave[self.path])
                return None
            return super().send_head()

        def send_header(self, key: str, value: str) -> None:
            if key == "Content-Length" and self.command == "GET" and misbehave.get(self.path) == "flood":
                value = str(int(value) + FLOOD)
            super().send_header(key, value)

        def copyfile(self, source, outputfile) -> None:
            how, data = misbehave.get(self.path), source.read()
            if how == "stall":
                outputfile.write(data[: len(data) // 2])
                outputfile.flush()
                stop.wait(60)
            elif how == "flood":
                with contextlib.suppress(OSError):  # the client hung up
                    for block in (data, *[b"x" * (1 << 20)] * (FLOOD >> 20)):
                        outputfile.write(block)
                        sent[self.path] = sent.get(self.path, 0) + len(block)
            else:
                outputfile.write(data)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Misbehaving, directory=str(root)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", sent
    finally:
        stop.set()
        server.shutdown()
        server.server_close()


def test_a_web_server_that_refuses_a_folder_or_a_file_is_named_not_taken_for_a_missing_cache(tmp_path, chats_file):
    """nginx and Apache answer a folder's URL with 403 when directory listing is off (their
    default): every cache they served failed to open ("ClientResponseError: 403, message=
    'Forbidden'"). And a 403 (a login) or a 503 (an overloaded server) for the manifest or a shard
    read as "does not exist" / "missing from": a user would rebuild a cache that is there."""
    local = tmp_path / "cache"
    run(RunConfig("tiny-mixtral", (str(chats_file),), str(local), backend="hf", top_k=8, shard_size=6, progress=False))
    first = open_cache(local).shard_names[0]
    answers: dict[str, int | str] = {"/cache": 403, "/cache/": 403}  # no listing, as nginx's default
    with _web_server(tmp_path, answers) as (server, _):
        url = f"{server}/cache"
        assert rows(open_cache(url)).keys() == rows(open_cache(local)).keys()
        for status, name, reason in ((403, "manifest.json", "Forbidden"), (503, first, "Service Unavailable")):
            answers[f"/cache/{name}"] = status
            said = f"Error: {url}/{name}: the server answered {status} ({reason})"
            assert one_line_error(sh([*TC, "verify", url, "--no-progress"])) == said
            del answers[f"/cache/{name}"]
        answers[f"/cache/{first}"] = 503
        assert one_line_error(sh([*ST, "check", "--student", "tiny-mistral", "--cache", url])) == said
        answers[f"/cache/{first}"] = 404  # a shard that is gone is still missing
        with pytest.raises(ShardError, match=f"{first}: listed in the manifest but missing from {url}$"):
            open_cache(url)


def test_a_web_server_that_stops_sending_mid_file_is_named_with_the_timeout(tmp_path, chats_file, monkeypatch):
    """aiohttp's read timeout, raised mid-body, reaches the user as fsspec's FSTimeoutError, which
    has no message: a stalled manifest read said "Error: FSTimeoutError", naming nothing, and a
    stalled shard "read failed (FSTimeoutError)"."""
    from teacher_cache import storage

    local = tmp_path / "cache"
    run(RunConfig("tiny-mixtral", (str(chats_file),), str(local), backend="hf", top_k=8, shard_size=6, progress=False))
    first = open_cache(local).shard_names[0]
    monkeypatch.setattr(storage, "HTTP_TIMEOUTS", {"sock_connect": 1, "sock_read": 1})
    stall: dict[str, int | str] = {"/cache/manifest.json": "stall"}
    with _web_server(tmp_path, stall) as (server, _):
        url = f"{server}/cache"
        why = r"timed out \(SocketTimeoutError: Timeout on reading data from socket\)"
        with pytest.raises(storage.StorageError, match=f"^{url}/manifest.json: {why}$"):
            open_cache(url)
        stall.clear()
        cache = open_cache(url)
        stall[f"/cache/{first}"] = "stall"
        with pytest.raises(storage.StorageError, match=f"^{url}/{first}: read failed \\({why}\\)$"):
            list(cache.iter_shard(first))


def test_a_web_server_that_sends_more_than_asked_is_not_read_past_the_file(tmp_path, chats_file, monkeypatch):
    """The manifest is read with a cap (MAX_MANIFEST_BYTES) asked for as a byte range, and a
    shard chunk by chunk, but fsspec's http keeps all a server sends: one that ignores ranges and
    streams on (a manifest URL serving a multi-GB file) filled the memory before any check."""
    from teacher_cache import cache as cache_module

    local = tmp_path / "cache"
    run(RunConfig("tiny-mixtral", (str(chats_file),), str(local), backend="hf", top_k=8, shard_size=6,
                  chunk_bytes=4096, progress=False))  # fmt: skip
    first = open_cache(local).shard_names[0]
    monkeypatch.setattr(cache_module, "MAX_MANIFEST_BYTES", 1 << 20)
    flood: dict[str, int | str] = {"/cache/manifest.json": "flood"}
    with _web_server(tmp_path, flood) as (server, sent):
        url = f"{server}/cache"
        with pytest.raises(ManifestError, match=rf"^{url}/manifest.json: implausibly large \(over 1048576 bytes\)$"):
            open_cache(url)
        assert sent["/cache/manifest.json"] < 64 << 20  # the rest was not read (kernel buffers aside)
        flood.clear()
        cache = open_cache(url)
        flood[f"/cache/{first}"] = "flood"
        got = [s.sample_id for s in cache.iter_shard(first)]
        assert got == [s.sample_id for s in open_cache(local).iter_shard(first)]
        assert sent[f"/cache/{first}"] < 64 << 20  # two requests: the chunk asked for and the next
