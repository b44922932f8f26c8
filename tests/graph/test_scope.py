"""graph.scope: a cut checked on the innermost module that holds every use of what it changes,
and the shared-tensor twins of graph.verify (the user's model is left exactly as it was)."""
import copy
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

import etp_graph as eg
from etp_graph.graph.scope import capture
from etp_graph.graph.verify import experiment, mask_and_prune, twin
from etp_graph.testing import assert_prune_equivalent


class Block(nn.Module):
    def __init__(self, c=8, hidden=12):
        super().__init__()
        self.a, self.n, self.b = nn.Conv2d(c, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.Conv2d(hidden, c, 3, padding=1)

    def forward(self, x):
        return x + self.b(F.relu(self.n(self.a(x))))


class Net(nn.Module):
    """stem → two residual blocks → head; ``peek``: the parent also reads ``blocks[1].a.weight``."""

    def __init__(self, peek=False):
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.blocks, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Sequential(Block(), Block()), nn.Linear(8, 4)
        self.peek = peek

    def forward(self, x):
        x = self.blocks(self.stem(x))
        out = self.head(x.mean((2, 3)))
        if self.peek:   # a functional read of a block's weight, outside the block's forward
            out = out + self.blocks[1].a.weight.sum()   # (zeroed rows add what removed ones do)
        return out


X = torch.randn(2, 3, 8, 8)


def _groups(m):
    return {g.root: g for g in eg.trace(m, X, ignored_layers=[m.head]).groups}


def test_a_blocks_inner_group_is_checked_on_the_block_the_stream_on_the_model():
    m = Net().eval()
    g = _groups(m)
    scopes = capture(m, X, list(g.values()))
    assert scopes.hosts(m, [g["blocks.0.a"]]) == ["blocks.0", "blocks"]
    assert scopes.hosts(m, [g["stem"]]) == []                   # the residual stream reaches the head
    assert scopes.hosts(m, [g["blocks.0.a"], g["blocks.1.a"]]) == ["blocks"]
    why, stand_in = experiment(m, X, [(g["blocks.0.a"], [1, 5])], True, scopes=scopes)
    assert why is None and stand_in.get_submodule("blocks.0.a").out_channels == 10
    assert m.blocks[0].a.out_channels == 12


def test_a_tensor_read_outside_its_module_moves_the_check_out():
    m = Net(peek=True).eval()
    g = _groups(m)
    scopes = capture(m, X, list(g.values()))
    assert scopes.hosts(m, [g["blocks.1.a"]]) == []             # read by the model's own forward
    assert scopes.hosts(m, [g["blocks.0.a"]]) == ["blocks.0", "blocks"]


def test_a_wrong_map_inside_a_block_fails_on_the_block_and_on_the_model():
    m = Net().eval()
    g = _groups(m)
    wrong = copy.copy(g["blocks.0.a"])   # the next conv's columns shifted by one
    wrong.items = [dataclasses.replace(s, index=(s.index + 1) % 12) if s.owner == "blocks.0.b" else s
                   for s in wrong.items]
    scopes = capture(m, X, [wrong])
    why, _ = experiment(m, X, [(wrong, [1, 5])], True, scopes=scopes)
    assert why is not None and why.kind == "value"


class Weights(nn.Module):
    """An eager attention that also returns its per-head weights (its caller drops them)."""

    def __init__(self, c=16, h=4):
        super().__init__()
        self.h, self.d = h, c // h
        self.q, self.k, self.v, self.o = (nn.Linear(c, c) for _ in range(4))

    def forward(self, x):
        b, t, _ = x.shape
        split = lambda z: z.view(b, t, self.h, self.d).transpose(1, 2)  # noqa: E731
        w = (split(self.q(x)) @ split(self.k(x)).transpose(-1, -2) / math.sqrt(self.d)).softmax(-1)
        return self.o((w @ split(self.v(x))).transpose(1, 2).reshape(b, t, self.h * self.d)), w


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attn, self.head = Weights(), nn.Linear(16, 2)

    def forward(self, x):
        y, _ = self.attn(x)
        return self.head(x + y)


def test_a_host_whose_outputs_change_shape_hands_the_check_to_its_caller():
    m, x = Layer().eval(), torch.randn(2, 5, 16)
    g = eg.trace(m, x, ignored_layers=[m.head])
    heads = next(gr for gr in g.groups if gr.heads)
    assert heads.size == 4 and not g.skipped
    scopes = capture(m, x, [heads])
    assert scopes.hosts(m, [heads]) == ["attn"]
    why, stand_in = experiment(m, x, [(heads, [1])], True, scopes=scopes)
    assert why is None and isinstance(stand_in, Layer)          # checked on the whole model
    assert_prune_equivalent(m, x, ignored_layers=[m.head])


def test_twins_share_what_a_cut_leaves_and_the_model_is_left_bit_identical():
    m = Net().eval()
    g = _groups(m)["blocks.0.a"]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ids = [id(p) for p in m.parameters()]
    t = twin(m)
    assert t.stem.weight is m.stem.weight and t.blocks[0] is not m.blocks[0]
    a, b, pruned = mask_and_prune(m, X, [(g, [0, 3, 7])])
    assert torch.allclose(a, b, atol=1e-5)
    assert pruned.blocks[0].a.out_channels == 9 and pruned.stem.weight is m.stem.weight
    assert [id(p) for p in m.parameters()] == ids and m.blocks[0].a.out_channels == 12
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_the_masked_slices_are_put_back_when_the_forward_fails():
    m = Net().eval()
    g = _groups(m)["blocks.0.a"]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    try:
        mask_and_prune(m, torch.randn(2, 5, 8, 8), [(g, [0, 3])])   # wrong input width: the masked run fails
    except RuntimeError:
        pass
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
