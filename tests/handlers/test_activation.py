"""PReLUHandler: a per-channel slope is a slice of the unit; a shared slope is not."""
import torch
from torch import nn

import etp_graph as eg
from etp_graph.handlers import get_handler


def test_per_channel_slope_is_cut_and_shared_slope_kept():
    assert get_handler(nn.PReLU()).slices(nn.PReLU(), "out") == []
    net = nn.Sequential(nn.Conv2d(3, 5, 1), nn.PReLU(5), nn.Conv2d(5, 2, 1))
    with torch.no_grad():
        net[1].weight.copy_(torch.arange(5.0))
    (g,) = eg.trace(net, torch.randn(1, 3, 2, 2), ignored_layers=[net[2]]).groups
    g.prune([0, 3])
    assert net[1].num_parameters == 3 and net[1].weight.tolist() == [1.0, 2.0, 4.0]
