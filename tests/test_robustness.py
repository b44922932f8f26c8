"""Robustness: random architectures from the supported families prune exactly and trace the
same twice; bad input gets a clear error naming what was expected, and the model is unchanged."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import etp_graph as eg
from etp_graph.testing import assert_prune_equivalent


class Block(nn.Module):
    """One random CNN block: conv (maybe grouped) → norm → ReLU, then maybe a residual add, a
    second branch concatenated, or a chunk into two halves multiplied (GLU)."""

    def __init__(self, c_in, spec):
        super().__init__()
        width, groups, norm, kind = spec
        self.kind = kind
        width = width * groups if groups > 1 else width
        g = groups if c_in % groups == 0 and width % groups == 0 else 1
        self.conv = nn.Conv2d(c_in, width if kind != "glu" else 2 * width, 3, padding=1, groups=g)
        n = self.conv.out_channels
        self.norm = {"bn": nn.BatchNorm2d(n), "gn": nn.GroupNorm(1, n), "none": nn.Identity()}[norm]
        if kind == "concat":
            self.side = nn.Conv2d(c_in, 3, 1)
        if kind == "residual":
            self.back = nn.Conv2d(n, c_in, 1)
        self.out_channels = {"residual": c_in, "concat": n + 3, "glu": width}.get(kind, n)

    def forward(self, x):
        y = F.relu(self.norm(self.conv(x)))
        if self.kind == "residual":
            return x + self.back(y)
        if self.kind == "concat":
            return torch.cat([y, self.side(x)], 1)
        if self.kind == "glu":
            a, b = y.chunk(2, dim=1)
            return a * torch.sigmoid(b)
        return y


class RandomCNN(nn.Module):
    def __init__(self, specs):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        blocks, c = [], 8
        for spec in specs:
            blocks.append(Block(c, spec))
            c = blocks[-1].out_channels
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class Attention(nn.Module):
    def __init__(self, c, heads):
        super().__init__()
        self.h, self.d = heads, c // heads
        self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.h, self.d).permute(2, 0, 3, 1, 4).unbind(0)
        y = (q @ k.transpose(-1, -2) / math.sqrt(self.d)).softmax(-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, t, self.h * self.d))


class RandomTransformer(nn.Module):
    def __init__(self, width, heads, depth, ffn, norm):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(5, width)
        self.layers = nn.ModuleList()
        for _ in range(depth):
            self.layers.append(nn.ModuleDict({
                "attn": Attention(width, heads), "up": nn.Linear(width, ffn), "down": nn.Linear(ffn, width),
                "norm": nn.LayerNorm(width) if norm else nn.Identity()}))
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        h = self.inp(x)
        for layer in self.layers:
            h = layer["norm"](h + layer["attn"](h))
            h = h + layer["down"](F.gelu(layer["up"](h)))
        return self.head(h)


def _signature(graph):
    return [(g.root, g.size, g.exact, [(i.owner, i.attr, i.dim, i.unit.tolist(), i.index.tolist()) for i in g.items])
            for g in graph.groups], [(s.root, s.reason) for s in graph.skipped]


blocks = st.lists(st.tuples(st.integers(2, 6), st.sampled_from([1, 2]), st.sampled_from(["bn", "gn", "none"]),
                            st.sampled_from(["plain", "residual", "concat", "glu"])), min_size=1, max_size=3)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks)
def test_random_cnns_prune_exactly_and_trace_the_same_twice(specs):
    model, x = RandomCNN(specs).eval(), torch.randn(2, 3, 6, 6)
    first, second = (eg.trace(model, x, ignored_layers=[model.head]) for _ in range(2))
    assert _signature(first) == _signature(second)
    assert first.groups                               # the stem at least
    assert_prune_equivalent(model, x, ignored_layers=[model.head], check_macs=False)


def test_a_grouped_conv_reading_a_concat_joins_the_branches_it_reads_together():
    # blocks.1.conv (groups=2) reads cat(conv 5 ch, side 3 ch): its filters' input slot k takes
    # concat channels k and k + 4, so conv channel 1 goes with side channel 0 (found by hypothesis:
    # two groups cutting one column each, returned "exact" because the joint check cut both)
    model, x = RandomCNN([(5, 1, "bn", "concat"), (2, 2, "bn", "plain")]).eval(), torch.randn(2, 3, 6, 6)
    graph = eg.trace(model, x, ignored_layers=[model.head])
    assert [(g.root, g.size) for g in graph.groups] == [("stem", 8), ("blocks.0.conv", 4), ("blocks.1.conv", 2)]
    assert not graph.skipped
    joined = graph.groups[1]
    side = next(it for it in joined.items if (it.owner, it.attr) == ("blocks.0.side", "weight"))
    assert side.unit.tolist() == [1, 2, 3] and side.index.tolist() == [0, 1, 2]
    assert_prune_equivalent(model, x, ignored_layers=[model.head], check_macs=False)
    joined.prune([1])
    assert (model.blocks[0].conv.out_channels, model.blocks[0].side.out_channels, model.blocks[1].conv.in_channels) == (4, 2, 6)
    assert model(x).shape == (2, 4)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([(16, 2), (16, 4), (24, 3)]), st.integers(1, 2), st.sampled_from([8, 20]), st.booleans())
def test_random_transformers_prune_exactly_and_trace_the_same_twice(wh, depth, ffn, norm):
    model, x = RandomTransformer(wh[0], wh[1], depth, ffn, norm).eval(), torch.randn(2, 4, 5)
    first, second = (eg.trace(model, x, ignored_layers=[model.head]) for _ in range(2))
    assert _signature(first) == _signature(second)
    assert sum(1 for g in first.groups if g.heads) == depth and not first.skipped
    assert_prune_equivalent(model, x, ignored_layers=[model.head], check_macs=False)


def test_the_same_model_gives_the_same_report_twice():
    reports = []
    for _ in range(2):
        model = RandomCNN([(4, 1, "bn", "residual"), (3, 2, "none", "concat")]).eval()
        reports.append(str(eg.ETPPruner(model, torch.randn(2, 3, 6, 6), ignored_layers=[model.head],
                                        target_speedup=1.5).step()))
    assert reports[0] == reports[1]


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.Conv2d(8, 4, 3),
                         nn.Flatten(), nn.Linear(64, 2)).eval()


X = torch.randn(2, 3, 8, 8)


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _nan(m):
    with torch.no_grad():
        m[3].weight[0, 0, 0, 0] = float("nan")
    return m


@pytest.mark.parametrize("make, inputs, error, says", [
    (_net, torch.randn(2, 5, 8, 8), eg.TraceError, "cannot run on example_inputs"),
    (_net, "an image", TypeError, "example_inputs must be a Tensor"),
    (lambda: _nan(_net()), X, eg.TraceError, "non-finite values (NaN or inf) in '3.weight'"),
    (_net, X.to("meta"), eg.TraceError, "example_inputs are on meta and the model on cpu"),
    (lambda: torch.jit.script(_net()), X, eg.TraceError, "TorchScript module"),
    (lambda: torch.compile(_net()), X, eg.TraceError, "model._orig_mod"),
    (_net, X.double(), eg.TraceError, "cannot run on example_inputs"),
])
def test_bad_input_is_a_clear_error_and_the_model_is_unchanged(make, inputs, error, says):
    model = make()
    before = _state(model)
    with pytest.raises(error) as e:
        eg.trace(model, inputs)
    assert says in str(e.value)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) or (v.isnan().any() and torch.equal(after[k].isnan(), v.isnan()))
               for k, v in before.items())


def test_a_non_module_is_refused():
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        eg.trace(lambda x: x, X)


def test_in_place_ops_half_precision_frozen_parts_and_an_already_pruned_model_work():
    model = _net()                                     # ReLU(inplace=True)
    assert [(g.root, g.size) for g in eg.trace(model, X, ignored_layers=[model[5]]).groups] == [("0", 8), ("3", 4)]
    half = copy.deepcopy(model).half()
    assert len(eg.trace(half, X.half(), ignored_layers=[half[5]]).groups) == 2
    frozen = copy.deepcopy(model)
    frozen[0].requires_grad_(False)
    report = eg.ETPPruner(frozen, X, ignored_layers=[frozen[5]], pruning_ratio=0.5).step()
    assert report.units_kept["0"] == 4 and not frozen[0].weight.requires_grad
    graph = eg.trace(model, X, ignored_layers=[model[5]])
    graph.groups[0].prune([0, 1])
    again = eg.trace(model, X, ignored_layers=[model[5]])       # a pruned model traces like any other
    assert [(g.root, g.size) for g in again.groups] == [("0", 6), ("3", 4)]
    assert_prune_equivalent(model, X, ignored_layers=[model[5]])
