"""``nn.Linear`` (and subclasses such as ``NonDynamicallyQuantizableLinear``): ``weight [out, in]``."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .base import LayerHandler, TensorSlice, register_handler


@register_handler
class LinearHandler(LayerHandler):
    module_types = (nn.Linear,)
    can_root = True
    channel_last = True

    def slices(self, m, role, units: str = "heads"):
        if role == "out":
            return [TensorSlice("weight", 0)] + ([TensorSlice("bias", 0)] if m.bias is not None else [])
        return [TensorSlice("weight", 1)]

    def own_call(self, m, func, given):
        return (func is F.linear and type(m).forward is nn.Linear.forward and set(given) <= {"input", "weight", "bias"}
                and given.get("weight") is m.weight and given.get("bias") is m.bias)

    def refresh(self, m, removed):
        m.out_features, m.in_features = m.weight.shape

    def num_channels(self, m, role):
        return m.out_features if role == "out" else m.in_features
