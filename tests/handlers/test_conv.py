"""ConvHandler: plain, grouped, depthwise and transposed weight layouts, every padding mode."""
import pytest
import torch
from torch import nn

import etp_graph as eg
from etp_graph.handlers import get_handler


def _slices(m, role):
    return [(s.attr, s.dim) for s in get_handler(m).slices(m, role)]


def test_layouts_and_periods():
    plain, grouped = nn.Conv2d(4, 6, 3), nn.Conv2d(4, 6, 3, groups=2)
    depthwise, transposed = nn.Conv2d(4, 4, 3, groups=4), nn.ConvTranspose2d(4, 6, 2, groups=2)
    assert _slices(plain, "out") == [("weight", 0), ("bias", 0)] and _slices(plain, "in") == [("weight", 1)]
    h = get_handler(grouped)
    assert (h.period(grouped, "out"), h.period(grouped, "in")) == (3, 2)
    # a grouped conv's input channels 0 and 2 read the same weight column (index c % 2)
    pos, idx = h.slices(grouped, "in")[0].index(torch.arange(4))
    assert idx.tolist() == [0, 1, 0, 1]
    assert _slices(depthwise, "in") == [] and get_handler(depthwise).period(depthwise, "out") is None
    assert _slices(transposed, "out")[0] == ("weight", 1) and _slices(transposed, "in") == [("weight", 0)]


def test_depthwise_multiplier_is_refused_with_reason():
    m = nn.Conv2d(4, 8, 3, groups=4)
    assert "depthwise multiplier" in get_handler(m).unsupported(m, "out")


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_every_padding_mode_prunes_and_updates_bookkeeping(mode):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(3, 8, 3, padding=1, padding_mode=mode), nn.ReLU(),
                        nn.Conv1d(8, 4, 3, padding=1, groups=2), nn.Conv1d(4, 2, 1))
    x = torch.randn(2, 3, 9)
    g = {x.root: x for x in eg.trace(net, x, ignored_layers=[net[3]]).groups}
    assert (g["0"].size, g["2"].size) == (4, 2)         # input period 4 of the grouped conv
    g["0"].prune([1, 3])
    assert (net[0].out_channels, net[2].in_channels, net[2].weight.shape[1]) == (4, 4, 2)
    assert net(x).shape == (2, 2, 9)


def test_depthwise_and_transposed_bookkeeping():
    net = nn.Sequential(nn.Conv2d(3, 6, 1), nn.Conv2d(6, 6, 3, padding=1, groups=6),
                        nn.ConvTranspose2d(6, 4, 2, stride=2), nn.Conv2d(4, 2, 1))
    x = torch.randn(1, 3, 4, 4)
    g = eg.trace(net, x, ignored_layers=[net[3]])
    first = [q for q in g.groups if q.root == "0"][0]
    first.prune([0, 5])
    assert (net[1].groups, net[1].in_channels, net[2].in_channels) == (4, 4, 4)
    assert net(x).shape == (1, 2, 8, 8)
