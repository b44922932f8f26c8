"""Normalisation layers. Input and output channels coincide (``role`` is irrelevant).

BatchNorm and InstanceNorm normalise each channel alone, so a masked channel equals a removed
one. LayerNorm (over the pruned last dimension) and GroupNorm share statistics across channels:
removing a channel changes the others' output, so their groups are checked by shape only.
"""
from __future__ import annotations

from torch import nn

from .base import LayerHandler, TensorSlice, register_handler


def _affine(m, *names):
    return [TensorSlice(n, 0) for n in names if getattr(m, n, None) is not None]


@register_handler
class BatchNormHandler(LayerHandler):
    module_types = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)

    def slices(self, m, role, units: str = "heads"):
        return _affine(m, "weight", "bias", "running_mean", "running_var")

    def refresh(self, m, removed):
        m.num_features -= removed.get("out", removed.get("in", 0))

    def num_channels(self, m, role):
        return m.num_features


@register_handler
class LayerNormHandler(LayerHandler):
    module_types = (nn.LayerNorm, nn.RMSNorm)
    exact_when_masked = False
    channel_last = True

    def slices(self, m, role, units: str = "heads"):
        if getattr(m, "weight", None) is None:
            return []
        last = m.weight.dim() - 1
        return [TensorSlice(n, last) for n in ("weight", "bias") if getattr(m, n, None) is not None]

    def refresh(self, m, removed):
        n = removed.get("out", removed.get("in", 0))
        shape = tuple(m.normalized_shape)
        m.normalized_shape = shape[:-1] + (shape[-1] - n,)

    def num_channels(self, m, role):
        return m.normalized_shape[-1]


@register_handler
class GroupNormHandler(LayerHandler):
    module_types = (nn.GroupNorm,)
    exact_when_masked = False

    def slices(self, m, role, units: str = "heads"):
        return _affine(m, "weight", "bias")

    def period(self, m, role, units: str = "heads"):
        return m.num_channels // m.num_groups if m.num_groups > 1 else None

    def refresh(self, m, removed):
        m.num_channels -= removed.get("out", removed.get("in", 0))

    def num_channels(self, m, role):
        return m.num_channels
