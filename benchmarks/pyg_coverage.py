"""Coverage of PyTorch Geometric's own graph layers: random weights, a small random graph.

    python -m benchmarks.pyg_coverage [name,name,...]

Each layer sits between an input ``nn.Linear`` and a ``nn.Linear`` head (ignored): ``x → inp →
relu → conv → relu → head``, on 20 nodes, 60 edges and 4 edge features where the layer reads
them. Per layer: the time of ``eg.trace``, its groups (root, units) and refusals, how many of the
weights of two or more dimensions (``inp``'s and the layer's own) belong to a returned group, and
``assert_prune_equivalent`` on every group (mask == prune). A refusal carries its reason; a
refused group is safe, but it is not a pruned layer: the last line counts both.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch
from torch import nn


def layers():
    import torch_geometric.nn as gnn

    def mlp(i, o):
        return nn.Sequential(nn.Linear(i, 16), nn.ReLU(), nn.Linear(16, o))
    # name → (make, output width, reads edge features)
    return {
        "GCNConv": (lambda: gnn.GCNConv(12, 16), 16, False),
        "SAGEConv": (lambda: gnn.SAGEConv(12, 16), 16, False),
        "GraphConv": (lambda: gnn.GraphConv(12, 16), 16, False),
        "SGConv": (lambda: gnn.SGConv(12, 16), 16, False),
        "ChebConv": (lambda: gnn.ChebConv(12, 16, K=3), 16, False),
        "TAGConv": (lambda: gnn.TAGConv(12, 16), 16, False),
        "ClusterGCNConv": (lambda: gnn.ClusterGCNConv(12, 16), 16, False),
        "LEConv": (lambda: gnn.LEConv(12, 16), 16, False),
        "MFConv": (lambda: gnn.MFConv(12, 16), 16, False),
        "GeneralConv": (lambda: gnn.GeneralConv(12, 16), 16, False),
        "ResGatedGraphConv": (lambda: gnn.ResGatedGraphConv(12, 16), 16, False),
        "GENConv": (lambda: gnn.GENConv(12, 16), 16, False),
        "GINConv": (lambda: gnn.GINConv(mlp(12, 16)), 16, False),
        "GINEConv": (lambda: gnn.GINEConv(mlp(12, 16), edge_dim=4), 16, True),
        "EdgeConv": (lambda: gnn.EdgeConv(mlp(24, 16)), 16, False),
        "CGConv": (lambda: gnn.CGConv(12, dim=4), 12, True),
        "NNConv": (lambda: gnn.NNConv(12, 16, mlp(4, 12 * 16)), 16, True),
        "ARMAConv": (lambda: gnn.ARMAConv(12, 16), 16, False),
        "FeaStConv": (lambda: gnn.FeaStConv(12, 16, heads=2), 16, False),
        "GATConv": (lambda: gnn.GATConv(12, 8, heads=4), 32, False),
        "GATConv-edge": (lambda: gnn.GATConv(12, 8, heads=4, edge_dim=4), 32, True),
        "GATv2Conv": (lambda: gnn.GATv2Conv(12, 8, heads=4), 32, False),
        "GATv2Conv-edge": (lambda: gnn.GATv2Conv(12, 8, heads=4, edge_dim=4), 32, True),
        "SuperGATConv": (lambda: gnn.SuperGATConv(12, 8, heads=4), 32, False),
        "TransformerConv": (lambda: gnn.TransformerConv(12, 8, heads=4), 32, False),
    }


class Net(nn.Module):
    def __init__(self, conv: nn.Module, width: int, edges: bool):
        super().__init__()
        self.inp, self.conv, self.head, self.edges = nn.Linear(12, 12), conv, nn.Linear(width, 3), edges

    def forward(self, x, edge_index, edge_attr):
        h = torch.relu(self.inp(x))
        h = self.conv(h, edge_index, edge_attr) if self.edges else self.conv(h, edge_index)
        return self.head(torch.relu(h))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="?", default="", help="comma-separated layers (default: all)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    import etp_graph as eg
    from etp_graph.testing import assert_prune_equivalent
    table = layers()
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(20, 12, generator=g), torch.randint(0, 20, (2, 60), generator=g),
              torch.randn(60, 4, generator=g))
    full = exact = 0
    names = [n for n in args.names.split(",") if n] or list(table)
    for name in names:
        make, width, edges = table[name]
        torch.manual_seed(0)
        m = Net(make(), width, edges).eval()
        start = time.perf_counter()
        graph = eg.trace(m, inputs, ignored_layers=[m.head])
        took = time.perf_counter() - start
        weights = {f"{n}.{a}" if n else a for n, mod in m.named_modules() if mod is not m.head
                   for a, t in mod.named_parameters(recurse=False) if t.dim() >= 2}
        covered = {f"{it.owner}.{it.attr}" for grp in graph.groups for it in grp.items} & weights
        try:
            checks = f"{len(assert_prune_equivalent(m, inputs, ignored_layers=[m.head], check_macs=False))} checks pass"
            exact += 1
        except AssertionError as e:
            checks = f"EQUIVALENCE FAILED: {str(e).splitlines()[1][:120]}"
        full += len(covered) == len(weights) and not graph.skipped
        print(f"{name}: {took:.2f} s, groups {[(q.root, q.size) for q in graph.groups]}, "
              f"{len(covered)}/{len(weights)} weights in a group, {checks}", flush=True)
        for s in graph.skipped:
            print(f"   skipped {s.root}: {s.reason[:160]}", flush=True)
    print(f"{full} of {len(names)} layers: every weight in a group, nothing refused; "
          f"{exact} of {len(names)}: every returned group exact (mask == prune)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
