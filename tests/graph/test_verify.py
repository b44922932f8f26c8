"""graph.verify: one mask-versus-prune experiment, typed mismatches, reasons that name the module."""
import copy
import dataclasses

import torch
from torch import nn

import etp_graph as eg
from etp_graph.graph.verify import check_group, compare, experiment, mask_and_prune
from graph_models import X8, chain


def test_mask_and_prune_leaves_the_model_alone_and_agrees():
    m = chain()
    g = eg.trace(m, X8, ignored_layers=[m[6]]).groups[1]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    a, b, pruned = mask_and_prune(m, X8, [(g, [0, 3])])
    assert pruned[3].out_channels == 4 and m[3].out_channels == 6
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert compare(a, b, exact=True) is None and torch.allclose(a, b, atol=1e-5)


def test_compare_kinds():
    x = torch.ones(2, 3)
    assert compare(x, x.clone(), True) is None
    assert compare(x, torch.ones(2, 4), True).kind == "shape"
    why = compare(x, x + 1, True)
    assert why.kind == "value" and "max abs error 1" in why
    assert compare(x, x + 1, False) is None                       # shapes only
    assert compare((x, x), (x,), True).kind == "count"
    assert compare(x, torch.full((2, 3), float("nan")), False).kind == "value"


class FixedWidth(nn.Module):
    """Adds a fixed-size buffer to its input: removing channels upstream breaks it here."""

    def __init__(self):
        super().__init__()
        self.register_buffer("offset", torch.ones(1, 4, 1, 1))

    def forward(self, x):
        return x + self.offset


def test_a_cut_that_breaks_the_forward_is_a_reason_naming_the_module():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), FixedWidth(), nn.Conv2d(4, 2, 1))
    g = eg.trace(m, torch.randn(1, 3, 4, 4), ignored_layers=[m[2]], validate=False).groups[0]
    why = check_group(m, torch.randn(1, 3, 4, 4), g)
    assert "breaks the forward in '1' (FixedWidth)" in why and "fixed-size tensor" in why
    graph = eg.trace(m, torch.randn(1, 3, 4, 4), ignored_layers=[m[2]])
    assert graph.groups == [] and "breaks the forward in '1'" in graph.skipped[0].reason


class _Sensitive(nn.Module):
    """A network whose end amplifies round-off: ``sin(3e4 · z)`` turns float32's 1e-7 relative
    error of ``z`` (the sums of a narrower matrix product run in another order) into 1e-3."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.head = nn.Linear(16, 200), nn.Linear(200, 200), nn.Linear(200, 4)

    def forward(self, x):
        return torch.sin(3e4 * self.head(torch.relu(self.b(torch.relu(self.a(x))))))


def test_round_off_is_not_mistaken_for_a_wrong_channel_map():
    m, x = _Sensitive().eval(), torch.randn(8, 16)
    g = eg.trace(m, x, ignored_layers=[m.head])
    assert [(gr.root, gr.size, gr.exact) for gr in g.groups] == [("a", 200, True), ("b", 200, True)]
    assert not g.skipped
    # in float32 alone the experiment disagrees by more than any fixed tolerance would allow
    a, b, _ = mask_and_prune(m, x, [(g.groups[0], [3, 50])])
    assert compare(a, b, True).kind == "value"
    why, pruned = experiment(m, x, [(g.groups[0], [3, 50])], True)
    assert why is None and pruned.a.out_features == 198 and m.a.out_features == 200
    assert m.a.weight.dtype == torch.float32                       # the user's model is untouched


def test_a_wrong_map_still_fails_in_float64():
    m, x = _Sensitive().eval(), torch.randn(8, 16)
    g = eg.trace(m, x, ignored_layers=[m.head])
    wrong = copy.copy(g.groups[0])     # the same slices with the units of b's rows shifted by one
    wrong.items = [dataclasses.replace(s, index=(s.index + 1) % 200) if s.owner == "b" else s for s in wrong.items]
    why, _ = experiment(m, x, [(wrong, [3, 50])], True)
    assert why is not None and why.kind == "value"
