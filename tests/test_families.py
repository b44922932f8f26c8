"""Architectures the zoo does not contain, traced and pruned through the public contract only.

Each model mixes several families (concat skips, flatten → Linear, grouped/depthwise convs with
GroupNorm, circular padding with an RNN, channel shuffles, GLU chunks on 2-, 3- and 4-D tensors,
channel-last blocks). Every group must prune with masked == pruned outputs and only the listed
refusals are allowed.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import etp_graph as eg
from etp_graph.testing import assert_prune_equivalent


class UNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.e1, self.e2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.d, self.bn, self.out = nn.Conv2d(16, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        a = F.relu(self.e1(x))
        u = self.up(F.relu(self.e2(a)))
        return self.out(F.relu(self.bn(self.d(torch.cat([u, a], 1)))))


class VGGish(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                               nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2))
        self.c = nn.Sequential(nn.Linear(16 * 2 * 2, 32), nn.ReLU(), nn.Dropout(), nn.Linear(32, 10))

    def forward(self, x):
        return self.c(torch.flatten(self.f(x), 1))


class GroupedBottleneck(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.a = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 4, 1)
        self.b, self.c = nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.Conv2d(4, 16, 1)
        self.sc, self.gn, self.head = nn.Conv2d(16, 16, 1), nn.GroupNorm(4, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = F.relu(self.stem(x))
        y = self.c(F.relu(self.b(F.relu(self.a(h)))))
        return self.head(self.gn(F.relu(y + self.sc(h))).mean((2, 3)))


class CircularTCN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 3, padding=2, dilation=2, padding_mode="circular")
        self.c2 = nn.Conv1d(8, 8, 3, padding=1)
        self.lstm, self.fc = nn.LSTM(8, 6, batch_first=True, bidirectional=True), nn.Linear(12, 2)

    def forward(self, x):
        h = F.relu(self.c2(F.relu(self.c1(x)))) + self.c1(x)
        y, _ = self.lstm(h.transpose(1, 2))
        return self.fc(y[:, -1])


class ShuffleUnit(nn.Module):
    """Grouped 1x1 → channel shuffle (3 groups) → depthwise 3x3 → 1x1, residual.

    (With a grouped 1x1 after the shuffle too, as in ShuffleNet v1, no proper subset of the
    channels can be removed: the shuffle and both groupings together couple every channel.)"""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.g1, self.bn1 = nn.Conv2d(12, 12, 1, groups=3), nn.BatchNorm2d(12)
        self.dw, self.bn2 = nn.Conv2d(12, 12, 3, padding=1, groups=12), nn.BatchNorm2d(12)
        self.g2, self.bn3 = nn.Conv2d(12, 12, 1), nn.BatchNorm2d(12)
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = F.relu(self.bn1(self.g1(x)))
        n, c, h, w = y.shape
        y = y.view(n, 3, c // 3, h, w).permute(0, 2, 1, 3, 4).contiguous().view(n, c, h, w)
        y = self.bn3(self.g2(self.bn2(self.dw(y))))
        return self.head(F.relu(x + y).mean((2, 3)))


class GLUs(nn.Module):
    """GLU halves multiplied directly (4-D), a chunk whose parts feed separate layers (2-D), a split
    along time (channels untouched) and a token GLU on (B, L, C)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pw = nn.Conv2d(4, 6, 1)
        self.fc, self.left, self.right = nn.Linear(6, 10), nn.Linear(5, 3), nn.Linear(5, 3)
        self.t1, self.tok, self.t2 = nn.Conv1d(3, 4, 1), nn.Linear(4, 12), nn.Linear(6, 3)
        self.head = nn.Linear(3 + 3 + 3, 2)

    def forward(self, x):
        a, b = self.conv(x).chunk(2, dim=1)
        z = self.pw(a * b).mean((2, 3))                         # (B, 6)
        l, r = F.relu(self.fc(z)).chunk(2, dim=-1)
        z = self.left(l) + self.right(r)                        # (B, 3)
        s = self.t1(x.flatten(2))                               # (B, 4, L)
        first, second = s.split(s.shape[-1] // 2, dim=2)       # split time, not channels
        t = torch.cat([first, second], dim=2).transpose(1, 2)   # (B, L, 4)
        u, v = self.tok(t).chunk(2, dim=-1)
        t = self.t2(u * torch.sigmoid(v)).mean(1)               # (B, 3)
        return self.head(torch.cat([z, t, z * t], dim=1))


class ConvNeXtish(nn.Module):
    """Depthwise conv → channel-last LayerNorm → Linear MLP → layer scale → permute back, residual."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, stride=2)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.ln, self.up, self.down = nn.LayerNorm(8), nn.Linear(8, 16), nn.Linear(16, 8)
        self.gamma = nn.Parameter(torch.full((8,), 0.5))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        y = self.ln(self.dw(x).permute(0, 2, 3, 1))
        y = self.gamma * self.down(F.gelu(self.up(y)))
        return self.head((x + y.permute(0, 3, 1, 2)).mean((2, 3)))


CASES = {
    "unet": (UNetish, (2, 3, 8, 8), lambda m: [m.out], {"e1": 8, "e2": 16, "up": 8, "d": 8}, []),
    "vgg": (VGGish, (2, 3, 8, 8), lambda m: [m.c[3]], {"f.0": 8, "f.4": 16, "c.0": 32}, []),
    "grouped_gn": (GroupedBottleneck, (2, 3, 6, 6), lambda m: [m.head], {"stem": 16, "a": 2, "b": 2, "c": 4}, []),
    "tcn_lstm": (CircularTCN, (2, 4, 10), lambda m: [m.fc], {"c1": 8, "lstm": 6}, []),
    "shuffle": (ShuffleUnit, (2, 3, 6, 6), lambda m: [m.head], {"stem": 4, "g1": 4}, []),
    "glus": (GLUs, (2, 3, 4, 4), lambda m: [m.head], {"conv": 4, "pw": 6, "fc": 5, "left": 3, "t1": 4, "tok": 6}, []),
    "convnext": (ConvNeXtish, (2, 3, 8, 8), lambda m: [m.head], {"stem": 8, "up": 16}, []),
}


@pytest.mark.parametrize("name", list(CASES))
def test_unseen_architecture_prunes_equivalently(name):
    build, shape, heads, sizes, skipped = CASES[name]
    torch.manual_seed(0)
    model, x = build(), torch.randn(*shape)
    graph = eg.trace(model, x, ignored_layers=heads(model))
    assert [s.root for s in graph.skipped] == skipped, graph.table()
    assert {g.root: g.size for g in graph.groups} == sizes, graph.table()
    checks = assert_prune_equivalent(model, x, ignored_layers=heads(model))
    assert len(checks) == 3 * len(graph.groups)


def test_shuffle_units_are_positions_shared_by_every_group():
    """A unit of the shuffle group is one position in each of the 3 shuffle groups (and, through
    the grouped convs, the matching positions): removing it keeps the shuffle a permutation."""
    model = ShuffleUnit()
    g = {x.root: x for x in eg.trace(model, torch.randn(1, 3, 6, 6), ignored_layers=[model.head]).groups}["g1"]
    owner = {}
    for item in g.items:
        if item.owner == "g1" and item.attr == "weight":
            for u, c in zip(item.unit.tolist(), item.index.tolist()):
                owner[c] = u
    # channel c = a * 4 + b (a: shuffle group, b: position): one unit per position b
    assert owner == {c: c % 4 for c in range(12)}
    pruned = [c for c in range(12) if c % 4 == 1]
    g.prune([1])
    assert model.g1.out_channels == 12 - len(pruned) and model.dw.groups == 9 and model.g2.in_channels == 9
