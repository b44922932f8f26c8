"""``nn.Linear`` (and subclasses such as ``NonDynamicallyQuantizableLinear``): ``weight [out, in]``;
PyG's ``torch_geometric.nn.Linear`` (GCN, GraphSAGE, TransformerConv, … project with it): the same
layout, a module of its own that calls ``F.linear``."""
from __future__ import annotations

import sys

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
        return type(m).forward is nn.Linear.forward and _its_linear(m, func, given)

    def refresh(self, m, removed):
        m.out_features, m.in_features = m.weight.shape

    def num_channels(self, m, role):
        return m.out_features if role == "out" else m.in_features


def _its_linear(m: nn.Module, func, given) -> bool:
    """``func(**given)`` is ``F.linear`` of ``m``'s own weight and bias."""
    return (func is F.linear and set(given) <= {"input", "weight", "bias"}
            and given.get("weight") is m.weight and given.get("bias") is m.bias)


def _is_pyg_linear(m: nn.Module) -> bool:
    linear = sys.modules.get("torch_geometric.nn.dense.linear")   # imported already where one exists
    return linear is not None and type(m) is getattr(linear, "Linear", None)


@register_handler
class PyGLinearHandler(LinearHandler):
    """``torch_geometric.nn.Linear``: ``weight [out, in]`` as ``nn.Linear``. The backend does not
    know the module (it would see its ``mm`` as an element-wise op), so it gets a leaf adapter."""
    module_types = ()
    backend_lacks = True

    def matches(self, m: nn.Module) -> bool:
        return _is_pyg_linear(m)

    def own_call(self, m, func, given):
        # its forward is ``F.linear(x, self.weight, self.bias)`` (matched by exact type): ChebConv
        # and TAGConv call ``lin.forward(x)``, which no module hook sees
        return _its_linear(m, func, given)

    def refresh(self, m, removed):
        m.out_channels, m.in_channels = m.weight.shape

    def num_channels(self, m, role):
        return m.weight.shape[0] if role == "out" else m.weight.shape[1]
