"""Tiny models, one per layer family, for tests (seconds to trace, prune and verify)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model

_g = lambda: torch.Generator().manual_seed(0)  # noqa: E731


def _img(c=3, s=8, n=2):
    return lambda: torch.randn(n, c, s, s, generator=_g())


def _seq(c=6, L=5, n=2):
    return lambda: torch.randn(n, L, c, generator=_g())


@register_model("tiny_cnn", _img(), heads=lambda m: [m.fc], tags=("tiny",))
class TinyCNN(nn.Module):
    """Conv → BN → ReLU → Conv → BN → PReLU → flatten → Linear → Linear (head)."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.BatchNorm2d(12)
        self.act = nn.PReLU(12)
        self.hidden, self.fc = nn.Linear(12 * 4 * 4, 16), nn.Linear(16, 4)

    def forward(self, x):
        x = self.act(self.b2(self.c2(F.relu(self.b1(self.c1(x))))))
        return self.fc(F.relu(self.hidden(x.flatten(1))))


@register_model("tiny_resnet_a", _img(s=16), heads=lambda m: [m.fc], tags=("tiny",))
class TinyResNetA(nn.Module):
    """Residual adds with the option-A channel-pad shortcut (``F.pad`` on dim 1)."""

    def __init__(self):
        super().__init__()
        from .resnet_cifar import BasicBlock
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.b1, self.b2, self.b3 = BasicBlock(8, 8), BasicBlock(8, 16, 2), BasicBlock(16, 16)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = self.b3(self.b2(self.b1(F.relu(self.bn(self.stem(x))))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@register_model("tiny_concat", _img(s=4), heads=lambda m: [m.fc], tags=("tiny",))
class TinyConcat(nn.Module):
    """Concat of concats, then flatten → Linear."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 1), nn.Conv2d(3, 5, 1)
        self.mix = nn.Conv2d(10, 7, 1)
        self.fc = nn.Linear((7 + 5) * 16, 3)

    def forward(self, x):
        ab = torch.cat([self.a(x), self.b(x)], 1)
        y = torch.cat([F.relu(self.mix(ab)), self.c(x)], dim=1)
        return self.fc(y.flatten(1))


@register_model("tiny_glu", _seq(), heads=lambda m: [m.out], tags=("tiny",))
class TinyGLU(nn.Module):
    """``chunk`` into a GLU's halves (paired units) and a ``split`` with unequal parts."""

    def __init__(self):
        super().__init__()
        self.proj, self.out = nn.Linear(6, 16), nn.Linear(8 + 3, 2)
        self.side = nn.Linear(6, 7)
        self.mid = nn.Linear(4, 3)

    def forward(self, x):
        u, v = self.proj(x).chunk(2, dim=-1)
        a, b = self.side(x).split([4, 3], dim=-1)
        return self.out(torch.cat([u * torch.sigmoid(v), self.mid(a) + b], -1))


@register_model("tiny_conv1d_pads", lambda: torch.randn(2, 3, 12, generator=_g()), heads=lambda m: [m.head],
                tags=("tiny",))
class TinyConv1dPads(nn.Module):
    """Conv1d with every padding mode, BatchNorm1d, GroupNorm, then a mean over time."""

    def __init__(self):
        super().__init__()
        self.z = nn.Conv1d(3, 8, 3, padding=1)
        self.c = nn.Conv1d(8, 8, 3, padding=1, padding_mode="circular")
        self.bn = nn.BatchNorm1d(8)
        self.r = nn.Conv1d(8, 6, 3, padding=1, padding_mode="reflect")
        self.p = nn.Conv1d(6, 6, 3, padding=2, padding_mode="replicate", dilation=2)
        self.gn = nn.GroupNorm(2, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        x = self.bn(self.c(F.relu(self.z(x))))
        x = self.gn(self.p(F.relu(self.r(x))))
        return self.head(x.mean(-1))


@register_model("tiny_grouped", _img(), heads=lambda m: [m.head], tags=("tiny",))
class TinyGrouped(nn.Module):
    """Grouped conv, depthwise conv, ConvTranspose2d (plain and grouped), InstanceNorm."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(8, 12, 3, padding=1, groups=4)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.inorm = nn.InstanceNorm2d(12, affine=True)
        self.up = nn.ConvTranspose2d(12, 8, 2, stride=2)
        self.upg = nn.ConvTranspose2d(8, 6, 3, padding=1, groups=2)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        x = self.inorm(self.dw(F.relu(self.g(self.a(x)))))
        return self.head(F.relu(self.upg(F.relu(self.up(x)))))


@register_model("tiny_shuffle", _img(), heads=lambda m: [m.head], tags=("tiny",))
class TinyShuffle(nn.Module):
    """A ShuffleNet channel shuffle (view → transpose → reshape) between grouped convs."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1, groups=1)
        self.b = nn.Conv2d(8, 8, 1, groups=2)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.a(x)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.head(F.relu(self.b(y)))


@register_model("tiny_tokens", _img(c=3, s=8), heads=lambda m: [m.head], tags=("tiny",))
class TinyTokens(nn.Module):
    """Conv patches → flatten(2) → transpose → Linear → LayerNorm → permute back → Conv1d."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.mlp = nn.Linear(8, 12)
        self.ln = nn.LayerNorm(12)
        self.conv = nn.Conv1d(12, 6, 1)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)        # (B, L, 8)
        t = self.ln(F.gelu(self.mlp(t)))                    # (B, L, 12)
        return self.head(self.conv(t.permute(0, 2, 1)).mean(-1))


@register_model("tiny_param_scale", _img(), heads=lambda m: [m.head], tags=("tiny",))
class TinyParamScale(nn.Module):
    """A free ``nn.Parameter`` used as a per-channel scale (layer-scale)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, 8).view(1, 8, 1, 1))
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(F.relu(self.a(x)) * self.gamma)


@register_model("tiny_lstm", lambda: torch.randint(0, 20, (2, 6), generator=_g()), heads=lambda m: [m.head],
                tags=("tiny",))
class TinyLSTM(nn.Module):
    """Embedding → 2-layer LSTM → last step → Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.rnn = nn.LSTM(8, 10, num_layers=2, batch_first=True)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        y, _ = self.rnn(self.emb(x))
        return self.head(y[:, -1])


@register_model("tiny_gru", _seq(), heads=lambda m: [m.head], tags=("tiny",))
class TinyGRU(nn.Module):
    """Linear → bidirectional GRU → mean over time → Linear."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.rnn = nn.GRU(8, 5, batch_first=True, bidirectional=True)
        self.head = nn.Linear(10, 2)

    def forward(self, x):
        y, _ = self.rnn(F.relu(self.inp(x)))
        return self.head(y.mean(1))


@register_model("tiny_mha", _seq(), heads=lambda m: [m.head], tags=("tiny",))
class TinyMHA(nn.Module):
    """A bare ``nn.MultiheadAttention`` between Linear layers."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.att = nn.MultiheadAttention(16, 4, batch_first=True)
        self.ffn = nn.Linear(16, 12)
        self.head = nn.Linear(12, 2)

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.att(h, h, h)
        return self.head(F.relu(self.ffn(a + h)))


@register_model("tiny_transformer", _seq(), heads=lambda m: [m.head], tags=("tiny",))
class TinyTransformer(nn.Module):
    """``nn.TransformerEncoderLayer`` (MHA + FFN + LayerNorms)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.enc = nn.TransformerEncoderLayer(16, 4, 24, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.enc(self.inp(x)).mean(1))


@register_model("tiny_shared", _seq(), heads=lambda m: [m.h1, m.h2], tags=("tiny",))
class TinyShared(nn.Module):
    """A module called twice (shared weights), a dict of two outputs from two heads."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 10)
        self.shared = nn.Linear(10, 10)
        self.body = nn.Linear(10, 8)
        self.h1, self.h2 = nn.Linear(8, 2), nn.Linear(8, 3)

    def forward(self, x):
        z = F.relu(self.inp(x))
        z = self.body(F.relu(self.shared(F.relu(self.shared(z)))))
        return {"a": self.h1(z), "b": self.h2(F.relu(z))}


def _conv_bn(cin, cout, k=1, stride=1, groups=1, relu=True):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


class _SplitShuffleBlock(nn.Module):
    """ShuffleNet v2's unit (Ma et al., 2018): stride 1 splits the channels in halves, one half
    passes, the other goes through 1×1 → depthwise 3×3 → 1×1; stride 2 feeds the whole input to
    both branches. The halves are concatenated and shuffled (two groups)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.stride, half = stride, cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(_conv_bn(cin, cin, 3, stride, groups=cin, relu=False), _conv_bn(cin, half))
        self.branch2 = nn.Sequential(_conv_bn(cin if stride > 1 else half, half),
                                     _conv_bn(half, half, 3, stride, groups=half, relu=False), _conv_bn(half, half))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        n, c, h, w = out.shape
        return out.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


@register_model("tiny_shufflenet_v2", _img(s=16), heads=lambda m: [m.fc], tags=("tiny",))
class TinyShuffleNetV2(nn.Module):
    """A stem, one ShuffleNet v2 stage (a stride-2 unit, ``blocks - 1`` stride-1 units), a 1×1
    conv, a head."""

    def __init__(self, blocks: int = 3):
        super().__init__()
        self.stem = _conv_bn(3, 8, 3, 2)
        self.stage = nn.Sequential(_SplitShuffleBlock(8, 16, 2), *[_SplitShuffleBlock(16, 16, 1)
                                                                   for _ in range(blocks - 1)])
        self.conv5 = _conv_bn(16, 32)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc(self.conv5(self.stage(self.stem(x))).mean((2, 3)))


@register_model("tiny_shufflenet_v2_deep", _img(s=16), heads=lambda m: [m.fc], tags=("tiny",))
def tiny_shufflenet_v2_deep() -> TinyShuffleNetV2:
    """:class:`TinyShuffleNetV2` with six units of width 16 in its stage: too deep for any balanced
    cut, so the stage's width is an ordered group whose cuts re-arrange the channels."""
    return TinyShuffleNetV2(blocks=6)
