"""Attention with separate q/k/v projections whose forward reads the sizes it is given: the
Informer / Time-Series-Library ``AttentionLayer`` (its ProbSparse inner attention samples keys
at random, which the trace cannot follow). Only its bookkeeping changes after a cut (see
:mod:`.attention` for the anatomy and the unit kinds).

Hugging Face attention (BERT, RoBERTa, MiniLM, GPT-2, LLaMA, ViT, T5, DistilBERT …) has no
handler: its heads are found from the trace (:mod:`etp_graph.graph.discover`)."""
from __future__ import annotations

import math

from torch import nn

from .base import TensorSlice, register_handler
from .heads import HeadedAttention, Layout, fit_linears

__all__ = ["ProjectionAttentionHandler"]


# ------------------------------------------- Informer / Time-Series-Library AttentionLayer
@register_handler
class ProjectionAttentionHandler(HeadedAttention):
    """``AttentionLayer(inner_attention, d_model, n_heads)`` of Informer and the Time-Series-Library:
    ``query/key/value_projection`` → ``view(B, L, H, -1)`` → ``inner_attention`` →
    ``out_projection``. The inner attention's ``scale`` is pinned to the unpruned ``1/√d`` before
    head dimensions are cut. ``mix=True`` (heads interleaved with positions) is refused."""

    module_types = ()
    _NAMES = ("query_projection", "key_projection", "value_projection", "out_projection")

    def matches(self, m):
        return (all(isinstance(getattr(m, n, None), nn.Linear) for n in self._NAMES)
                and isinstance(getattr(m, "n_heads", None), int)
                and isinstance(getattr(m, "inner_attention", None), nn.Module))

    def layout(self, m):
        H = m.n_heads
        d = m.value_projection.out_features // H
        return Layout(H, d, tuple((f"{n}.weight", f"{n}.bias", 0) for n in self._NAMES[:3]), "out_projection.weight")

    def heads_refused(self, m):
        if getattr(m, "mix", False):
            return (f"{type(m).__name__}(mix=True) interleaves heads with time steps in its output, "
                    "so a removed head shifts every later position; its heads are not prunable")
        if m.query_projection.out_features != m.value_projection.out_features:
            return "query and value projections have different widths (d_keys != d_values)"
        return None

    def slices(self, m, role, units: str = "heads"):
        if role == "in":
            return [TensorSlice(f"{n}.weight", 1) for n in self._NAMES[:3]]
        out = [TensorSlice("out_projection.weight", 0)]
        return out + ([TensorSlice("out_projection.bias", 0)] if m.out_projection.bias is not None else [])

    def set_sizes(self, m, heads, head_dim):
        inner = m.inner_attention
        if getattr(inner, "scale", 1) is None:
            inner.scale = 1.0 / math.sqrt(self.layout(m).head_dim)
        m.n_heads = heads
        fit_linears(m, list(self._NAMES))

    def num_channels(self, m, role):
        return m.out_projection.out_features if role == "out" else m.query_projection.in_features


