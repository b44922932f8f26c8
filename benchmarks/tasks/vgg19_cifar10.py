"""VGG-19-BN for 32×32 inputs (DepGraph's CIFAR VGG: 16 conv layers with BN, one Linear head) on
CIFAR-10 (JPEG), or CIFAR-100 with ``--option dataset=cifar100`` where the user has torchvision's
``cifar-100-python`` folder (``--option data=/path``).

No pretrained weights exist offline, so the dense start is trained here from scratch (its own
budget, cached per seed outside the repository) with SGD lr 0.05, momentum 0.9, wd 5e-4, cosine.
"""
from __future__ import annotations

from torch import nn

from .base import Budget
from .resnet56_cifar10 import CifarTask

_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512)


class VGG19BN(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        layers, width = [], 3
        for v in _CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(width, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                width = v
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class VGG19(CifarTask):
    name = "vgg19-cifar10"
    speedups = (2.0, 4.0, 8.0)
    budgets = {
        "quick": Budget(dense=400, reg=40, finetune=30, unit="steps (batch 128)",
                        note="dense start 400 steps (about one epoch) from scratch, top-1 on 2,000 test "
                             "images spread evenly over the 10,000 (every fifth: 200 per class): a training step of VGG-19-BN takes 4.5 s on 2 CPU "
                             "cores (measured), so this is what fits in an hour; the comparison "
                             "that matters is the full budget, on a GPU"),
        "full": Budget(dense=78200, reg=39100, finetune=39100, unit="steps (batch 128)",
                       note="200 epochs dense, 100 + 100 (DepGraph's VGG recipe, GPU)"),
    }
    #: test images scored per budget (all 10,000 unless listed)
    eval_images = {"quick": 2000}
    betas = {"etp": 0.1, "etp-paper": 0.1, "torque": 0.1, "group-sl": 0.02, "etp-unit": 0.1 / 256, "etp-steep": 0.1}

    def build(self, seed: int):
        import torch
        torch.manual_seed(seed)
        return VGG19BN(100 if self.options.get("dataset") == "cifar100" else 10)

    def train(self, model, length, seed, hook=None, phase="finetune"):
        if phase == "dense":
            self.lr = 0.05
        try:
            super().train(model, length, seed, hook, phase)
        finally:
            self.lr = 0.01

    def evaluate(self, model):
        from benchmarks.training import evaluate as top1
        idx = self.eval_index()
        return {"top1": top1(model, self.test_x[idx], self.test_y[idx])}

    def eval_index(self):
        """The test images scored: all, or ``eval_images`` spread evenly over the test set (it is
        stored class by class, so its first 2,000 images would be two classes only)."""
        import torch
        n, total = self.eval_images.get(self.budget_name, len(self.test_x)), len(self.test_x)
        return torch.linspace(0, total - 1, n).round().long() if n < total else torch.arange(total)

    def heads(self, model):
        return [model.classifier]

    def describe(self):
        return {"dataset": self.options.get("dataset", "cifar10"), "model": "VGG-19-BN (CIFAR, 16 conv + 1 Linear)",
                "dense": "from scratch, SGD lr 0.05 cosine",
                "test_images": self.eval_images.get(self.budget_name, 10000), "optimizer": "SGD lr 0.01 momentum 0.9 batch 128",
                "latency_inputs": "128 test images"}


TASK = VGG19
