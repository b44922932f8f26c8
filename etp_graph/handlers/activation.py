"""Activations with per-channel parameters: ``nn.PReLU(num_parameters=C)``."""
from __future__ import annotations

from torch import nn

from .base import LayerHandler, TensorSlice, register_handler


@register_handler
class PReLUHandler(LayerHandler):
    module_types = (nn.PReLU,)

    def slices(self, m, role, units: str = "heads"):
        return [TensorSlice("weight", 0)] if m.num_parameters > 1 else []

    def refresh(self, m, removed):
        m.num_parameters = m.weight.shape[0]

    def num_channels(self, m, role):
        return m.num_parameters if m.num_parameters > 1 else None
