"""Graph attention networks (PyTorch Geometric ``GATConv``), as in Veličković et al., ICLR 2018:
the two-layer transductive model (Cora/CiteSeer) and the three-layer inductive model (PPI)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..extras import require
from .registry import register_model

__all__ = ["GAT", "random_graph"]


def random_graph(nodes: int = 12, features: int = 16, edges: int = 40, seed: int = 0):
    """``(x, edge_index)`` of a random directed graph (no self loops; GATConv adds them)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, nodes, (edges,), generator=g)
    dst = (src + torch.randint(1, nodes, (edges,), generator=g)) % nodes
    return torch.randn(nodes, features, generator=g), torch.stack([src, dst])


class GAT(nn.Module):
    """``len(heads)`` GATConv layers; hidden layers concatenate their heads, the last averages them.

    Args:
        in_channels, hidden, out_channels: widths (``hidden`` is per head).
        heads: heads per layer, e.g. ``(8, 1)`` for Cora, ``(4, 4, 6)`` for PPI.
        residual: residual connections (the PPI model); dropout: on features and attention.
    """

    def __init__(self, in_channels: int, hidden: int, out_channels: int, heads: Sequence[int] = (8, 1),
                 residual: bool = False, dropout: float = 0.6, activation: str = "elu"):
        super().__init__()
        GATConv = require("torch_geometric.nn", "the GAT zoo models").GATConv
        self.dropout, self.activation = dropout, activation
        layers, width = [], in_channels
        for i, h in enumerate(heads):
            last = i == len(heads) - 1
            layers.append(GATConv(width, out_channels if last else hidden, heads=h, concat=not last,
                                  dropout=dropout, residual=residual))
            width = hidden * h
        self.convs = nn.ModuleList(layers)

    @property
    def head(self) -> nn.Module:
        return self.convs[-1]

    def forward(self, x, edge_index):
        for i, conv in enumerate(self.convs):
            x = F.dropout(x, self.dropout, self.training)
            x = conv(x, edge_index)
            if i < len(self.convs) - 1:
                x = F.elu(x) if self.activation == "elu" else F.relu(x)
        return x


@register_model("gat_cora", lambda: random_graph(features=1433), heads=lambda m: [m.head], tags=("gat",))
def gat_cora(in_channels: int = 1433, out_channels: int = 7) -> nn.Module:
    """Two layers, 8 heads of 8 then one averaged output head (the GAT paper's Cora model)."""
    torch.manual_seed(0)
    return GAT(in_channels, 8, out_channels, heads=(8, 1))


@register_model("gat_ppi", lambda: random_graph(features=50), heads=lambda m: [m.head], tags=("gat",))
def gat_ppi(in_channels: int = 50, out_channels: int = 121, hidden: int = 64) -> nn.Module:
    """Three layers, heads (4, 4, 6), residual, averaged output (the paper's PPI model; the paper
    uses 256 features per head, ``hidden`` defaults to 64 to keep tests small)."""
    torch.manual_seed(0)
    return GAT(in_channels, hidden, out_channels, heads=(4, 4, 6), residual=True, dropout=0.0)
