"""Convolutions: Conv1d/2d/3d and ConvTranspose1d/2d/3d, plain, grouped and depthwise.

Weight layouts: ``Conv`` is ``[out, in/groups, *k]``; ``ConvTranspose`` is ``[in, out/groups, *k]``.
A grouped convolution must lose the same position in every group, so its channels carry a
``period`` (channels per group); a depthwise convolution (``groups == in == out``) removes whole
groups, its input channel with its output channel.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch.nn.functional as F
from torch import nn

from .base import LayerHandler, TensorSlice, modulo, register_handler


_CONV_FUNCS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
_CONV_DEFAULTS = {"stride": 1, "padding": 0, "dilation": 1}


def _as_tuple(v, n: int):
    return v if isinstance(v, str) else tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _is_depthwise(m: nn.modules.conv._ConvNd) -> bool:
    return m.groups > 1 and m.groups == m.in_channels == m.out_channels


@register_handler
class ConvHandler(LayerHandler):
    module_types = (nn.modules.conv._ConvNd,)
    can_root = True

    def own_call(self, m, func, given):
        # F.conv2d with the layer's weight, bias, stride, padding, dilation and groups (zero padding)
        cls = next((c for c in _CONV_FUNCS if type(m).forward is c.forward and isinstance(m, c)), None)
        if cls is None or func is not _CONV_FUNCS[cls] or m.padding_mode != "zeros" or \
                given.get("weight") is not m.weight or given.get("bias") is not m.bias:
            return False
        n = m.weight.dim() - 2
        return given.get("groups", 1) == m.groups and all(
            _as_tuple(given.get(k, d), n) == _as_tuple(getattr(m, k), n) for k, d in _CONV_DEFAULTS.items())

    def traced_as_leaf(self, m) -> bool:
        # a circular/reflect/replicate pad is a copy-slice graph the backend never finishes walking
        return m.padding_mode != "zeros"

    def unsupported(self, m, role, units: str = "heads"):
        if m.groups > 1 and not _is_depthwise(m) and m.in_channels == m.groups:
            return (f"{type(m).__name__} with groups == in_channels ({m.groups}) but out_channels "
                    f"{m.out_channels}: a depthwise multiplier ties one input channel to "
                    f"{m.out_channels // m.groups} output channels; not supported")
        return None

    def slices(self, m, role, units: str = "heads") -> List[TensorSlice]:
        g = m.groups
        bias = [TensorSlice("bias", 0)] if m.bias is not None else []
        if _is_depthwise(m):
            # One channel = one group: its weight row and bias; input and output coincide.
            return [TensorSlice("weight", 0)] + bias if role == "out" else []
        out_dim, in_dim = (1, 0) if m.transposed else (0, 1)
        if role == "out":
            if m.transposed and g > 1:
                return [TensorSlice("weight", out_dim, modulo(m.out_channels // g))] + bias
            return [TensorSlice("weight", out_dim)] + bias
        if not m.transposed and g > 1:
            return [TensorSlice("weight", in_dim, modulo(m.in_channels // g))]
        return [TensorSlice("weight", in_dim)]

    def period(self, m, role, units: str = "heads") -> Optional[int]:
        if m.groups == 1 or _is_depthwise(m):
            return None
        return (m.out_channels if role == "out" else m.in_channels) // m.groups

    def refresh(self, m, removed: Dict[str, int]) -> None:
        w = m.weight
        if _is_depthwise(m):
            m.groups = w.shape[0]
            m.in_channels = m.out_channels = w.shape[0]
        elif m.transposed:
            m.in_channels, m.out_channels = w.shape[0], w.shape[1] * m.groups
        else:
            m.out_channels, m.in_channels = w.shape[0], w.shape[1] * m.groups

    def num_channels(self, m, role):
        return m.out_channels if role == "out" else m.in_channels
