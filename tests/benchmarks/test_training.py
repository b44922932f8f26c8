"""ETP in a real loop on real data: a small CNN on CIFAR-10 (JPEG, ../shared/data).

A few hundred steps with ``loss = task + pruner.penalty()`` must drive the far units' coupled
norms down by orders of magnitude while accuracy stays close to plain training; ``threshold``
pruning then removes those units with the accuracy unchanged.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import etp_graph as eg
from benchmarks.data import load_cifar
from benchmarks.training import evaluate, train_steps

try:
    TRAIN = load_cifar(split="train", limit=20000)
    TEST = load_cifar(split="test", limit=2000)
except FileNotFoundError:   # pragma: no cover - data beside the checkout is part of CI
    TRAIN = TEST = None

pytestmark = pytest.mark.skipif(TRAIN is None, reason="CIFAR-10 not in ../shared/data")


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.c3, self.b3 = nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.b1(self.c1(x))), 2)
        x = F.max_pool2d(F.relu(self.b2(self.c2(x))), 2)
        return self.fc(F.relu(self.b3(self.c3(x))).mean((2, 3)))


STEPS = 400


def _train(pruner_beta):
    torch.manual_seed(0)
    model = SmallCNN()
    pruner = None
    if pruner_beta:
        pruner = eg.ETPPruner(model, torch.randn(1, 3, 32, 32), ignored_layers=[model.fc],
                              config=eg.ETPConfig(beta=pruner_beta, c=5.0, pivot=0), threshold=1e-3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train_steps(model, *TRAIN, STEPS, opt, pruner=pruner, batch_size=64, seed=0)
    return model, pruner


def test_etp_training_drives_far_units_to_zero_and_threshold_pruning_keeps_accuracy():
    plain, _ = _train(0.0)
    acc_plain = evaluate(plain, *TEST)
    model, pruner = _train(0.02)
    acc_etp = evaluate(model, *TEST)
    assert acc_plain > 30                                   # it learned (10 classes: chance is 10 %)
    assert acc_etp > acc_plain - 6                          # ETP costs little accuracy
    for g in pruner.graph.groups:
        rel = (pruner.importance(g) / pruner.importance(g).max()).detach()
        n = g.size
        near, far = rel[: n // 4], rel[-(n // 4):]
        assert far.max() < 1e-3 * near.max(), (g.root, rel)     # orders of magnitude apart
    macs = eg.count_macs(model, torch.randn(1, 3, 32, 32))
    report = pruner.step()
    assert sum(g.units_before - g.units_after for g in report.groups) >= sum(g.size // 4 for g in pruner.graph.groups)
    assert report.macs_after < macs
    assert abs(evaluate(model, *TEST) - acc_etp) <= 0.5    # removing the zeroed units changes nothing
