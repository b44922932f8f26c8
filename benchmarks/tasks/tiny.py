"""A seconds-long task on synthetic data for the runner's smoke test (no data files needed).

A small residual conv net learns the labels of a fixed random linear teacher (on the images'
2×2-pooled pixels) for 256 random 8×8 images.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.distributed import shard

from .base import Budget, Metric, Task, sgd_step


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        h = F.relu(self.b1(self.c1(x)))
        h = F.relu(h + self.b2(self.c2(h)))
        return self.fc(h.mean((2, 3)))


class TinyCNN(Task):
    name = "tiny-cnn"
    metric = Metric("acc", True, "accuracy (%)")
    speedups = (1.5, 2.0)
    budgets = {"quick": Budget(dense=20, reg=10, finetune=5, note="seconds")}
    reg_mode = "grad"
    betas = {"etp": 0.05, "etp-paper": 0.05, "torque": 0.05, "group-sl": 0.01, "etp-unit": 0.05 / 16, "etp-steep": 0.05}

    def load(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(256, 3, 8, 8, generator=g)
        teacher = torch.randn(3 * 4 * 4, 4, generator=g)
        self.y = (F.avg_pool2d(self.x, 2).flatten(1) @ teacher).argmax(1)

    def build(self, seed: int):
        torch.manual_seed(seed)
        return _Net()

    def train(self, model, length, seed, hook=None, phase="finetune"):
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        model.train()
        for _ in range(length):
            idx = shard(torch.randint(0, len(self.y), (64,), generator=g))   # this process's rows
            sgd_step(model, F.cross_entropy(model(self.x[idx]), self.y[idx]), opt, hook)
        model.eval()

    @torch.no_grad()
    def evaluate(self, model) -> Dict[str, float]:
        model.eval()
        return {"acc": 100.0 * float((model(self.x).argmax(1) == self.y).float().mean())}

    def example_inputs(self):
        return self.x[:2]

    def latency_inputs(self):
        return self.x[:64]

    def heads(self, model):
        return [model.fc]


TASK = TinyCNN
