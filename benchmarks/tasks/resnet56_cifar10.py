"""ResNet-56 (option-A shortcuts) on CIFAR-10 (JPEG), from the pretrained akamaster weights.

SGD lr 0.01, momentum 0.9, weight decay 1e-4, batch 128, random crop + flip; the regularisation
phase at a constant rate, each fine-tune with a cosine schedule. The dense start is the
pretrained model itself (no training). Metric: top-1 on all 10,000 JPEG test images.
"""
from __future__ import annotations

from typing import Dict

import torch

from etp_graph import zoo
from benchmarks.data import load_cifar, normalize
from benchmarks.training import evaluate as top1
from benchmarks.training import train_steps

from .base import Budget, Metric, Task


class _Hooked(torch.optim.SGD):
    """SGD whose ``step`` runs the regulariser hook in its place (train_steps owns the loop)."""

    def __init__(self, params, hook, **kw):
        super().__init__(params, **kw)
        self._hook = hook

    def step(self, closure=None):
        if self._hook is not None:
            self._hook.after_backward()
        out = super().step(closure)
        if self._hook is not None:
            self._hook.after_step(self.param_groups[0]["lr"])
        return out


class CifarTask(Task):
    """Shared by the CIFAR tasks: data, the SGD loop, top-1, the batch-128 latency inputs."""

    metric = Metric("top1", True, "top-1 (%)")
    reg_mode = "grad"
    lr = 0.01

    def load(self) -> None:
        data = self.options.get("data")
        name = self.options.get("dataset", "cifar10")
        self.train_x, self.train_y = load_cifar(data, "train", name=name)
        self.test_x, self.test_y = load_cifar(data, "test", name=name)

    def train(self, model, length, seed, hook=None, phase="finetune"):
        torch.manual_seed(seed)
        opt = _Hooked(model.parameters(), hook, lr=self.lr, momentum=0.9, weight_decay=1e-4)
        # constant rate while regularising (every method alike), cosine for dense and fine-tune
        sched = None if phase == "regularise" else torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(length, 1))
        train_steps(model, self.train_x, self.train_y, length, opt, batch_size=128, seed=seed,
                    scheduler=sched, desc=phase)

    def evaluate(self, model) -> Dict[str, float]:
        return {"top1": top1(model, self.test_x, self.test_y)}

    def example_inputs(self):
        return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def latency_inputs(self):
        return normalize(self.test_x[:128])


class ResNet56(CifarTask):
    name = "resnet56-cifar10"
    speedups = (2.0, 4.0, 8.0)
    budgets = {
        "quick": Budget(dense=0, reg=100, finetune=100, unit="steps (batch 128)",
                        note="the pretrained model is the dense start; about 11.5 min per cell at 2 threads (measured)"),
        "full": Budget(dense=0, reg=39100, finetune=39100, unit="steps (batch 128)",
                       note="100 + 100 epochs, as DepGraph's ResNet-56 recipe (GPU)"),
    }
    # β of make demo; group-sl matched on a 32-unit group: 2·0.1·e^5/32 ≈ 16·0.058
    # etp-unit: β_etp / N of that group (its farthest unit pushed as etp pushes that group's)
    betas = {"etp": 0.1, "etp-paper": 0.1, "torque": 0.1, "group-sl": 0.058, "etp-unit": 0.1 / 32, "etp-steep": 0.1}

    def build(self, seed: int):
        return zoo.create("resnet56_cifar", pretrained=True)

    def heads(self, model):
        return [model.linear]

    def describe(self):
        return {"dataset": "CIFAR-10 JPEG (../shared/data)", "model": "ResNet-56 option A, pretrained (akamaster)",
                "optimizer": "SGD lr 0.01 momentum 0.9 wd 1e-4 batch 128, crop+flip; regularise constant, fine-tune cosine",
                "macs_inputs": "batch of 2", "latency_inputs": "128 test images"}


TASK = ResNet56
