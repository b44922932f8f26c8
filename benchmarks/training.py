"""A minimal classification loop with the ETP term, used by ``make demo``, tests and benchmarks.

It is the loop users already have, with one line added: ``loss = task_loss + pruner.penalty()``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import augment, batches, normalize
from .distributed import shard

__all__ = ["evaluate", "train_steps"]


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500,
             desc: Optional[str] = None) -> float:
    """Top-1 accuracy in percent on ``uint8 [N, 32, 32, 3]`` images."""
    was = model.training
    model.eval()
    correct = 0
    try:
        for idx in tqdm(list(batches(len(labels), batch_size)), desc=desc, disable=desc is None, leave=False):
            correct += int((model(normalize(images[idx])).argmax(1) == labels[idx]).sum())
    finally:
        model.train(was)
    return 100.0 * correct / len(labels)


def train_steps(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int,
                optimizer: torch.optim.Optimizer, pruner=None, batch_size: int = 128, seed: int = 0,
                scheduler=None, desc: Optional[str] = None) -> float:
    """``steps`` SGD steps with random crop/flip; adds ``pruner.penalty()`` when a pruner is given.
    Returns the mean task loss of the last 20 steps."""
    g = torch.Generator().manual_seed(seed)
    model.train()
    it = batches(len(labels), batch_size, g)
    losses = []
    for _ in tqdm(range(steps), desc=desc, disable=desc is None, leave=False):
        idx = next(it)
        x = augment(normalize(images[idx]), g)      # the whole batch: the same draws on every rank
        mine = shard(torch.arange(len(idx)))         # this process's rows (all of them without torchrun)
        task = F.cross_entropy(model(x[mine]), labels[idx][mine])
        loss = task + pruner.penalty() if pruner is not None else task
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(task.item())
    model.eval()
    return sum(losses[-20:]) / len(losses[-20:])
