"""CIFAR ResNet-20/32/44/56 (He et al. 2016), option-A shortcut: the layout of the pretrained
weights in ``../shared/data/cifar10_resnet_pretrained`` (akamaster/pytorch_resnet_cifar10).

The option-A shortcut subsamples and zero-pads the channel dimension (``F.pad`` on dim 1); the
tracer maps it as a concat with zeros, and the padded channels, which no tensor owns, stay.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model

__all__ = ["ResNetCifar", "resnet_cifar", "load_pretrained", "default_weights_dir"]


class ChannelPadShortcut(nn.Module):
    """``x[:, :, ::2, ::2]`` zero-padded by ``pad`` channels on each side."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = ChannelPadShortcut(planes // 4)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    def __init__(self, depth: int = 56, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(BasicBlock(in_planes, planes, s))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def default_weights_dir() -> Path:
    """``$ETP_GRAPH_WEIGHTS``, else ``$ETP_GRAPH_DATA/cifar10_resnet_pretrained``; or pass
    ``weights=`` to :func:`load_pretrained`."""
    env = os.environ.get("ETP_GRAPH_WEIGHTS")
    if env:
        return Path(env)
    data = os.environ.get("ETP_GRAPH_DATA")
    if data:
        return Path(data) / "cifar10_resnet_pretrained"
    raise FileNotFoundError("no pretrained CIFAR ResNet folder: set ETP_GRAPH_WEIGHTS to the folder of "
                            "akamaster's resnet*-*.th files (or ETP_GRAPH_DATA to a folder holding "
                            "cifar10_resnet_pretrained/), or pass weights=PATH")


def load_pretrained(model: ResNetCifar, depth: int, weights: Optional[Union[str, Path]] = None) -> ResNetCifar:
    """Load akamaster's checkpoint (``{'state_dict': {'module.…': …}}``) into ``model``."""
    path = Path(weights) if weights is not None else None
    if path is None or path.is_dir():
        folder = path or default_weights_dir()
        found = sorted(folder.glob(f"resnet{depth}-*.th")) if folder.is_dir() else []
        if not found:
            raise FileNotFoundError(
                f"no pretrained ResNet-{depth} checkpoint (resnet{depth}-*.th) in {folder}; put the "
                "akamaster/pytorch_resnet_cifar10 file there or set ETP_GRAPH_WEIGHTS to its folder")
        path = found[0]
    state = torch.load(path, map_location="cpu", weights_only=False)
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model.load_state_dict(state)
    return model


def resnet_cifar(depth: int = 56, num_classes: int = 10, pretrained: bool = False,
                 weights: Optional[Union[str, Path]] = None) -> ResNetCifar:
    model = ResNetCifar(depth, num_classes)
    if pretrained:
        load_pretrained(model, depth, weights)
    return model


def _inputs():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


for _d in (20, 32, 44, 56):
    register_model(f"resnet{_d}_cifar", _inputs, heads=lambda m: [m.linear], tags=("cifar",))(
        lambda pretrained=False, num_classes=10, weights=None, _d=_d:
        resnet_cifar(_d, num_classes, pretrained, weights))
