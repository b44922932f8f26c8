"""PyTorch Geometric ``GATConv`` and ``GATv2Conv``: heads and per-head channels as units.

``GATConv(in, C, heads=H)`` computes ``x' = lin(x).view(N, H, C)``, attention logits
``(x'·att_src).sum(-1)`` and ``(x'·att_dst).sum(-1)`` per head, and either concatenates the heads
(``concat=True``: ``H·C`` outputs, channel ``h·C + c``) or averages them (``concat=False``: ``C``).

Units, chosen per trace with ``attention_units`` (as for transformer attention):

* ``"heads"``: head ``h`` owns its ``C`` rows of ``lin`` (``lin_src``/``lin_dst``, ``lin_edge``),
  ``att_src[:, h]``, ``att_dst[:, h]`` (``att_edge``), and with ``concat=True`` its ``C`` entries
  of ``bias`` and of the residual ``res`` rows, and the next layer's ``C`` input columns. With
  ``concat=False`` heads are averaged, so removing one rescales the mean and cannot equal
  masking: those heads are reported in ``graph.skipped`` with that reason.
* ``"head_dims"``: channel ``c`` of every head, i.e. ``att_*[:, :, c]`` and the matching rows.

``GATv2Conv`` is the same family: its ``lin_l``/``lin_r`` (one module when ``share_weights``)
take the place of ``lin``, its single ``att`` the place of ``att_src``/``att_dst``; a channel
whose rows are zero adds ``leaky_relu(0)·att = 0`` to the logits, so both unit kinds are exact.

Pruning rewrites ``heads``/``out_channels``/``in_channels`` and the inner ``Linear`` sizes.
"""
from __future__ import annotations

import sys
from typing import List, Tuple

import torch
from torch import nn

from .base import InternalGroup, LayerHandler, TensorSlice, register_handler


def _is_gat(m: nn.Module) -> bool:
    """By type. A GATConv instance means torch_geometric is imported already, so this never
    imports it (torch_geometric is the optional extra ``etp-graph[pyg]``)."""
    conv = sys.modules.get("torch_geometric.nn.conv")
    return conv is not None and isinstance(m, (conv.GATConv, conv.GATv2Conv))


def _is_v2(m: nn.Module) -> bool:
    return hasattr(m, "lin_l") and hasattr(m, "att")


def _att_index(C: int, kind: str):
    """Output channel ``h·C + c`` → index ``h`` (heads) or ``c`` (head_dims) of ``att_*``."""
    def index(ch: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return torch.arange(len(ch)), (ch // C if kind == "heads" else ch % C)
    return index


def _every_head(H: int, C: int):
    """(concat=False) output channel ``c`` → rows ``h·C + c`` of every head."""
    def index(ch: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return torch.arange(len(ch)).repeat_interleave(H), (torch.arange(H).repeat(len(ch)) * C
                                                            + ch.repeat_interleave(H))
    return index


@register_handler
class GATConvHandler(LayerHandler):
    module_types = ()          # matched by type without importing torch_geometric (see _is_gat)
    can_root = True
    backend_lacks = True       # message passing is a leaf for the tracer

    def matches(self, m):
        return _is_gat(m)

    @staticmethod
    def _lins(m) -> List[str]:
        """The node-feature projections (``H·C`` rows each), each module once."""
        if _is_v2(m):
            return ["lin_l"] if m.lin_r is m.lin_l else ["lin_l", "lin_r"]
        return ["lin"] if m.lin is not None else ["lin_src", "lin_dst"]

    @staticmethod
    def _atts(m) -> List[str]:
        if _is_v2(m):
            return ["att"]
        return ["att_src", "att_dst"] + (["att_edge"] if m.lin_edge is not None else [])

    def unsupported(self, m, role, units: str = "heads"):
        if role == "in" and not isinstance(m.in_channels, int):
            return (f"a bipartite {type(m).__name__} (in_channels={m.in_channels}) reads two node sets; "
                    "its input width is not pruned")
        return None

    def slices(self, m, role, units: str = "heads"):
        if role == "in":
            out = [TensorSlice(f"{n}.weight", 1) for n in self._lins(m)]
            return out + ([TensorSlice("res.weight", 1)] if m.res is not None else [])
        H, C, kind = m.heads, m.out_channels, units
        rows = (lambda ch: (torch.arange(len(ch)), ch)) if m.concat else _every_head(H, C)
        if not m.concat:
            kind = "head_dims"    # the outputs are per-head channels already
        lins = self._lins(m) + (["lin_edge"] if m.lin_edge is not None else [])
        out = [TensorSlice(f"{n}.{p}", 0, rows) for n in lins for p in ("weight", "bias")
               if getattr(getattr(m, n), p, None) is not None]
        out += [TensorSlice(a, 2 if kind == "head_dims" else 1, _att_index(C, kind)) for a in self._atts(m)]
        if m.bias is not None:
            out.append(TensorSlice("bias", 0))
        if m.res is not None:
            out.append(TensorSlice("res.weight", 0))
        return out

    def period(self, m, role, units: str = "heads"):
        return m.out_channels if role == "out" and m.concat and units == "head_dims" else None

    def block(self, m, role, units: str = "heads"):
        return m.out_channels if role == "out" and m.concat and units == "heads" else None

    def internal_groups(self, m, units: str = "heads"):
        if m.concat or units != "heads":
            return []
        return [InternalGroup("heads", m.heads, (), f"{type(m).__name__}(concat=False) averages its heads: "
                                                    "removing one rescales the mean, so it cannot equal masking")]

    def refresh(self, m, removed):
        att = getattr(m, self._atts(m)[0])
        m.heads, m.out_channels = att.shape[1], att.shape[2]
        for n in self._lins(m) + [n for n in ("lin_edge", "res") if getattr(m, n) is not None]:
            lin = getattr(m, n)
            lin.out_channels, lin.in_channels = lin.weight.shape
        if isinstance(m.in_channels, int):
            m.in_channels = getattr(m, self._lins(m)[0]).in_channels

    def num_channels(self, m, role):
        if role == "out":
            return m.heads * m.out_channels if m.concat else m.out_channels
        return getattr(m, self._lins(m)[0]).weight.shape[1]
