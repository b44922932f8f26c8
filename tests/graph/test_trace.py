"""trace(): groups, their order, inputs, ignored layers, refusals, errors, training mode."""
import copy

import networkx as nx
import pytest
import torch
from torch import nn

import etp_graph as eg
from graph_models import X6, X8, assert_unchanged, chain, small, snapshot


def test_groups_roots_sizes_and_order():
    m = chain()
    g = eg.trace(m, X8, ignored_layers=[m[6]])
    assert [(x.root, x.size) for x in g.groups] == [("0", 8), ("3", 6)]
    m2 = copy.deepcopy(m)
    g2 = eg.trace(m2, X8, ignored_layers=[m2[6]])
    assert [x.root for x in g2.groups] == [x.root for x in g.groups]
    assert g.groups[0].modules == ["0", "1", "3"]


def test_to_networkx():
    m = chain()
    g = eg.trace(m, X8, ignored_layers=[m[6]])
    G = g.to_networkx()
    assert isinstance(G, nx.DiGraph)
    assert G.nodes["0"]["groups"] == [0] and G.nodes["3"]["groups"] == [0, 1]
    assert G.has_edge("0", "1") and nx.is_directed_acyclic_graph(G)


def test_dict_and_tuple_inputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(4, 6), nn.Linear(3, 6), nn.Linear(6, 2)

        def forward(self, x, y):
            return self.head(torch.relu(self.a(x) + self.b(y)))

    m = Two()
    x, y = torch.randn(2, 4), torch.randn(2, 3)
    for inputs in ((x, y), {"x": x, "y": y}):
        g = eg.trace(m, inputs, ignored_layers=[m.head])
        assert [(gr.root, gr.size) for gr in g.groups] == [("a", 6)]
        assert set(g.groups[0].modules) == {"a", "b", "head"}


def test_ignored_layer_outputs_are_never_pruned():
    m = chain()
    g = eg.trace(m, X8, ignored_layers=[m[3], m[6]])
    assert [x.root for x in g.groups] == ["0"]
    assert "3" in g.groups[0].modules  # its input columns still belong to the group


def test_output_channels_of_model_are_refused():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    g = eg.trace(m, X8)
    assert [x.root for x in g.groups] == ["0"]
    assert g.skipped[0].root == "2" and "model output" in g.skipped[0].reason


def test_ignored_layer_not_in_small():
    m = small()
    with pytest.raises(ValueError, match="not a submodule"):
        eg.trace(m, X6, ignored_layers=[nn.Linear(2, 2)])
    with pytest.raises(TypeError, match="nn.Module"):
        eg.trace(m, X6, ignored_layers=["3"])


def test_inputs_the_model_cannot_run():
    m = small()
    snap = snapshot(m)
    with pytest.raises(ValueError, match="cannot run on example_inputs"):
        eg.trace(m, torch.randn(1, 5, 6, 6))
    with pytest.raises(TypeError, match="example_inputs must be"):
        eg.trace(m, 3)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        eg.trace(lambda x: x, X6)
    assert_unchanged(m, snap)
    assert not m.training


def test_trace_restores_training_mode_and_weights():
    m = small().train()
    state = copy.deepcopy(m.state_dict())
    eg.trace(m, X6, ignored_layers=[m[3]])
    assert m.training
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())


def test_unknown_layer_named_in_skip_reason():
    class Mystery(nn.Module):  # a channel-mixing op the backend treats as a leaf it cannot cut
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return torch.einsum("bchw,cd->bdhw", x, self.w)

    m = nn.Sequential(nn.Conv2d(3, 4, 1), Mystery(), nn.Conv2d(4, 2, 1))
    g = eg.trace(m, X6, ignored_layers=[m[2]])
    assert all(s.reason for s in g.skipped)
    # whatever is returned must be exact
    from etp_graph.testing import assert_prune_equivalent
    assert_prune_equivalent(m, X6, ignored_layers=[m[2]])


class _Tokens(nn.Module):
    """Linear layers on (batch, tokens, features): each runs as view → addmm → view; ``mix``
    multiplies by a parameter of its own module with ``F.linear`` (no layer the backend knows)."""

    def __init__(self, functional: bool = False):
        super().__init__()
        self.functional = functional
        self.fc1, self.fc2, self.head = nn.Linear(6, 12), nn.Linear(12, 6), nn.Linear(6, 2)
        self.mix = nn.Parameter(torch.randn(12, 12))

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if self.functional:
            h = torch.nn.functional.linear(h, self.mix)
        return self.head(self.fc2(h))


class _ThroughParameters(nn.Module):
    """A block that applies its Linears through their parameters (``F.linear(x, fc.weight,
    fc.bias)``, as torchvision's Swin attention does): their forwards never run. ``other_bias``:
    ``fc1`` gets a bias that is not its own (the call is then no call of the layer)."""

    def __init__(self, other_bias: bool = False):
        super().__init__()
        self.other_bias = other_bias
        self.inp, self.fc1, self.fc2, self.head = nn.Linear(4, 8), nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 3)

    def forward(self, x):
        F = torch.nn.functional
        t = self.inp(x)
        b1 = self.fc1.bias * 2 if self.other_bias else self.fc1.bias
        h = F.relu(F.linear(t, self.fc1.weight, b1))
        return self.head(t + F.linear(h, self.fc2.weight, self.fc2.bias))


def test_a_layer_called_through_its_parameters_is_traced_as_a_call():
    x = torch.randn(2, 5, 4)
    m = _ThroughParameters()
    before = snapshot(m, x)
    g = eg.trace(m, x, ignored_layers=[m.head])
    assert sorted((gr.root, gr.size, gr.exact) for gr in g.groups) == [("fc1", 16, True), ("inp", 8, True)]
    assert not g.skipped
    assert_unchanged(m, before, x)
    assert not m.fc1._forward_hooks and not m.fc1._forward_pre_hooks   # the trace's hooks are gone
    from etp_graph.testing import assert_prune_equivalent
    assert {c.checked for c in assert_prune_equivalent(m, x, ignored_layers=[m.head])} == {"values"}
    # another bias: not the layer's call, so neither the block's width nor fc1's units are offered
    o = _ThroughParameters(other_bias=True)
    g = eg.trace(o, x, ignored_layers=[o.head])
    assert not any(gr.root in ("inp", "fc1") for gr in g.groups)
    assert {s.root for s in g.skipped} >= {"inp"} and all(s.reason for s in g.skipped)
    assert_prune_equivalent(o, x, ignored_layers=[o.head])


class _ConvThroughParameters(nn.Module):
    """``F.conv2d`` on a convolution's own weight, bias, stride and padding (``padding``: another
    padding than the layer's, so the call is not the layer's)."""

    def __init__(self, padding=None):
        super().__init__()
        self.padding = padding
        self.stem, self.conv, self.head = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 8, 3, stride=2, padding=1), \
            nn.Conv2d(8, 2, 1)

    def forward(self, x):
        c = self.conv
        pad = c.padding if self.padding is None else self.padding
        h = torch.nn.functional.conv2d(torch.relu(self.stem(x)), c.weight, c.bias, c.stride, pad)
        return self.head(torch.relu(h))


def test_a_convolution_called_through_its_parameters_is_traced_as_a_call():
    m = _ConvThroughParameters()
    g = eg.trace(m, X8, ignored_layers=[m.head])
    assert sorted((gr.root, gr.size, gr.exact) for gr in g.groups) == [("conv", 8, True), ("stem", 6, True)]
    from etp_graph.testing import assert_prune_equivalent
    checks = assert_prune_equivalent(m, X8, ignored_layers=[m.head])
    assert {c.root for c in checks} == {"stem", "conv"} and {c.checked for c in checks} == {"values"}
    other = _ConvThroughParameters(padding=(2, 2))
    g = eg.trace(other, X8, ignored_layers=[other.head])
    assert not any(gr.root in ("stem", "conv") for gr in g.groups) and g.skipped
    assert_prune_equivalent(other, X8, ignored_layers=[other.head])


def test_a_layers_own_product_is_no_unverified_op():
    """Without validation the groups are the verified ones: the addmm inside a Linear on a 3-D
    input is the layer's, not an op the channels pass through; a product with another
    parameter still refuses the group without validation."""
    x = torch.randn(2, 5, 6)
    m = _Tokens()
    checked = eg.trace(m, x, ignored_layers=[m.head])
    fast = eg.trace(m, x, ignored_layers=[m.head], validate=False)
    assert [(g.root, g.size) for g in fast.groups] == [(g.root, g.size) for g in checked.groups] == [("fc1", 12), ("fc2", 6)]
    assert "Addmm" not in fast.groups[0].ops and not fast.unknown_ops and not fast.skipped
    f = _Tokens(functional=True)
    fast = eg.trace(f, x, ignored_layers=[f.head], validate=False)
    assert not any(g.root == "fc1" for g in fast.groups)
    assert any(s.root == "fc1" and "unverified ops" in s.reason for s in fast.skipped)
