"""EmbeddingHandler: a unit is one embedding feature (a column of the table)."""
import torch
from torch import nn

import etp_graph as eg


def test_embedding_feature_group_prunes_columns():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 3))
    w = net[0].weight.detach().clone()
    (g,) = eg.trace(net, torch.tensor([[1, 2, 3]]), ignored_layers=[net[1]]).groups
    assert (g.root, g.size) == ("0", 6)
    g.prune([2])
    assert net[0].embedding_dim == 5 and torch.equal(net[0].weight, w[:, [0, 1, 3, 4, 5]])
