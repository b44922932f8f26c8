"""Hugging Face ``Conv1D`` (GPT-2, GPT, …): a Linear with its weight stored transposed,
``weight [in, out]`` (``nx × nf``), ``y = x @ W + b``, channels on the last dimension.

Matched by type without importing transformers: a ``Conv1D`` instance means
``transformers.pytorch_utils`` is imported already (transformers is the optional extra
``etp-graph[hf]``). The backend does not know the layer (it would see its ``addmm`` as an
element-wise op and let channels pass through), so it gets a leaf adapter.
"""
from __future__ import annotations

import sys

from torch import nn

from .base import LayerHandler, TensorSlice, register_handler


def _is_conv1d(m: nn.Module) -> bool:
    utils = sys.modules.get("transformers.pytorch_utils")
    return utils is not None and isinstance(m, getattr(utils, "Conv1D", ()))


@register_handler
class HFConv1DHandler(LayerHandler):
    module_types = ()
    can_root = True
    channel_last = True
    backend_lacks = True

    def matches(self, m: nn.Module) -> bool:
        return _is_conv1d(m)

    def slices(self, m, role, units: str = "heads"):
        if role == "out":
            return [TensorSlice("weight", 1)] + ([TensorSlice("bias", 0)] if m.bias is not None else [])
        return [TensorSlice("weight", 0)]

    def refresh(self, m, removed):
        m.nx, m.nf = m.weight.shape   # the forward reads nf for the output's shape

    def num_channels(self, m, role):
        return m.weight.shape[1] if role == "out" else m.weight.shape[0]
