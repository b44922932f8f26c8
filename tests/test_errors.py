"""Bad input gets a clear error and leaves the model unchanged."""
import copy

import pytest
import torch
from torch import nn

import etp_graph as eg


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()


X = torch.randn(1, 3, 6, 6)


def snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}, m(X).detach()


def assert_unchanged(m, snap):
    state, out = snap
    now = m.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert torch.equal(m(X), out)


@pytest.mark.parametrize("idx, err, msg", [
    ([7], ValueError, "out of range"),
    ([-1], ValueError, "out of range"),
    ([1, 1], ValueError, "duplicate"),
    ([0, 1, 2, 3], ValueError, "all 4 units"),
    ("ab", ValueError, "invalid literal"),
    (3.5, TypeError, "sequence of ints"),
])
def test_bad_indices(idx, err, msg):
    m = model()
    grp = eg.trace(m, X, ignored_layers=[m[3]]).groups[0]
    snap = snapshot(m)
    with pytest.raises(err, match=msg):
        grp.prune(idx)
    assert_unchanged(m, snap)


def test_ignored_layer_not_in_model():
    m = model()
    with pytest.raises(ValueError, match="not a submodule"):
        eg.trace(m, X, ignored_layers=[nn.Linear(2, 2)])
    with pytest.raises(TypeError, match="nn.Module"):
        eg.trace(m, X, ignored_layers=["3"])


def test_inputs_the_model_cannot_run():
    m = model()
    snap = snapshot(m)
    with pytest.raises(ValueError, match="cannot run on example_inputs"):
        eg.trace(m, torch.randn(1, 5, 6, 6))
    with pytest.raises(TypeError, match="example_inputs must be"):
        eg.trace(m, 3)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        eg.trace(lambda x: x, X)
    assert_unchanged(m, snap)
    assert not m.training


def test_trace_restores_training_mode_and_weights():
    m = model().train()
    state = copy.deepcopy(m.state_dict())
    eg.trace(m, X, ignored_layers=[m[3]])
    assert m.training
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())


def test_failure_mid_prune_restores_model(monkeypatch):
    m = model()
    grp = eg.trace(m, X, ignored_layers=[m[3]]).groups[0]
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


def test_unknown_layer_named_in_skip_reason():
    class Mystery(nn.Module):  # a channel-mixing op the backend treats as a leaf it cannot cut
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return torch.einsum("bchw,cd->bdhw", x, self.w)

    m = nn.Sequential(nn.Conv2d(3, 4, 1), Mystery(), nn.Conv2d(4, 2, 1))
    g = eg.trace(m, X, ignored_layers=[m[2]])
    assert all(s.reason for s in g.skipped)
    # whatever is returned must be exact
    from etp_graph.testing import assert_prune_equivalent
    assert_prune_equivalent(m, X, ignored_layers=[m[2]])
