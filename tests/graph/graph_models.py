"""Small models shared by the tests of etp_graph.graph."""
import torch
from torch import nn

from etp_graph.zoo.tiny import _SplitShuffleBlock, _conv_bn


def chain():
    """conv → BN → ReLU → conv → ReLU → flatten → Linear head, on 8×8 inputs (``X8``)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3),
                         nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5)).eval()


def small():
    """conv → BN → ReLU → 1×1 conv, on 6×6 inputs (``X6``)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()


X8 = torch.randn(2, 3, 8, 8)
X6 = torch.randn(1, 3, 6, 6)


def snapshot(m, x=X6):
    return {k: v.clone() for k, v in m.state_dict().items()}, m(x).detach()


def assert_unchanged(m, snap, x=X6):
    state, out = snap
    now = m.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert torch.equal(m(x), out)


def partition(x, p: int, grid: bool):
    """MaxViT's window partition of ``(B, C, H, W)`` into ``(B, windows, p·p, C)`` (torchvision's
    ``maxvit.py``), with the grid's swap of the two middle dims."""
    b, c, h, w = x.shape
    t = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, h * w // p // p, p * p, c)
    return t.transpose(-2, -3) if grid else t


def departition(t, shape, p: int, grid: bool):
    """The inverse of :func:`partition` back to ``shape``."""
    b, c, h, w = shape
    t = t.transpose(-2, -3) if grid else t
    return t.reshape(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)


class DeepStage(nn.Module):
    """A ShuffleNet v2 stage of ``blocks`` split-shuffle units of width 16 (eight: no subset keeps every
    chunk balanced), with BatchNorms that do something unless ``plain``."""

    def __init__(self, blocks=8, plain=False):
        super().__init__()
        torch.manual_seed(0)
        self.stem = _conv_bn(3, 8, 3, 2)
        self.stage = nn.Sequential(_SplitShuffleBlock(8, 16, 2), *[_SplitShuffleBlock(16, 16, 1)
                                                                   for _ in range(blocks - 1)])
        self.fc = nn.Linear(16, 4)
        for m in [] if plain else self.modules():     # BatchNorms that do something (masked channels must still be zero)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2)
                nn.init.normal_(m.weight)
                nn.init.normal_(m.bias, 0, 0.5)

    def forward(self, x):
        return self.fc(self.stage(self.stem(x)).mean((2, 3)))
