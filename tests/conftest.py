"""Shared fixtures: tiny real models (real tokenizer), one vLLM engine per mode per session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = Path(__file__).parent / "data"
TEST_K = 16  # top-k used by the vLLM fixtures (the stock path fixes k when the engine is built)


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
