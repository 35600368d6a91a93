"""Training across torchrun's processes: the process group, per-rank metrics, FSDP2 helpers.
One process (WORLD_SIZE unset or 1) never touches torch.distributed."""

from __future__ import annotations

import os

import torch
from torch import nn

from student_train.config import TrainError


def start() -> tuple[int, int, bool]:
    """-> (rank, world size, whether this call started the process group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    started = world > 1 and not torch.distributed.is_initialized()
    if started:
        if torch.cuda.is_available():  # before NCCL and FSDP look at the current device (else GPU 0 for all)
            gpu, visible = local_gpu(int(os.environ.get("RANK", "0"))), torch.cuda.device_count()
            if gpu >= visible:  # CUDA's own word for it is "invalid device ordinal"
                raise TrainError(
                    f"this process is local rank {gpu} and {visible} GPU{'s are' if visible > 1 else ' is'} visible: "
                    f"start at most {visible} per node (torchrun --nproc-per-node {visible}), "
                    "or hide the GPUs (CUDA_VISIBLE_DEVICES=) to train on the CPU"
                )
            torch.cuda.set_device(gpu)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return (torch.distributed.get_rank() if world > 1 else 0), world, started


def local_gpu(rank: int) -> int:
    """This process's GPU: torchrun's LOCAL_RANK (one process per GPU on each node)."""
    return int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))


METRICS = ("loss", "ce", "kd", "kd_domain", "kd_general", "attn")  # what DistillStep reports


def across_ranks(
    sums: dict[str, float], counts: dict[str, int], tokens: int, device: torch.device
) -> tuple[dict[str, float], dict[str, int], int]:
    """One rank's metric sums, micro-batch counts and tokens -> those of every rank (one all-reduce)."""
    if unknown := sums.keys() - set(METRICS):
        raise RuntimeError(f"metrics {sorted(unknown)} missing from train.METRICS")
    # float64 [2, M + 1]: row 0 the sums then the tokens, row 1 the counts
    t = torch.tensor(
        [[sums.get(k, 0.0) for k in METRICS] + [float(tokens)], [float(counts.get(k, 0)) for k in METRICS] + [0.0]],
        dtype=torch.float64,
        device=device,
    )
    torch.distributed.all_reduce(t)
    held = [(i, k) for i, k in enumerate(METRICS) if t[1, i] > 0]
    return {k: float(t[0, i]) for i, k in held}, {k: int(t[1, i]) for i, k in held}, int(t[0, -1])


def fully_shard(model: nn.Module, root: nn.Module) -> None:
    """FSDP2 in place: one shard group per decoder layer (model.model.layers), the rest
    (embeddings, final norm, output head) in the group of `root`, the DistillStep whose forward
    calls the decoder and reads the head's weight directly; both need to be gathered there."""
    from torch.distributed.fsdp import fully_shard

    for layer in getattr(getattr(model, "model", None), "layers", []):
        fully_shard(layer)
    fully_shard(root)


def full_state(model: nn.Module, *, rank0_cpu: bool = False) -> dict[str, torch.Tensor]:
    """Every rank calls: the unsharded state dict (rank0_cpu: only rank 0 gets it, on CPU)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=rank0_cpu))
