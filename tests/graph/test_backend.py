"""graph.backend and graph.index_maps: facts kept apart from the backend, tolerance scoped to a trace."""
import threading

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.dependency import index_mapping as tp_index_mapping

import etp_graph as eg
from etp_graph.graph import backend, index_maps
from etp_graph.graph.backend import Backend, build_backend
from etp_graph.testing import assert_prune_equivalent


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
    assert index_maps.PASSES == (index_maps.map_channel_pads, index_maps.map_slices, index_maps.map_reshapes,
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


class PatchMerge(nn.Module):
    """Swin's patch merging on a channel-last map ``(B, H, W, C)``: four strided slices along
    height and width, concatenated along the channels, the spatial dims merged again."""

    def __init__(self, norm: bool):
        super().__init__()
        self.inp, self.red, self.head = nn.Linear(3, 8), nn.Linear(32, 5), nn.Linear(5, 2)
        self.norm = nn.LayerNorm(32) if norm else nn.Identity()

    def forward(self, x):   # (B, 16, 3): a 4 × 4 map of tokens
        h = self.inp(x).view(x.shape[0], 4, 4, -1)
        h = torch.cat([h[:, 0::2, 0::2], h[:, 1::2, 0::2], h[:, 0::2, 1::2], h[:, 1::2, 1::2]], -1)
        return self.head(self.red(self.norm(h.reshape(x.shape[0], 4, -1))).mean(1))


def test_slices_of_a_channel_last_map_keep_the_channels_and_their_concat_copies_them():
    torch.manual_seed(0)
    for norm in (False, True):
        m, x = PatchMerge(norm), torch.randn(2, 16, 3)
        g = eg.trace(m, x, ignored_layers=[m.head])
        assert not g.skipped, g.skipped
        inp = next(q for q in g.groups if q.root == "inp")
        cols = next(i for i in inp.items if i.owner == "red").index.view(4, 8)   # unit u in each copy
        assert all(set(cols[:, u].tolist()) == {u, 8 + u, 16 + u, 24 + u} for u in range(8))
        checks = assert_prune_equivalent(m, x, ignored_layers=[m.head])
        assert {c.checked for c in checks} == ({"values", "shape"} if norm else {"values"})


class CausalTrim(nn.Module):
    """A causal convolution: padded on both sides, the last ``k`` steps cut (a slice of time)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.head = nn.Conv1d(4, 8, 3, padding=2), nn.Conv1d(8, 6, 1), nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.c2(torch.relu(self.c1(x)[:, :, :-2])).mean(-1))


def test_a_slice_of_time_leaves_the_channels_whole():
    torch.manual_seed(0)
    m, x = CausalTrim(), torch.randn(2, 4, 10)
    g = eg.trace(m, x, ignored_layers=[m.head])
    assert [(q.root, q.size) for q in g.groups] == [("c1", 8), ("c2", 6)] and not g.skipped
    assert {c.checked for c in assert_prune_equivalent(m, x, ignored_layers=[m.head])} == {"values"}
