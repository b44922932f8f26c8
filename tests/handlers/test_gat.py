"""GATConvHandler: heads and per-head channels prune exactly on GATs the zoo does not have."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import GATConv

import etp_graph as eg
from etp_graph.testing import assert_prune_equivalent
from etp_graph.zoo.gat import random_graph


class EdgeGAT(nn.Module):
    """Three GATConvs with different head counts, edge features on one, a residual on another."""

    def __init__(self):
        super().__init__()
        self.c1 = GATConv(10, 6, heads=3, edge_dim=4)
        self.c2 = GATConv(18, 5, heads=2, residual=True)
        self.c3 = GATConv(10, 3, heads=5, concat=False)

    def forward(self, x, edge_index, edge_attr):
        x = F.elu(self.c1(x, edge_index, edge_attr))
        x = F.elu(self.c2(x, edge_index))
        return self.c3(x, edge_index)


def _prune_every_group_equals_masking(net, graph, x, unit, head, kind):
    """Removing ``unit`` from every group at once equals masking it; then prune ``net`` itself."""
    (check,) = assert_prune_equivalent(net, x, ignored_layers=[head], attention_units=kind,
                                       units=[unit], together=True)
    assert check.root == "*" and check.size == len(graph.groups) and check.params[1] < check.params[0]
    for g in graph.groups:
        g.prune([unit])


def _inputs():
    x, ei = random_graph(nodes=15, features=10, edges=50, seed=3)
    return (x, ei, torch.randn(ei.shape[1], 4))


@pytest.mark.parametrize("kind,sizes", [("heads", [3, 2]), ("head_dims", [6, 5])])
def test_multi_layer_gat_prunes_heads_or_channels_exactly(kind, sizes):
    torch.manual_seed(0)
    net = EdgeGAT().eval()
    x = _inputs()
    graph = eg.trace(net, x, ignored_layers=[net.c3], attention_units=kind)
    assert [(g.root, g.size) for g in graph.groups] == [("c1", sizes[0]), ("c2", sizes[1])]
    assert not graph.skipped
    assert_prune_equivalent(net, x, ignored_layers=[net.c3], attention_units=kind)
    _prune_every_group_equals_masking(net, graph, x, 0, net.c3, kind)
    if kind == "heads":
        assert (net.c1.heads, net.c1.out_channels, net.c2.heads, net.c2.in_channels) == (2, 6, 1, 12)
        assert net.c1.lin_edge.weight.shape == (12, 4) and net.c2.res.weight.shape == (5, 12)
    else:
        assert (net.c1.heads, net.c1.out_channels, net.c2.out_channels) == (3, 5, 4)
    assert net.c3.lin.weight.shape[1] == net.c2.heads * net.c2.out_channels


def test_averaged_heads_are_refused_with_reason_and_their_channels_prune():
    torch.manual_seed(1)
    net = nn.ModuleDict({"a": GATConv(8, 4, heads=3, concat=False), "b": GATConv(4, 2, heads=1)})

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = net

        def forward(self, x, ei):
            return self.m["b"](F.relu(self.m["a"](x, ei)), ei)
    model = Net()
    x = random_graph(nodes=10, features=8, seed=4)
    graph = eg.trace(model, x, ignored_layers=[net["b"]])
    assert [(g.root, g.size) for g in graph.groups] == [("m.a", 4)]
    assert any("averages its heads" in s.reason for s in graph.skipped)
    assert_prune_equivalent(model, x, ignored_layers=[net["b"]])


def test_zoo_gat_heads_penalised_with_pivot_order():
    m = eg.zoo.create("gat_cora")
    x = eg.zoo.entry("gat_cora").example_inputs()
    pruner = eg.ETPPruner(m, x, ignored_layers=[m.head], config=eg.ETPConfig(beta=1.0, c=5.0), pruning_ratio=0.5)
    (g,) = pruner.graph.groups
    assert g.size == 8                                   # heads of the first layer
    sq = g.unit_norms().pow(2)
    w = torch.exp(5.0 * torch.arange(8) / 8)
    torch.testing.assert_close(pruner.penalty(), (w * sq).sum() / 8)
    report = pruner.step()
    assert m.convs[0].heads == 4 and m.convs[1].in_channels == 32 and report.macs_after < report.macs_before


def test_planetoid_loader_reads_the_shared_cora_and_ppi_fails_clearly(tmp_path, monkeypatch):
    from benchmarks.data import load_planetoid, load_ppi
    monkeypatch.setenv("ETP_GRAPH_CACHE", str(tmp_path))
    data = load_planetoid("Cora")
    assert tuple(data.x.shape) == (2708, 1433) and int(data.train_mask.sum()) == 140
    with pytest.raises(FileNotFoundError, match="PPI data not found"):
        load_ppi(tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="ind.cora.x"):
        load_planetoid("Cora", root=tmp_path / "empty")


class V2GAT(nn.Module):
    """GATv2Conv layers: separate lin_l/lin_r with biases, shared weights, edge features, residual,
    an averaged output layer; and a GATConv between them (mixed family)."""

    def __init__(self):
        super().__init__()
        from torch_geometric.nn import GATv2Conv
        self.c1 = GATv2Conv(10, 4, heads=3, edge_dim=4)
        self.c2 = GATv2Conv(12, 5, heads=2, share_weights=True, residual=True)
        self.c3 = GATConv(10, 3, heads=4)
        self.c4 = GATv2Conv(12, 3, heads=2, concat=False)

    def forward(self, x, edge_index, edge_attr):
        x = F.elu(self.c1(x, edge_index, edge_attr))
        x = F.elu(self.c2(x, edge_index))
        x = F.elu(self.c3(x, edge_index))
        return self.c4(x, edge_index)


@pytest.mark.parametrize("kind,sizes", [("heads", [3, 2, 4]), ("head_dims", [4, 5, 3])])
def test_gatv2_prunes_heads_or_channels_exactly(kind, sizes):
    torch.manual_seed(5)
    net = V2GAT().eval()
    x = _inputs()
    graph = eg.trace(net, x, ignored_layers=[net.c4], attention_units=kind)
    assert [(g.root, g.size) for g in graph.groups] == list(zip(["c1", "c2", "c3"], sizes))
    assert not graph.skipped
    assert_prune_equivalent(net, x, ignored_layers=[net.c4], attention_units=kind)
    _prune_every_group_equals_masking(net, graph, x, 1, net.c4, kind)
    if kind == "heads":
        assert (net.c1.heads, net.c1.att.shape, net.c1.lin_r.bias.shape) == (2, (1, 2, 4), (8,))
        assert net.c2.lin_r is net.c2.lin_l and net.c2.lin_l.weight.shape == (5, 8)
        assert net.c2.res.weight.shape == (5, 8) and net.c3.lin.weight.shape == (9, 5)
    else:
        assert (net.c1.heads, net.c1.out_channels, net.c1.lin_edge.weight.shape) == (3, 3, (9, 4))
    assert net.c4.lin_l.weight.shape[1] == net.c3.heads * net.c3.out_channels


class SuperGAT(nn.Module):
    """SuperGATConv with both attention types: "MX" (att_l/att_r and dot-product logits) and "SD"
    (scaled dot products, no attention parameters)."""

    def __init__(self, kind="MX"):
        super().__init__()
        from torch_geometric.nn import SuperGATConv
        self.c1 = SuperGATConv(10, 4, heads=3, attention_type="MX")
        self.c2 = SuperGATConv(12, 5, heads=2, attention_type=kind)
        self.head = nn.Linear(10, 3)

    def forward(self, x, edge_index, edge_attr):
        x = F.elu(self.c1(x, edge_index))
        return self.head(F.elu(self.c2(x, edge_index)))


def test_supergat_prunes_heads_exactly_and_refuses_dims_under_a_scaled_score():
    torch.manual_seed(2)
    x = _inputs()
    net = SuperGAT("SD").eval()
    graph = eg.trace(net, x, ignored_layers=[net.head])
    assert [(g.root, g.size) for g in graph.groups] == [("c1", 3), ("c2", 2)] and not graph.skipped
    assert_prune_equivalent(net, x, ignored_layers=[net.head])
    _prune_every_group_equals_masking(net, graph, x, 1, net.head, "heads")
    assert (net.c1.heads, net.c1.att_l.shape, net.c2.heads, net.c2.lin.weight.shape) == (2, (1, 2, 4), 1, (5, 8))
    net = SuperGAT("SD").eval()
    graph = eg.trace(net, x, ignored_layers=[net.head], attention_units="head_dims")
    assert [(g.root, g.size) for g in graph.groups] == [("c1", 4)]
    assert "1/sqrt(out_channels)" in graph.skipped[0].reason
    net = SuperGAT("MX").eval()
    assert_prune_equivalent(net, x, ignored_layers=[net.head], attention_units="head_dims")
