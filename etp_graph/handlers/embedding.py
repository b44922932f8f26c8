"""``nn.Embedding``: ``weight [num_embeddings, embedding_dim]``; units are embedding features."""
from __future__ import annotations

from torch import nn

from .base import LayerHandler, TensorSlice, register_handler


@register_handler
class EmbeddingHandler(LayerHandler):
    module_types = (nn.Embedding,)
    can_root = True
    channel_last = True

    def slices(self, m, role, units: str = "heads"):
        return [TensorSlice("weight", 1)] if role == "out" else []

    def refresh(self, m, removed):
        m.embedding_dim = m.weight.shape[1]

    def num_channels(self, m, role):
        return m.embedding_dim if role == "out" else None
