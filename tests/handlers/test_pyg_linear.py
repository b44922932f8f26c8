"""PyG's ``Linear`` (GCNConv, SAGEConv, …): a layer family of its own; an unknown leaf layer whose
weight the forward uses is refused with a reason, never left out in silence."""
import torch
from torch import nn
from torch_geometric.nn import ChebConv, GCNConv, SAGEConv, TAGConv

import etp_graph as eg
from etp_graph.testing import assert_prune_equivalent
from etp_graph.zoo.gat import random_graph


class TwoLayer(nn.Module):
    def __init__(self, conv, hidden=8):
        super().__init__()
        self.c1, self.c2 = conv(16, hidden), conv(hidden, 3)

    def forward(self, x, edge_index):
        return self.c2(torch.relu(self.c1(x, edge_index)), edge_index)


def test_gcn_and_sage_prune_their_hidden_width_exactly():
    x = random_graph()
    for conv, roots in ((GCNConv, ["c1.lin"]), (SAGEConv, ["c1.lin_l"])):
        torch.manual_seed(0)
        net = TwoLayer(conv).eval()
        g = eg.trace(net, x, ignored_layers=[net.c2])
        assert [(q.root, q.size) for q in g.groups] == [(r, 8) for r in roots] and not g.skipped
        owners = {i.owner for i in g.groups[0].items}
        assert {"c1", "c2.lin"} <= owners or {"c1.lin_r", "c2.lin_l", "c2.lin_r"} <= owners
        checks = assert_prune_equivalent(net, x, ignored_layers=[net.c2])
        assert {c.checked for c in checks} == {"values"}


def test_chebconv_and_tagconv_call_their_linears_through_forward_and_still_prune_exactly():
    """ChebConv and TAGConv apply ``lin.forward(x)`` to their propagated features: no module hook
    sees the call, only its ``F.linear``; it is traced as the layer's call, so the width read by
    every one of the K linears is one group (it was refused: 'mat1 and mat2 shapes cannot be
    multiplied' when only the hooked ones were cut)."""
    x = random_graph()
    for conv in (lambda i, o: ChebConv(i, o, K=3), lambda i, o: TAGConv(i, o, K=3)):
        torch.manual_seed(0)
        net = TwoLayer(conv).eval()
        g = eg.trace(net, x, ignored_layers=[net.c2])
        assert [(q.root, q.size) for q in g.groups] == [("c1.lins.0", 8)] and not g.skipped
        cols = {i.owner for i in g.groups[0].items if i.role == "in"}
        assert {"c2.lins.0", "c2.lins.1", "c2.lins.2"} <= cols
        checks = assert_prune_equivalent(net, x, ignored_layers=[net.c2])
        assert {c.checked for c in checks} == {"values"}


def test_a_pruned_gcn_runs_with_its_new_width():
    torch.manual_seed(0)
    x = random_graph()
    net = TwoLayer(GCNConv, hidden=16).eval()
    before = net(*x)
    keep = [0, 2, 3, 5, 8, 9, 11, 15]
    with torch.no_grad():   # the units a cut removes carry nothing: the output stays the same
        for i in sorted(set(range(16)) - set(keep)):
            net.c1.lin.weight[i] = 0
            net.c1.bias[i] = 0
            net.c2.lin.weight[:, i] = 0
        before = net(*x)
    eg.ETPPruner(net, x, ignored_layers=[net.c2], threshold=1e-12).step()
    assert net.c1.lin.weight.shape == (8, 16) and net.c1.bias.shape == (8,) and net.c2.lin.weight.shape == (3, 8)
    assert (net.c1.lin.out_channels, net.c2.lin.in_channels) == (8, 8)
    torch.testing.assert_close(net(*x), before, rtol=1e-5, atol=1e-6)


class Proj(nn.Module):
    """A leaf layer no handler knows: ``x @ W^T`` with its own weight."""

    def __init__(self, i, o):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, i))

    def forward(self, x):
        return x @ self.weight.t()


def test_an_unknown_leaf_layer_is_refused_with_the_reason():
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), Proj(6, 5), nn.ReLU(), nn.Linear(5, 2))
    g = eg.trace(net, torch.randn(3, 4), ignored_layers=[net[4]])
    reasons = {s.root: s.reason for s in g.skipped}
    assert "2" in reasons and "Proj has no layer handler" in reasons["2"] and "(5, 6)" in reasons["2"]
    assert "register_handler" in reasons["2"]
