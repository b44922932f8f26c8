"""graph.backend and graph.index_maps: facts kept apart from the backend, tolerance scoped to a trace."""
import threading

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.dependency import index_mapping as tp_index_mapping

import etp_graph as eg
from etp_graph.graph import backend, index_maps
from etp_graph.graph.backend import Backend, build_backend


class Cat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 2, 1), nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.head(torch.cat([self.a(x), self.b(x)], 1))


def test_facts_live_in_the_backend_wrapper_not_on_its_nodes():
    m, x = Cat(), torch.randn(1, 3, 4, 4)
    bk = Backend(tp.DependencyGraph())
    with bk.tolerant():
        build_backend(m, x, bk)
        index_maps.map_indices(bk)
    cat = [n for n in bk.dg.module2node.values() if bk.kind(n) == tp.ops.OPTYPE.CONCAT]
    assert len(cat) == 1 and bk.get(cat[0]).owned and bk.shape(cat[0]) == (1, 6, 4, 4)
    assert not any(k.startswith("_etp") for n in bk.dg.module2node.values() for k in vars(n))


def test_passes_run_in_their_declared_order():
    assert index_maps.PASSES == (index_maps.map_channel_pads, index_maps.map_reshapes,
                                 index_maps.map_concats, index_maps.map_splits)


def test_tolerant_index_maps_only_inside_our_trace(monkeypatch):
    eg.trace(Cat(), torch.randn(1, 3, 4, 4))          # installs the wrappers
    calls = []

    def failing(graph, node):
        calls.append(node)
        raise RuntimeError("cannot infer")
    monkeypatch.setitem(backend.ORIGINAL_MAPS, "update_concat_index_mapping", failing)
    node = object()
    assert not _tolerated(node)                        # outside a trace: the backend's behaviour
    bk = Backend(None)
    with bk.tolerant():                                # inside: recorded on the node's facts
        assert _tolerated(node)
        seen = []                                      # another thread meanwhile: unchanged
        t = threading.Thread(target=lambda: seen.append(_tolerated(node)))
        t.start()
        t.join()
    assert "cannot infer" in bk.get(node).backend_error and seen == [False] and len(calls) == 3


def _tolerated(node) -> bool:
    try:
        tp_index_mapping.update_concat_index_mapping(None, node)
    except RuntimeError:
        return False
    return True
