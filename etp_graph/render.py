"""Pictures of the dependency graph: layers and ops as nodes, data flow as edges, every layer
coloured by the coupled group it belongs to; the roots of skipped groups drawn in grey with
their reason as a tooltip. Written with well-kept renderers, never by hand: an interactive
HTML page with pyvis, or Graphviz (DOT source always; SVG/PNG where Graphviz's ``dot`` program
is installed). Both are the ``viz`` extra: ``pip install 'etp-graph[viz]'``."""
from __future__ import annotations

import os
import shutil
from typing import Dict, List, Tuple

from .extras import require
from .graph import ChannelGraph

__all__ = ["write_graph", "graph_styles"]

#: a qualitative palette (Tableau 10); group k gets colour k mod 10
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
           "#9c755f", "#bab0ac")
SKIPPED, OTHER = "#d0d0d0", "#ffffff"


def graph_styles(graph: ChannelGraph) -> Tuple[Dict[str, Dict[str, str]], List[Tuple[str, str]]]:
    """``(node → {label, colour, title, shape}, edges)``: what both renderers draw."""
    member: Dict[str, List[int]] = {}
    for g in graph.groups:
        for name in g.modules:
            member.setdefault(name, []).append(g.id)
    skipped = {s.root: s.reason for s in graph.skipped}
    styles = {}
    for name, kind in graph.nodes.items():
        groups = sorted(member.get(name, []))
        if groups:
            colour, title = PALETTE[groups[0] % len(PALETTE)], f"{kind}; groups {groups}"
        elif name in skipped:
            colour, title = SKIPPED, f"{kind}; skipped: {skipped[name]}"
        else:
            colour, title = OTHER, kind
        layer = kind not in ("_ElementWiseOp", "_ConcatOp", "_SplitOp", "_ReshapeOp", "_UnbindOp", "_ExpandOp")
        styles[name] = {"label": name, "colour": colour, "title": title, "shape": "box" if layer else "ellipse"}
    edges = [(a, b) for a, b in dict.fromkeys(graph.edges) if a in styles and b in styles]
    return styles, edges


def write_graph(graph: ChannelGraph, path: str) -> None:
    """Draw ``graph`` to ``path``: ``.html`` (pyvis), ``.dot``/``.gv`` (Graphviz source), ``.svg``
    or ``.png`` (Graphviz, needs ``dot``)."""
    ext = os.path.splitext(path)[1].lower()
    styles, edges = graph_styles(graph)
    if ext == ".html":
        network = require("pyvis.network", "etp-graph inspect --graph out.html")
        net = network.Network(height="900px", width="100%", directed=True, cdn_resources="in_line")
        for name, s in styles.items():
            net.add_node(name, label=s["label"], color=s["colour"], title=s["title"], shape=s["shape"])
        for a, b in edges:
            net.add_edge(a, b)
        net.set_options('{"layout": {"hierarchical": {"enabled": true, "direction": "UD", "sortMethod": "directed"}}}')
        net.write_html(path, notebook=False)
        return
    if ext not in (".dot", ".gv", ".svg", ".png"):
        raise ValueError(f"--graph {path!r}: write .html, .dot, .gv, .svg or .png")
    graphviz = require("graphviz", "etp-graph inspect --graph out.dot")
    dot = graphviz.Digraph("etp_graph", graph_attr={"rankdir": "TB"}, node_attr={"style": "filled", "fontsize": "10"})
    for name, s in styles.items():
        dot.node(name, s["label"], fillcolor=s["colour"], tooltip=s["title"], shape=s["shape"])
    for a, b in edges:
        dot.edge(a, b)
    if ext in (".dot", ".gv"):
        with open(path, "w") as f:
            f.write(dot.source)
        return
    if shutil.which("dot") is None:
        raise RuntimeError(f"--graph {path!r}: Graphviz's dot program is not installed; install it (apt install "
                           "graphviz) or write .html or .dot instead")
    base = os.path.splitext(path)[0]
    dot.render(base, format=ext[1:], cleanup=True)
