"""graph.verify: one mask-versus-prune experiment, typed mismatches, reasons that name the module."""
import torch
from torch import nn

import etp_graph as eg
from etp_graph.graph.verify import check_group, compare, mask_and_prune
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
