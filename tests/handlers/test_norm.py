"""Norm handlers: BatchNorm/InstanceNorm exact with running stats; LayerNorm/GroupNorm by shape."""
import torch
from torch import nn

import etp_graph as eg
from etp_graph.handlers import get_handler


def test_exactness_and_slices():
    bn, ln, gn = nn.BatchNorm2d(4), nn.LayerNorm(6), nn.GroupNorm(2, 6)
    assert get_handler(bn).exact_when_masked and not get_handler(ln).exact_when_masked
    assert not get_handler(gn).exact_when_masked and get_handler(gn).period(gn, "out") == 3
    assert {s.attr for s in get_handler(bn).slices(bn, "out")} == {"weight", "bias", "running_mean", "running_var"}
    assert get_handler(nn.LayerNorm(6, elementwise_affine=False)).slices(nn.LayerNorm(6, elementwise_affine=False), "out") == []


def test_batchnorm_running_stats_are_cut():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    net[1].running_mean.copy_(torch.arange(4.0))
    (g,) = eg.trace(net, torch.randn(2, 3, 3, 3), ignored_layers=[net[2]]).groups
    g.prune([1])
    assert net[1].num_features == 3 and net[1].running_mean.tolist() == [0.0, 2.0, 3.0]


def test_layernorm_and_groupnorm_groups_are_shape_checked():
    net = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 6), nn.GroupNorm(2, 6), nn.Linear(6, 2))
    g = eg.trace(net, torch.randn(3, 4), ignored_layers=[net[4]])
    assert [(q.root, q.size, q.exact) for q in g.groups] == [("0", 6, False), ("2", 3, False)]
    g.groups[0].prune([0])
    g.groups[1].prune([2])
    assert net[1].normalized_shape == (5,) and net[3].num_channels == 4 and net(torch.randn(3, 4)).shape == (3, 2)
