"""graph.atomic: a failure part-way leaves the model as it was; handlers redo derived state."""
import pytest
import torch
from torch import nn

import etp_graph as eg
from etp_graph.graph.atomic import Snapshot, atomic
from graph_models import X6, assert_unchanged, small, snapshot


def test_failure_mid_prune_restores_model(monkeypatch):
    m = small()
    grp = eg.trace(m, X6, ignored_layers=[m[3]]).groups[0]
    snap = snapshot(m)
    from etp_graph.handlers.norm import BatchNormHandler

    def boom(self, mod, removed):
        raise RuntimeError("refresh failed")
    monkeypatch.setattr(BatchNormHandler, "refresh", boom)
    with pytest.raises(RuntimeError, match="refresh failed"):
        grp.prune([0])
    monkeypatch.undo()
    assert m[0].out_channels == 4 and m[3].in_channels == 4
    assert_unchanged(m, snap)
    assert grp.size == 4


def test_snapshot_restores_tensors_sizes_class_and_drops_added_attributes():
    m = small()
    conv = m[0]
    weight = conv.weight
    snap = Snapshot(m, ["0"])

    class Swapped(nn.Conv2d):
        pass
    conv.weight = nn.Parameter(torch.zeros(2, 3, 3, 3))
    conv.out_channels, conv.etp_note = 2, "added by a cut"
    conv.__class__ = Swapped
    snap.restore()
    assert type(conv) is nn.Conv2d and conv.weight is weight and conv.out_channels == 4
    assert not hasattr(conv, "etp_note")


def test_atomic_restores_only_on_error_and_reraises():
    m = small()
    with atomic(m):
        m[0].out_channels = 3
    assert m[0].out_channels == 3          # no error: the change stays
    snap = snapshot(m)
    with pytest.raises(KeyError, match="boom"):
        with atomic(m, ["0", "1"]):
            m[1].weight = nn.Parameter(torch.ones(4))
            raise KeyError("boom")
    assert_unchanged(m, snap)


def test_restore_asks_the_handler_to_rebuild_derived_state():
    lstm = nn.LSTM(3, 4)
    snap = Snapshot(lstm)
    lstm.weight_hh_l0 = nn.Parameter(torch.zeros(16, 2))
    snap.restore()
    # the handler's restored() rebuilt the flat weight list from the restored tensors
    assert lstm._flat_weights[1] is lstm.weight_hh_l0 and lstm.weight_hh_l0.shape == (16, 4)
    out, _ = lstm(torch.randn(5, 1, 3))
    assert out.shape == (5, 1, 4)
