"""``ChannelGraph``: the result of a trace (groups, what was skipped and why, the layer graph)."""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import networkx as nx
from torch import nn

from .group import CoupledGroup

__all__ = ["ChannelGraph", "SkippedGroup", "layer_graph"]


@dataclasses.dataclass(frozen=True)
class SkippedGroup:
    """A group the engine will not prune, and why."""

    root: str
    reason: str


class ChannelGraph:
    """Result of :func:`etp_graph.trace`: the coupled groups of a model and the layer graph."""

    def __init__(self, model: nn.Module, groups: Optional[List[CoupledGroup]] = None,
                 skipped: Optional[List[SkippedGroup]] = None, *, nodes: Optional[Dict[str, str]] = None,
                 edges: Optional[List[Tuple[str, str]]] = None, unknown_ops: Optional[Dict[str, List[int]]] = None):
        self.model = model
        self.groups = [] if groups is None else groups
        self.skipped = [] if skipped is None else skipped
        #: layer (or op) name -> kind, and producer -> consumer edges: the layer graph
        self.nodes = {} if nodes is None else nodes
        self.edges = [] if edges is None else edges
        #: autograd ops the channels pass through that are neither handled nor declared harmless,
        #: mapped to the ids of the groups they touch (those groups were verified by masking).
        self.unknown_ops = {} if unknown_ops is None else unknown_ops

    def __repr__(self) -> str:
        return f"ChannelGraph(groups={len(self.groups)}, skipped={len(self.skipped)})"

    def table(self) -> str:
        """A readable table of the groups: id, root, units, layers, exactness."""
        rows = [("id", "root", "units", "layers", "check")]
        for g in self.groups:
            rows.append((str(g.id), g.root, str(g.size), str(len(g.modules)),
                         ("exact" if g.exact else "shape") + (", ordered (the last units go first)" if g.ordered else "")))
        for s in self.skipped:
            rows.append(("-", s.root, "-", "-", "skipped: " + s.reason[:60]))
        w = [max(len(r[i]) for r in rows) for i in range(4)]
        return "\n".join("  ".join(r[i].ljust(w[i]) for i in range(4)) + "  " + r[4] for r in rows)

    def to_networkx(self) -> nx.DiGraph:
        """Layers (and non-parametric ops) as nodes with ``kind`` and ``groups`` (group ids);
        data-flow edges from producer to consumer."""
        g = nx.DiGraph()
        member: Dict[str, List[int]] = {}
        for grp in self.groups:
            for name in grp.modules:
                member.setdefault(name, []).append(grp.id)
        for name, kind in self.nodes.items():
            g.add_node(name, kind=kind, groups=sorted(member.get(name, [])))
        g.add_edges_from(self.edges)
        return g


def layer_graph(dg, label_op) -> Tuple[Dict[str, str], List[Tuple[str, str]]]:
    """The backend's nodes as ``{name: kind}`` and its edges; ``label_op(node)`` names op nodes."""
    def label(node) -> str:
        m = node.module
        if isinstance(m, nn.Parameter):
            return dg._param_to_name.get(m, "parameter")
        name = dg._module2name.get(m)
        if name is not None:
            return name or type(m).__name__
        return label_op(node)

    nodes, edges = {}, []
    for node in dg.module2node.values():
        nodes[label(node)] = type(node.module).__name__
    for node in dg.module2node.values():
        for out in node.outputs:
            edges.append((label(node), label(out)))
    return nodes, edges
