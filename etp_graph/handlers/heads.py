"""What every multi-head attention family shares: rows laid out head after head, the two unit
kinds, and the handler base that turns a layout into an internal group of heads or head
dimensions (:class:`HeadedAttention`). The families are in :mod:`.attention` and
:mod:`.projections`; see :mod:`.attention` for the anatomy.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from .base import InternalGroup, LayerHandler, TensorSlice

__all__ = ["HeadedAttention", "Layout", "get_dotted", "fit_linears", "head_rows"]


def head_rows(heads: int, dim: int, offset: int, kind: str):
    """Index map for rows (or columns) laid out head after head, starting at ``offset``."""
    def index(units: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        n = len(units)
        if kind == "heads":
            pos = torch.arange(n).repeat_interleave(dim)
            idx = offset + units.repeat_interleave(dim) * dim + torch.arange(dim).repeat(n)
        else:
            pos = torch.arange(n).repeat_interleave(heads)
            idx = offset + torch.arange(heads).repeat(n) * dim + units.repeat_interleave(heads)
        return pos, idx
    return index


def get_dotted(m: nn.Module, dotted: str):
    owner, _, attr = dotted.rpartition(".")
    return getattr(m.get_submodule(owner) if owner else m, attr)


def fit_linears(m: nn.Module, names: Sequence[str]) -> None:
    for n in names:
        lin = m.get_submodule(n)
        lin.out_features, lin.in_features = lin.weight.shape


@dataclasses.dataclass(frozen=True)
class Layout:
    heads: int
    head_dim: int
    qkv: Tuple[Tuple[str, Optional[str], int], ...]   # (weight, bias or None, row offset) for q, k, v
    out: str                                          # output projection weight (columns are heads)


class HeadedAttention(LayerHandler):
    """What every multi-head family shares; subclasses describe their tensors."""

    can_root = True
    channel_last = True
    backend_lacks = True   # a leaf for the tracer: its inner reshapes/matmuls are ours

    # -- per family
    def layout(self, m) -> Layout:
        raise NotImplementedError

    def set_sizes(self, m, heads: int, head_dim: int) -> None:
        raise NotImplementedError

    def heads_refused(self, m) -> Optional[str]:
        return None

    # -- shared
    def observe(self, m, args, kwargs, output):
        tensors = [a for a in list(args[:3]) if isinstance(a, torch.Tensor)]
        m._etp_cross = len({id(t) for t in tensors}) > 1

    def unsupported(self, m, role, units: str = "heads"):
        if role == "in" and getattr(m, "_etp_cross", False):
            return (f"{type(m).__name__} is called with a query different from its key/value (cross "
                    "attention): its input columns belong to two streams, so the embedding width "
                    "is not pruned through it (its heads still are)")
        return None

    def internal_groups(self, m, units: str = "heads"):
        kind = units
        lay = self.layout(m)
        slices: List[TensorSlice] = []
        for w, b, off in lay.qkv:
            rows = head_rows(lay.heads, lay.head_dim, off, kind)
            slices.append(TensorSlice(w, 0, rows))
            if b is not None and get_dotted(m, b) is not None:
                slices.append(TensorSlice(b, 0, rows))
        slices.append(TensorSlice(lay.out, 1, head_rows(lay.heads, lay.head_dim, 0, kind)))
        size = lay.heads if kind == "heads" else lay.head_dim
        return [InternalGroup(kind, size, tuple(slices), self.heads_refused(m))]

    def refresh(self, m, removed):
        lay = self.layout(m)
        heads = lay.heads - removed.get("heads", 0)
        head_dim = lay.head_dim - removed.get("head_dims", 0)
        self.set_sizes(m, heads, head_dim)


