"""``nn.MultiheadAttention``.

Its forward ties the width of its input to the width of its q/k/v projections (``embed_dim``
for both, ``head_dim = embed_dim // num_heads``), so an input channel cannot be removed without
removing an inner dimension that is not coupled to it, and the softmax scale would change too.
Groups that reach it through its input or output are therefore refused with that reason.
"""
from __future__ import annotations

from torch import nn

from .base import LayerHandler, register_handler


@register_handler
class MultiheadAttentionHandler(LayerHandler):
    module_types = (nn.MultiheadAttention,)
    channel_last = True

    def unsupported(self, m, role):
        return ("nn.MultiheadAttention ties its input width to its q/k/v width (embed_dim); "
                "removing embedding channels would change head_dim and the softmax scale, so the "
                "output would differ from masking")

    def slices(self, m, role):
        return []

    def num_channels(self, m, role):
        return m.embed_dim
