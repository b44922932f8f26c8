"""PyTorch Geometric graph attention: ``GATConv``, ``GATv2Conv``, ``SuperGATConv`` and
``TransformerConv``; heads (and, where exact, per-head channels) as units.

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

``SuperGATConv`` has GATConv's layout with ``att_l``/``att_r`` (``attention_type="MX"``) or no
attention parameters (``"SD"``: scores ``(x_i·x_j).sum(-1) / sqrt(C)``, so only whole
concatenated heads are units: one channel of every head would change the scale).
``TransformerConv`` (query, key, value, skip and gate projections) has a handler of its own below.

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
    return conv is not None and isinstance(m, (conv.GATConv, conv.GATv2Conv, conv.SuperGATConv))


def _is_super(m: nn.Module) -> bool:
    """``SuperGATConv``: GATConv's layout with ``att_l``/``att_r`` (``"MX"``) or none (``"SD"``:
    scaled dot products ``(x_i·x_j).sum(-1) / sqrt(C)``)."""
    return hasattr(m, "attention_type") and hasattr(m, "att_l")


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
        if _is_super(m):
            return ["att_l", "att_r"] if m.att_l is not None else []
        return ["att_src", "att_dst"] + (["att_edge"] if m.lin_edge is not None else [])

    def unsupported(self, m, role, units: str = "heads"):
        if role == "in" and not isinstance(m.in_channels, int):
            return (f"a bipartite {type(m).__name__} (in_channels={m.in_channels}) reads two node sets; "
                    "its input width is not pruned")
        if role == "out" and _is_super(m) and m.attention_type == "SD" and (units != "heads" or not m.concat):
            return (f"{type(m).__name__}(attention_type='SD') scales its scores by 1/sqrt(out_channels): one "
                    "channel of every head changes that scale, so only whole concatenated heads are units")
        return None

    def slices(self, m, role, units: str = "heads"):
        res, lin_edge = getattr(m, "res", None), getattr(m, "lin_edge", None)
        if role == "in":
            out = [TensorSlice(f"{n}.weight", 1) for n in self._lins(m)]
            return out + ([TensorSlice("res.weight", 1)] if res is not None else [])
        H, C, kind = m.heads, m.out_channels, units
        rows = (lambda ch: (torch.arange(len(ch)), ch)) if m.concat else _every_head(H, C)
        if not m.concat:
            kind = "head_dims"    # the outputs are per-head channels already
        lins = self._lins(m) + (["lin_edge"] if lin_edge is not None else [])
        out = [TensorSlice(f"{n}.{p}", 0, rows) for n in lins for p in ("weight", "bias")
               if getattr(getattr(m, n), p, None) is not None]
        out += [TensorSlice(a, 2 if kind == "head_dims" else 1, _att_index(C, kind)) for a in self._atts(m)]
        if m.bias is not None:
            out.append(TensorSlice("bias", 0))
        if res is not None:
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
        if self._atts(m):
            att = getattr(m, self._atts(m)[0])
            m.heads, m.out_channels = att.shape[1], att.shape[2]
        else:   # SuperGATConv "SD": whole heads only, each of out_channels rows
            m.heads = getattr(m, self._lins(m)[0]).weight.shape[0] // m.out_channels
        for n in self._lins(m) + [n for n in ("lin_edge", "res") if getattr(m, n, None) is not None]:
            lin = getattr(m, n)
            lin.out_channels, lin.in_channels = lin.weight.shape
        if isinstance(m.in_channels, int):
            m.in_channels = getattr(m, self._lins(m)[0]).in_channels

    def num_channels(self, m, role):
        if role == "out":
            return m.heads * m.out_channels if m.concat else m.out_channels
        return getattr(m, self._lins(m)[0]).weight.shape[1]


def _is_transformer_conv(m: nn.Module) -> bool:
    conv = sys.modules.get("torch_geometric.nn.conv")
    return conv is not None and hasattr(conv, "TransformerConv") and isinstance(m, conv.TransformerConv)


def _beta_columns(HC: int):
    """Output channel ``ch`` → columns ``ch``, ``HC + ch`` and ``2·HC + ch`` of ``lin_beta``, which
    reads ``cat([out, x_r, out − x_r])``."""
    def index(ch: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return (torch.arange(len(ch)).repeat_interleave(3),
                (ch.view(-1, 1) + torch.tensor([0, HC, 2 * HC])).flatten())
    return index


@register_handler
class TransformerConvHandler(LayerHandler):
    """PyTorch Geometric ``TransformerConv`` (graph transformer, UniMP): heads as units.

    ``q = lin_query(x).view(N, H, C)`` (``key``, ``value`` alike, ``lin_edge`` added to both),
    per-head scores ``(q_i·k_j).sum(-1) / sqrt(C)``, a softmax over each node's edges, and the
    heads concatenated (``H·C`` outputs, channel ``h·C + c``), plus ``lin_skip(x)`` (gated by
    ``lin_beta`` on ``cat([out, x_r, out − x_r])`` when ``beta=True``). A head owns its ``C`` rows
    of the four projections (and of ``lin_edge``), its rows of ``lin_skip``, its three column
    blocks of ``lin_beta`` and the next layer's input columns; the scale ``1/sqrt(C)`` does not
    change when whole heads go, so a head cut is exact. One dimension in every head would change
    that scale, and averaged heads (``concat=False``) would change the mean: both are refused
    with the reason.
    """

    module_types = ()          # matched by type without importing torch_geometric
    can_root = True
    backend_lacks = True       # message passing is a leaf for the tracer
    _LINS = ("lin_query", "lin_key", "lin_value")

    def matches(self, m):
        return _is_transformer_conv(m)

    def _inputs(self, m) -> List[str]:
        return list(self._LINS) + (["lin_skip"] if m.root_weight else [])

    def unsupported(self, m, role, units: str = "heads"):
        if role == "in":
            if not isinstance(m.in_channels, int):
                return (f"a bipartite TransformerConv (in_channels={m.in_channels}) reads two node sets; "
                        "its input width is not pruned")
            return None
        if not m.concat:
            return ("TransformerConv(concat=False) averages its heads: removing one rescales the mean, "
                    "and one channel of every head changes the scores' 1/sqrt(out_channels)")
        if units != "heads":
            return ("TransformerConv scales its scores by 1/sqrt(out_channels): one dimension in every head "
                    "changes that scale, so only whole heads are units (attention_units='heads')")
        return None

    def slices(self, m, role, units: str = "heads"):
        if role == "in":
            return [TensorSlice(f"{n}.weight", 1) for n in self._inputs(m)]
        lins = self._inputs(m) + (["lin_edge"] if m.lin_edge is not None else [])
        out = [TensorSlice(f"{n}.{p}", 0) for n in lins for p in ("weight", "bias")
               if getattr(getattr(m, n), p, None) is not None]
        if m.root_weight and m.lin_beta is not None:
            out.append(TensorSlice("lin_beta.weight", 1, _beta_columns(m.heads * m.out_channels)))
        return out

    def block(self, m, role, units: str = "heads"):
        return m.out_channels if role == "out" else None

    def refresh(self, m, removed):
        for n in self._inputs(m) + [n for n in ("lin_edge", "lin_beta") if getattr(m, n) is not None]:
            lin = getattr(m, n)
            lin.out_channels, lin.in_channels = lin.weight.shape
        m.heads = m.lin_query.weight.shape[0] // m.out_channels
        if isinstance(m.in_channels, int):
            m.in_channels = m.lin_query.weight.shape[1]

    def num_channels(self, m, role):
        if role == "out":
            return m.heads * m.out_channels if m.concat else m.out_channels
        return m.lin_query.weight.shape[1]
