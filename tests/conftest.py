"""Shared fixtures: tiny real models (real tokenizer), one vLLM engine per mode per session."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = Path(__file__).parent / "data"
TEST_K = 16  # top-k used by the vLLM fixtures (the stock path fixes k when the engine is built)


SUITE_DISK_NEED = 3 << 30  # free temp disk the suite asks for; its measured peak is 1.7 GB


def pytest_report_header(config: pytest.Config) -> str | None:
    """Say up front when the temporary folder's disk is too full for the suite: every failure it
    would cause later reads as a product bug ("no space left on the device")."""
    tmp = config.option.basetemp or os.environ.get("TMPDIR") or "/tmp"
    free = shutil.disk_usage(tmp if os.path.isdir(tmp) else "/").free
    if free < SUITE_DISK_NEED:
        need = SUITE_DISK_NEED / 2**30
        return f"WARNING: {free / 2**30:.1f} GiB free under {tmp}; the suite needs about {need:.0f} GiB"
    return None


@pytest.fixture(scope="session")
def chats_file() -> Path:
    return DATA / "chats.jsonl"


@pytest.fixture(scope="session")
def tiny_teacher():
    from teacher_cache.models import resolve_model

    return resolve_model("tiny-mixtral")


@pytest.fixture(scope="session")
def tiny_student():
    from teacher_cache.models import resolve_model

    return resolve_model("tiny-mistral")


@pytest.fixture(scope="session")
def teacher_tok(tiny_teacher):
    from teacher_cache.tokenize import load_tokenizer

    return load_tokenizer(tiny_teacher.path)


@pytest.fixture(scope="session")
def chats_tokenized(teacher_tok, chats_file):
    from teacher_cache.records import iter_records
    from teacher_cache.tokenize import tokenize_record

    return [tokenize_record(teacher_tok, r, 512) for r in iter_records([str(chats_file)], skip_bad=False)]


@pytest.fixture(scope="session")
def vllm_hidden(tiny_teacher):
    """vLLM hidden-state engine on tiny-mixtral, started once per session."""
    from teacher_cache.backends.vllm_backend import VllmBackend

    backend = VllmBackend(tiny_teacher, mode="hidden", top_k=TEST_K, max_model_len=512)
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def vllm_stock(tiny_teacher):
    """vLLM stock prompt-logprobs engine on tiny-mixtral, started once per session."""
    from teacher_cache.backends.vllm_backend import VllmBackend

    backend = VllmBackend(tiny_teacher, mode="prompt_logprobs", top_k=TEST_K, max_model_len=512)
    yield backend
    backend.close()


@pytest.fixture
def data_copy(tmp_path, chats_file) -> Path:
    dst = tmp_path / "chats.jsonl"
    shutil.copy(chats_file, dst)
    return dst


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(cmd: list[str], ready, what: str) -> subprocess.Popen:
    """Start a server process; return once ready() stops raising OSError (60 s at most)."""
    import time

    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while True:
        try:
            ready()
            return server
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                raise RuntimeError(f"the {what} did not start") from None
            time.sleep(0.2)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto) as a separate process on loopback, and a bucket on it.

    The environment points every S3 client (s3fs in this process and in the CLI
    processes the tests start) at it, the way a user points them at their own endpoint.
    """
    import sys
    import urllib.request

    import fsspec

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    server = _serve(cmd, lambda: urllib.request.urlopen(endpoint + "/moto-api/", timeout=1), "moto S3 server")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.setenv("AWS_ACCESS_KEY_ID", "teacher-cache-tests")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "teacher-cache-tests")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        fsspec.filesystem("s3").mkdir("tc-tests")
        yield "s3://tc-tests"
    server.kill()
    server.wait()


@pytest.fixture(scope="session")
def gcs_server():
    """A real GCS-protocol server (gcp-storage-emulator, its own process) on loopback, and a bucket.

    gcsfs reaches it through STORAGE_EMULATOR_HOST, and fsspec's FSSPEC_GS_* variables give every
    gs:// filesystem (here and in the CLI processes) anonymous access, as a user would configure it.
    gcsfs's probe for hierarchical-namespace buckets (gRPC, which the emulator does not speak) is off.
    """
    import socket
    import sys

    import fsspec

    port = _free_port()
    cmd = [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port", str(port)]
    server = _serve(
        [*cmd, "--in-memory"], lambda: socket.create_connection(("127.0.0.1", port), 1).close(), "GCS emulator"
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
        mp.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        mp.setenv("FSSPEC_GS_TOKEN", "anon")
        mp.setenv("FSSPEC_GS_PROJECT", "teacher-cache-tests")
        mp.setitem(fsspec.config.conf, "gs", {"token": "anon", "project": "teacher-cache-tests"})
        fsspec.filesystem("gs").mkdir("tc-tests")
        yield "gs://tc-tests"
    server.kill()
    server.wait()


class SmallDisk:
    """A real device that fills up: a tmpfs mounted at `disk` inside a private user + mount
    namespace (`unshare -rm`, no root needed). The mount lives as long as one bash script, so each
    test runs its commands in `run` and leaves what it wants to check in `outside`."""

    def __init__(self, root: Path) -> None:
        self.disk, self.outside = root / "disk", root / "outside"
        self.disk.mkdir()
        self.outside.mkdir()

    def run(self, script: str, args: list[str], size: int | str) -> None:
        """Mount a tmpfs of `size` bytes (or "4m") at $DISK, then run `script` with "$@" = args."""
        mount = f'set -u\nmount -t tmpfs -o size={size} tmpfs "$DISK" || exit 97\n'
        env = {**os.environ, "DISK": str(self.disk), "OUTSIDE": str(self.outside)}
        done = subprocess.run(["unshare", "-rm", "bash", "-c", mount + script, "-", *args], env=env, timeout=600)
        assert done.returncode == 0, f"the namespace script failed ({done.returncode})"

    def read(self, name: str) -> str:
        return (self.outside / name).read_text()


@pytest.fixture
def small_disk(tmp_path) -> SmallDisk:
    """Skips where mounting a tmpfs in a user + mount namespace is not permitted."""
    disk = SmallDisk(tmp_path)
    probe = ["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk.disk)]
    if subprocess.run(probe, capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs in a user + mount namespace (unshare -rm) is not permitted here")
    return disk
