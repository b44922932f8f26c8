"""PyG ``TransformerConv``: heads are units (with the skip, the gate and the edge projection), a
cut equals masking and the pruned layer runs with its new head count; what would change the
scores' scale or the heads' mean is refused with the reason."""
import pytest
import torch
from torch import nn
from torch_geometric.nn import TransformerConv

import etp_graph as eg
from etp_graph.testing import assert_prune_equivalent

G = torch.Generator().manual_seed(0)
X, EDGES, EDGE_ATTR = torch.randn(20, 12, generator=G), torch.randint(0, 20, (2, 60), generator=G), torch.randn(60, 4, generator=G)


class Net(nn.Module):
    def __init__(self, heads=4, **kw):
        super().__init__()
        self.inp = nn.Linear(12, 12)
        self.conv = TransformerConv(12, 8, heads=heads, **kw)
        self.head = nn.Linear(8 * heads if kw.get("concat", True) else 8, 3)
        self.edges = "edge_dim" in kw

    def forward(self, x, edge_index, edge_attr):
        h = torch.relu(self.inp(x))
        h = self.conv(h, edge_index, edge_attr) if self.edges else self.conv(h, edge_index)
        return self.head(torch.relu(h))


@pytest.mark.parametrize("kw", [{}, {"beta": True}, {"edge_dim": 4}, {"root_weight": False},
                                {"beta": True, "edge_dim": 4}])
def test_transformer_conv_heads_prune_exactly(kw):
    torch.manual_seed(0)
    m = Net(**kw).eval()
    inputs = (X, EDGES, EDGE_ATTR)
    g = eg.trace(m, inputs, ignored_layers=[m.head])
    assert [(q.root, q.size) for q in g.groups] == [("inp", 12), ("conv", 4)] and not g.skipped
    heads = g.groups[1]
    owners = {(i.owner, i.attr) for i in heads.items}
    assert {("conv.lin_query", "weight"), ("conv.lin_key", "weight"), ("conv.lin_value", "weight"),
            ("head", "weight")} <= owners
    assert (("conv.lin_skip", "weight") in owners) == kw.get("root_weight", True)
    assert (("conv.lin_beta", "weight") in owners) == kw.get("beta", False)
    assert (("conv.lin_edge", "weight") in owners) == ("edge_dim" in kw)
    checks = assert_prune_equivalent(m, inputs, ignored_layers=[m.head])
    assert {c.checked for c in checks} == {"values"} and len(checks) == 6


def test_a_pruned_transformer_conv_keeps_the_heads_it_was_given():
    torch.manual_seed(0)
    m = Net(beta=True).eval()
    inputs = (X, EDGES, EDGE_ATTR)
    pruner = eg.ETPPruner(m, inputs, ignored_layers=[m.head], pruning_ratio=0.5)
    heads = next(g for g in pruner.graph.groups if g.root == "conv")
    heads.zero_([1, 3])      # the two heads a cut removes carry nothing: the output stays the same
    before = m(*inputs)
    pruner.step(plan={heads.id: [1, 3]})
    assert (m.conv.heads, m.conv.out_channels) == (2, 8)
    assert m.conv.lin_query.weight.shape == (16, 12) and m.conv.lin_skip.weight.shape == (16, 12)
    assert m.conv.lin_beta.weight.shape == (1, 48) and m.head.weight.shape == (3, 16)
    torch.testing.assert_close(m(*inputs), before, rtol=1e-5, atol=1e-6)


def test_averaged_heads_and_head_dims_are_refused_with_the_reason():
    torch.manual_seed(0)
    m = Net(concat=False).eval()
    g = eg.trace(m, (X, EDGES, EDGE_ATTR), ignored_layers=[m.head])
    assert [q.root for q in g.groups] == ["inp"] and "averages its heads" in g.skipped[0].reason
    m = Net().eval()
    g = eg.trace(m, (X, EDGES, EDGE_ATTR), ignored_layers=[m.head], attention_units="head_dims")
    assert [q.root for q in g.groups] == ["inp"] and "1/sqrt(out_channels)" in g.skipped[0].reason
