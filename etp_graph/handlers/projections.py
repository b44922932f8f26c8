"""Attention with separate q/k/v projections whose forward reads the sizes it is given:
Hugging Face BERT-style blocks and Informer / Time-Series-Library ``AttentionLayer``. Only their
bookkeeping changes after a cut (see :mod:`.attention` for the anatomy and the unit kinds)."""
from __future__ import annotations

import math

from torch import nn

from .base import TensorSlice, register_handler
from .heads import HeadedAttention, Layout, fit_linears, get_dotted

__all__ = ["BertAttentionHandler", "ProjectionAttentionHandler"]


# ---------------------------------------------------- Hugging Face BERT-style attention
@register_handler
class BertAttentionHandler(HeadedAttention):
    """``BertAttention``-shaped blocks (BERT, RoBERTa, MiniLM …): ``self.query/key/value`` →
    heads → ``output.dense`` → ``output.LayerNorm(dense + input)``. The hidden residual inside
    ties input channel ``c`` to output channel ``c``: one role. The forward infers the head count
    (``view(…, -1, attention_head_size)``) and keeps ``scaling``, so only the sizes change."""

    module_types = ()
    couples_in_out = True
    exact_when_masked = False   # the LayerNorm over the hidden width

    def matches(self, m):
        s, o = getattr(m, "self", None), getattr(m, "output", None)
        return (isinstance(s, nn.Module) and isinstance(o, nn.Module)
                and all(isinstance(getattr(s, n, None), nn.Linear) for n in ("query", "key", "value"))
                and isinstance(getattr(s, "num_attention_heads", None), int)
                and isinstance(getattr(s, "attention_head_size", None), int)
                and isinstance(getattr(o, "dense", None), nn.Linear)
                and isinstance(getattr(o, "LayerNorm", None), nn.LayerNorm))

    def observe(self, m, args, kwargs, output):
        m._etp_cross = kwargs.get("encoder_hidden_states") is not None

    def unsupported(self, m, role, units: str = "heads"):
        if getattr(m, "_etp_cross", False):
            return f"{type(m).__name__} is used as cross attention; its hidden width is not pruned through it"
        return None

    def layout(self, m):
        s = m.self
        return Layout(s.num_attention_heads, s.attention_head_size,
                       tuple((f"self.{n}.weight", f"self.{n}.bias", 0) for n in ("query", "key", "value")),
                       "output.dense.weight")

    def slices(self, m, role, units: str = "heads"):
        out = [TensorSlice(f"self.{n}.weight", 1) for n in ("query", "key", "value")]
        out += [TensorSlice("output.dense.weight", 0)]
        for n in ("output.dense.bias", "output.LayerNorm.weight", "output.LayerNorm.bias"):
            if get_dotted(m, n) is not None:
                out.append(TensorSlice(n, 0))
        return out

    def set_sizes(self, m, heads, head_dim):
        s = m.self
        s.num_attention_heads, s.attention_head_size = heads, head_dim
        s.all_head_size = heads * head_dim
        fit_linears(m, ["self.query", "self.key", "self.value", "output.dense"])
        m.output.LayerNorm.normalized_shape = (m.output.LayerNorm.weight.shape[0],)

    def num_channels(self, m, role):
        return m.output.dense.out_features


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


