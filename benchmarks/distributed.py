"""The benchmark runner under ``torchrun``: PyTorch's own data-parallel engine, nothing home-made.

    torchrun --standalone --nproc_per_node 2 -m benchmarks.run tiny-cnn --methods etp

Every rank builds the same dense start, trains through ``DistributedDataParallel`` (gradients
all-reduced by DDP; the regulariser's gradient is a function of the weights, which DDP keeps
equal, so every rank adds the same one), takes its share of each batch (:func:`shard`: the
global batch is the single-process batch, so a budget means the same steps on any number of
processes), plans the same cut (``ETPPruner`` prunes rank 0's plan) and evaluates the same
model. Rank 0 writes the caches and the JSON; :func:`agree` checks that the ranks ended with the
same numbers. Without ``torchrun`` (``WORLD_SIZE`` unset or 1) every function is the identity.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["setup", "world_size", "rank", "is_main", "wrap", "fit", "shard", "save_on_main", "agree", "teardown"]


def setup(device: str) -> str:
    """Join the process group ``torchrun`` describes (gloo on CPU, NCCL on CUDA) and return the
    device this rank trains on (``cuda:LOCAL_RANK`` under CUDA)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    cuda = device.startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group("nccl" if cuda else "gloo")
    return device


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def is_main() -> bool:
    return rank() == 0


def wrap(model: nn.Module) -> nn.Module:
    """``model`` inside ``DistributedDataParallel`` for one training phase (its parameters are
    the model's own, so a regulariser built on ``model`` acts on what DDP trains)."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    dev = next(model.parameters()).device
    # unused parameters are possible (a pruned branch, a head a phase does not read)
    return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                   find_unused_parameters=True)


def fit(task, model: nn.Module, length: int, seed: int, hook=None, phase: str = "finetune") -> None:
    """``task.train`` through DDP; afterwards every rank takes rank 0's buffers (BatchNorm's
    running statistics saw only each rank's share of the last batches)."""
    task.train(wrap(model), length, seed=seed, hook=hook, phase=phase)
    if world_size() > 1:
        for b in model.buffers():
            dist.broadcast(b, src=0)


def shard(idx: torch.Tensor) -> torch.Tensor:
    """This rank's part of a batch drawn identically on every rank (rows ``rank::world``)."""
    n = world_size()
    if n == 1:
        return idx
    if len(idx) < n:
        raise ValueError(f"a batch of {len(idx)} cannot be split over {n} processes")
    return idx[rank()::n]


def save_on_main(save: Callable[[Path], None], path: Path) -> None:
    """Rank 0 writes ``path`` (through a temporary file); the others wait until it exists."""
    if is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save(tmp)
        os.replace(tmp, path)
    if world_size() > 1:
        dist.barrier()


def agree(value: Any, what: str) -> None:
    """Raise unless every rank holds the same ``value`` (JSON-like: numbers, strings, lists, dicts)."""
    n = world_size()
    if n == 1:
        return
    got = [None] * n
    dist.all_gather_object(got, value)
    for r, v in enumerate(got):
        if v != got[0]:
            raise RuntimeError(f"rank {r} ended {what} with {v!r}, rank 0 with {got[0]!r}: the ranks diverged")


def teardown() -> None:
    if world_size() > 1:
        dist.destroy_process_group()
