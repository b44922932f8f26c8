"""CoupledGroup: unit norms, masking, pruning with renumbering, index checks."""
import copy

import pytest
import torch
from torch import nn
from hypothesis import given, settings
from hypothesis import strategies as st

import etp_graph as eg
from etp_graph.graph.group import cut_groups
from graph_models import X6, X8, assert_unchanged, chain, small, snapshot


def test_unit_norms_closed_form():
    m = chain()
    grp = eg.trace(m, X8, ignored_layers=[m[6]]).groups[0]
    conv, bn, nxt = m[0], m[1], m[3]
    expect = (conv.weight.pow(2).sum((1, 2, 3)) + conv.bias.pow(2) + bn.weight.pow(2) + bn.bias.pow(2)
              + nxt.weight.pow(2).sum((0, 2, 3))).sqrt()      # running stats are buffers: not counted
    assert torch.allclose(grp.unit_norms(), expect)
    # the flatten → Linear group: each unit owns 16 input columns of the head
    grp2 = eg.trace(m, X8, ignored_layers=[m[6]]).groups[1]
    head_cols = m[6].weight.view(5, 6, 16).pow(2).sum((0, 2))
    expect2 = (m[3].weight.pow(2).sum((1, 2, 3)) + m[3].bias.pow(2) + head_cols).sqrt()
    assert torch.allclose(grp2.unit_norms(), expect2)


def test_zero_then_prune_keeps_output_and_updates_layers():
    m = chain()
    grp = eg.trace(m, X8, ignored_layers=[m[6]]).groups[1]
    masked = copy.deepcopy(m)
    grp.zero_([1, 4], model=masked)
    grp.prune([1, 4])
    assert (m[3].out_channels, m[3].weight.shape[0], m[6].in_features) == (4, 4, 64)
    assert torch.allclose(m(X8), masked(X8), atol=1e-5)
    assert grp.size == 4  # renumbered, still usable
    grp.prune([0])
    assert m[6].in_features == 48 and m(X8).shape == (2, 5)


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_mask_equals_prune_for_any_subset(data):
    m = chain()
    grp = eg.trace(m, X8, ignored_layers=[m[6]], validate=False).groups[0]
    idx = data.draw(st.lists(st.integers(0, 7), min_size=1, max_size=7, unique=True))
    masked = copy.deepcopy(m)
    grp.zero_(idx, model=masked)
    grp.prune(idx)
    assert m[0].out_channels == 8 - len(idx)
    assert torch.allclose(m(X8), masked(X8), atol=1e-5)


@pytest.mark.parametrize("idx, err, msg", [
    ([7], ValueError, "out of range"),
    ([-1], ValueError, "out of range"),
    ([1, 1], ValueError, "duplicate"),
    ([0, 1, 2, 3], ValueError, "all 4 units"),
    ("ab", ValueError, "invalid literal"),
    (3.5, TypeError, "sequence of ints"),
])
def test_bad_indices(idx, err, msg):
    m = small()
    grp = eg.trace(m, X6, ignored_layers=[m[3]]).groups[0]
    snap = snapshot(m)
    with pytest.raises(err, match=msg):
        grp.prune(idx)
    assert_unchanged(m, snap)


def test_cut_of_a_copy_checks_indices_and_leaves_the_group_numbering():
    m = chain()
    grp = eg.trace(m, X8, ignored_layers=[m[6]]).groups[0]
    clone = copy.deepcopy(m)
    grp.cut(clone, [1, 2])
    assert clone[0].out_channels == 6 and m[0].out_channels == 8 and grp.size == 8
    with pytest.raises(ValueError, match="out of range"):
        grp.cut(clone, [9])


class TwoBranches(nn.Module):
    """Two convs concatenated into one consumer: its input columns belong to two groups."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.mix = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1), nn.Conv2d(10, 2, 1)

    def forward(self, x):
        return self.mix(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1))


def test_groups_sharing_a_dimension_cut_together_and_one_after_the_other():
    m, x = TwoBranches().eval(), torch.randn(2, 3, 4, 4)
    graph = eg.trace(m, x, ignored_layers=[m.mix])
    ga, gb = (next(g for g in graph.groups if g.root == r) for r in ("a", "b"))
    masked = copy.deepcopy(m)
    ga.zero_([1], model=masked)
    gb.zero_([2, 5], model=masked)
    together = copy.deepcopy(m)
    cut_groups(together, [(ga, [1]), (gb, [2, 5])])
    assert together.mix.in_channels == 7 and torch.allclose(together(x), masked(x), atol=1e-6)
    ga.prune([1])          # b's columns of mix move left by one: its group must follow
    gb.prune([2, 5])
    assert torch.allclose(m(x), masked(x), atol=1e-6)
    assert [i.index.tolist() for i in gb.items if i.owner == "mix"] == [[3, 4, 5, 6]]
