"""LinearHandler: rows (and bias) for output units, columns for input units."""
import torch
from torch import nn

import etp_graph as eg
from etp_graph.handlers import get_handler


def test_slices_and_refresh():
    m = nn.Linear(5, 7)
    h = get_handler(m)
    assert [(s.attr, s.dim) for s in h.slices(m, "out")] == [("weight", 0), ("bias", 0)]
    assert [(s.attr, s.dim) for s in h.slices(m, "in")] == [("weight", 1)]
    assert [(s.attr, s.dim) for s in h.slices(nn.Linear(5, 7, bias=False), "out")] == [("weight", 0)]


def test_prune_keeps_rows_columns_and_features():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    w0, w1 = net[0].weight.detach().clone(), net[2].weight.detach().clone()
    (g,) = eg.trace(net, torch.randn(2, 5), ignored_layers=[net[2]]).groups
    g.prune([0, 4])
    keep = [1, 2, 3, 5, 6]
    assert (net[0].out_features, net[2].in_features) == (5, 5)
    assert torch.equal(net[0].weight, w0[keep]) and torch.equal(net[2].weight, w1[:, keep])
