"""The vLLM backend, in two modes.

- `hidden` (default, fast): vLLM's pooling runner returns the final hidden state of
  every token ([T, D], final norm applied); we apply the output projection only at
  the target positions, then log-softmax and top-k, vectorised. vLLM still runs
  the transformer body with its own kernels and batching.
- `prompt_logprobs` (stock, the reference): vLLM's own prompt log-probs with
  `logprobs_mode="raw_logprobs"`, top-k only, every position of the prompt
  (not just the targets); measured on CPU at 0.5-0.95x the hidden mode's speed
  (docs/BENCHMARKS.md).

Entry points that build an LLM must be guarded with `if __name__ == "__main__":`,
since vLLM starts worker processes.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from teacher_cache.backends import EngineFailure, TeacherOutput, project_in_blocks
from teacher_cache.errors import one_line
from teacher_cache.models import LOGIT_TRANSFORMS, ModelRef, check_checkpoint
from teacher_cache.targets import TopKTargets, tail_from_topk
from teacher_cache.tokenize import Tokenized

MODES = ("hidden", "prompt_logprobs")


class VllmBackendError(RuntimeError):
    """vLLM could not be used or returned something unexpected."""


def _local_dir(model: ModelRef) -> Path:
    if model.is_local:
        return Path(model.path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model.path, revision=model.revision, allow_patterns=["*.json", "*.safetensors"]))


def load_output_projection(model_dir: Path) -> torch.Tensor:
    """lm_head weight float32 [V, D] from the checkpoint's safetensors (tied -> embeddings)."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise VllmBackendError(f"{model_dir}: no safetensors files (the hidden mode reads lm_head from them)")
    wanted = ("lm_head.weight", "model.embed_tokens.weight")
    for name in wanted:
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                if name in st.keys():  # noqa: SIM118 (safe_open has no __contains__)
                    return st.get_tensor(name).float()  # float32 [V, D], whatever the checkpoint dtype
    raise VllmBackendError(f"{model_dir}: none of {wanted} found in the checkpoint")


def _core_groups(cores: list[int], ranks: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `ranks` CPU workers: the cores split into that many
    contiguous groups, "0,1|2,3" (vLLM wants one group per rank)."""
    if ranks > len(cores):
        raise VllmBackendError(
            f"--tensor-parallel-size {ranks} needs {ranks} CPU cores; this process may use {len(cores)}"
        )
    groups = np.array_split(np.asarray(cores), ranks)
    return "|".join(",".join(map(str, g.tolist())) for g in groups)


@contextlib.contextmanager
def in_process_engines() -> Iterator[None]:
    """vLLM engines built inside this block run in the calling process when on CPU (unless the
    user set VLLM_ENABLE_V1_MULTIPROCESSING). As a process of its own, vLLM's CPU worker
    busy-waits on its shared-memory queue for 1 s after every request (vLLM 0.32's
    shm_broadcast.SpinCondition), taking a core from the projection, top-k and codec that follow
    each batch here; in this process there is no worker to spin and no IPC (docs/BENCHMARKS.md,
    "The engine's spin"). Only for a process that holds no other vLLM engine while this one lives:
    vLLM keeps its distributed state per process, and an in-process engine's shutdown tears it
    down (a second engine in the process would fail at its next step). Set only while the block
    runs (vLLM reads it while building the engine): processes started later do not inherit it."""
    added = (
        {}
        if torch.cuda.is_available() or "VLLM_ENABLE_V1_MULTIPROCESSING" in os.environ
        else {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    )
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _watch_engine(llm, closed: threading.Event) -> None:
    """Wake a caller that vLLM's sync client would leave waiting forever: when its engine process
    dies mid-request (kill -9, the OOM killer), the client's monitor thread marks the engine dead
    and stops the output thread without queueing an error, so `get_output` blocks on an empty
    queue (seen under load; when the death is seen between requests vLLM raises by itself). This
    queues the EngineDeadError it would have raised. Reaches into vLLM's client (0.32's
    `engine_core.resources` / `outputs_queue`); a client without them is not watched."""
    client = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    resources, outputs = getattr(client, "resources", None), getattr(client, "outputs_queue", None)
    if resources is None or not hasattr(outputs, "put_nowait"):
        return
    from vllm.v1.engine.exceptions import EngineDeadError

    def watch() -> None:
        while not closed.wait(0.5):
            if getattr(resources, "engine_dead", False):
                outputs.put_nowait(EngineDeadError())
                return

    threading.Thread(target=watch, name="teacher-cache-engine-watch", daemon=True).start()


class VllmBackend:
    """The teacher under vLLM: `hidden` mode (final hidden states; our fp32 projection at the target
    positions) or `prompt_logprobs` (vLLM's stock top-k, the reference path)."""

    name = "vllm"

    def __init__(
        self,
        model: ModelRef,
        *,
        mode: str = "hidden",
        top_k: int = 32,
        max_model_len: int = 4096,
        seed: int = 0,
        gpu_memory_utilization: float = 0.85,
        trust_remote_code: bool = False,
        device: str | None = None,
        tensor_parallel_size: int = 1,
        in_process: bool = False,
        progress: bool = True,
    ) -> None:
        """`in_process`: on CPU with one rank, run the engine in this process (faster; see
        `in_process_engines` for when that is safe). `progress`: vLLM's weight-loading bars."""
        if mode not in MODES:
            raise VllmBackendError(f"unknown vllm mode {mode!r}; choose from {', '.join(MODES)}")
        if model.is_local:
            check_checkpoint(model.path, trust_remote_code)  # vLLM itself loads one that lacks a tensor
        tp = tensor_parallel_size
        if torch.cuda.is_available():
            if tp > torch.cuda.device_count():
                raise VllmBackendError(
                    f"--tensor-parallel-size {tp} needs {tp} GPUs; {torch.cuda.device_count()} are visible here"
                )
        else:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; vLLM's CPU default is far larger
            # vLLM's CPU worker leaves a core to the caller by default; the caller waits on it, so give
            # it every core this process may use (2.05x prefill on a 2-core machine, BENCHMARKS.md),
            # split into one group per tensor-parallel rank ("0,1|2,3")
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", _core_groups(sorted(os.sched_getaffinity(0)), tp))
            # its CPU warnings (eager mode, no tcmalloc/triton, the seed of an in-process engine, thread
            # binding) are about choices made here, a dozen lines a user cannot act on
            os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its INFO lines would bury our progress bar
        # one warning comes before vLLM's logging is set up (this process's; an engine process of its
        # own, VLLM_ENABLE_V1_MULTIPROCESSING=1 or several ranks, still prints it)
        if os.environ["VLLM_LOGGING_LEVEL"].upper() == "ERROR":
            logging.getLogger("vllm.triton_utils.importing").setLevel(logging.ERROR)
        # torch deprecations that vLLM's own code triggers: nothing a user of this tool can act on
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.")
        from vllm import LLM

        self.ref, self.mode, self.top_k, self.tensor_parallel_size = model, mode, top_k, tp
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        local = _local_dir(model)
        config = json.loads((local / "config.json").read_text())
        self.teacher_config: dict = config  # of the files the engine loads (a hub teacher's, once downloaded)
        common = dict(
            model=str(local),
            dtype=model.dtype,
            max_model_len=max_model_len,
            seed=seed,
            trust_remote_code=trust_remote_code,
            enforce_eager=self.device.type == "cpu",
            enable_prefix_caching=False,
            tensor_parallel_size=tp,
            use_tqdm_on_load=progress,
        )
        if torch.cuda.is_available():
            common["gpu_memory_utilization"] = gpu_memory_utilization
        if mode == "hidden":
            bad = [k for k in LOGIT_TRANSFORMS if config.get(k) not in (None, 1, 1.0)]
            if bad:
                raise VllmBackendError(
                    f"{model.name}: logits are transformed ({', '.join(bad)}); use --vllm-mode prompt_logprobs"
                )
            from vllm.config import PoolerConfig

            kind = dict(
                runner="pooling",
                convert="embed",
                pooler_config=PoolerConfig(task="token_embed", tok_pooling_type="ALL", use_activation=False),
                max_num_batched_tokens=max(max_model_len, 8192),
            )
        else:
            kind = dict(max_logprobs=top_k, logprobs_mode="raw_logprobs")
        alone = in_process and tp == 1  # more ranks need worker processes
        with in_process_engines() if alone else contextlib.nullcontext():
            self.llm = LLM(**kind, **common)
        self.weight = load_output_projection(local).to(self.device) if mode == "hidden" else None  # float32 [V, D]
        self._closed = threading.Event()
        _watch_engine(self.llm, self._closed)

    def describe(self) -> dict:
        import transformers
        import vllm

        return {
            "backend": self.name,
            "mode": self.mode,
            "dtype": self.ref.dtype,
            "device": self.device.type,
            "vllm": vllm.__version__,
            "transformers": transformers.__version__,
            "tensor_parallel_size": self.tensor_parallel_size,
            "torch": torch.__version__,
            "projection": "ours, fp32, target positions only" if self.mode == "hidden" else "vllm",
        }

    def forward(self, batch: list[Tokenized]) -> Iterator[TeacherOutput]:
        from vllm.exceptions import VLLMError

        try:
            yield from self._forward(batch)
        except VLLMError as e:  # one line, not vLLM's traceback
            dead = type(e).__name__ == "EngineDeadError"  # its process died (OOM-killed, say)
            why = "its process died" if dead else one_line(e, 200)  # (its own message points at a trace we hide)
            raise EngineFailure(f"the vLLM engine failed ({type(e).__name__}: {why})") from None

    def _forward(self, batch: list[Tokenized]) -> Iterator[TeacherOutput]:
        prompts = [{"prompt_token_ids": s.input_ids.tolist()} for s in batch]
        if self.mode == "hidden":
            outputs = self.llm.encode(prompts, pooling_task="token_embed", use_tqdm=False)
            rows = [  # float32 [P, D] per sample: the final hidden states [T, D] at its target positions
                out.outputs.data[torch.from_numpy(s.target_positions)].to(self.device, torch.float32)
                for s, out in zip(batch, outputs, strict=True)
            ]
            for logits in project_in_blocks(rows, self.weight):  # float32 [P, V] per sample
                yield TeacherOutput(logits=logits, topk=None, attention=None)
        else:
            from vllm import SamplingParams

            params = SamplingParams(max_tokens=1, prompt_logprobs=self.top_k, flat_logprobs=True, detokenize=False)
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
            for s, out in zip(batch, outputs, strict=True):
                yield TeacherOutput(logits=None, topk=self._topk_from_flat(s, out.prompt_logprobs), attention=None)

    def _topk_from_flat(self, sample: Tokenized, flat) -> TopKTargets:
        """vLLM's flat prompt log-probs -> top-k at the target positions.

        Entry i of the prompt log-probs scores token i given tokens < i, so target
        position t (predicting token t + 1) reads entry t + 1. Each entry holds the
        top-k by rank plus the actual token when it ranks below k.
        """
        k = self.top_k
        starts = np.asarray(flat.start_indices, dtype=np.int64)  # int64 [T]; entry e is [starts[e], end_indices[e])
        ids_all = np.asarray(flat.token_ids, dtype=np.int64)  # int64 [E], E entries over all positions
        lps_all = np.asarray(flat.logprobs, dtype=np.float32)  # float32 [E]
        ranks_all = np.asarray([r if r is not None else 1 << 30 for r in flat.ranks], dtype=np.int64)  # int64 [E]
        entry = sample.target_positions + 1  # int64 [P]
        P = len(entry)
        ids = np.empty((P, k), dtype=np.int64)
        lps = np.empty((P, k), dtype=np.float32)
        for j, e in enumerate(entry):  # reference path: correctness over speed
            lo, hi = starts[e], flat.end_indices[e]
            r = ranks_all[lo:hi]
            keep = np.flatnonzero(r <= k)
            order = keep[np.argsort(r[keep], kind="stable")]
            _, first = np.unique(ids_all[lo:hi][order], return_index=True)
            order = order[np.sort(first)][:k]
            if len(order) != k:
                raise VllmBackendError(f"vLLM returned {len(order)} ranked log-probs at a position, expected {k}")
            ids[j], lps[j] = ids_all[lo:hi][order], lps_all[lo:hi][order]
        tail = tail_from_topk(torch.from_numpy(lps)).numpy()  # float32 [P]
        return TopKTargets(ids=ids, logprobs=lps, tail_logprob=tail)

    def close(self) -> None:
        self._closed.set()
        del self.llm
        # an engine in this process gc.freeze()s the heap when it starts (vLLM's start-up, meant for a
        # process of its own): its reference cycles, the model's included, are freed only after this
        gc.unfreeze()
        gc.collect()
