"""The public contract of trace / ChannelGraph / CoupledGroup."""
import copy

import networkx as nx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import etp_graph as eg


def chain():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3),
                         nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5)).eval()


X = torch.randn(2, 3, 8, 8)


def test_groups_roots_sizes_and_order():
    m = chain()
    g = eg.trace(m, X, ignored_layers=[m[6]])
    assert [(x.root, x.size) for x in g.groups] == [("0", 8), ("3", 6)]
    m2 = copy.deepcopy(m)
    g2 = eg.trace(m2, X, ignored_layers=[m2[6]])
    assert [x.root for x in g2.groups] == [x.root for x in g.groups]
    assert g.groups[0].modules == ["0", "1", "3"]


def test_unit_norms_closed_form():
    m = chain()
    grp = eg.trace(m, X, ignored_layers=[m[6]]).groups[0]
    conv, bn, nxt = m[0], m[1], m[3]
    expect = (conv.weight.pow(2).sum((1, 2, 3)) + conv.bias.pow(2) + bn.weight.pow(2) + bn.bias.pow(2)
              + nxt.weight.pow(2).sum((0, 2, 3))).sqrt()      # running stats are buffers: not counted
    assert torch.allclose(grp.unit_norms(), expect)
    # the flatten → Linear group: each unit owns 16 input columns of the head
    grp2 = eg.trace(m, X, ignored_layers=[m[6]]).groups[1]
    head_cols = m[6].weight.view(5, 6, 16).pow(2).sum((0, 2))
    expect2 = (m[3].weight.pow(2).sum((1, 2, 3)) + m[3].bias.pow(2) + head_cols).sqrt()
    assert torch.allclose(grp2.unit_norms(), expect2)


def test_zero_then_prune_keeps_output_and_updates_layers():
    m = chain()
    grp = eg.trace(m, X, ignored_layers=[m[6]]).groups[1]
    masked = copy.deepcopy(m)
    grp.zero_([1, 4], model=masked)
    grp.prune([1, 4])
    assert (m[3].out_channels, m[3].weight.shape[0], m[6].in_features) == (4, 4, 64)
    assert torch.allclose(m(X), masked(X), atol=1e-5)
    assert grp.size == 4  # renumbered, still usable
    grp.prune([0])
    assert m[6].in_features == 48 and m(X).shape == (2, 5)


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_mask_equals_prune_for_any_subset(data):
    m = chain()
    grp = eg.trace(m, X, ignored_layers=[m[6]], validate=False).groups[0]
    idx = data.draw(st.lists(st.integers(0, 7), min_size=1, max_size=7, unique=True))
    masked = copy.deepcopy(m)
    grp.zero_(idx, model=masked)
    grp.prune(idx)
    assert m[0].out_channels == 8 - len(idx)
    assert torch.allclose(m(X), masked(X), atol=1e-5)


def test_to_networkx():
    m = chain()
    g = eg.trace(m, X, ignored_layers=[m[6]])
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
    g = eg.trace(m, X, ignored_layers=[m[3], m[6]])
    assert [x.root for x in g.groups] == ["0"]
    assert "3" in g.groups[0].modules  # its input columns still belong to the group


def test_output_channels_of_model_are_refused():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    g = eg.trace(m, X)
    assert [x.root for x in g.groups] == ["0"]
    assert g.skipped[0].root == "2" and "model output" in g.skipped[0].reason
