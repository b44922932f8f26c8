"""handlers.base: registration by type and by structure, ambiguity refused, the unit kind as argument."""
import pytest
import torch
from torch import nn

import etp_graph as eg
from etp_graph.handlers import LayerHandler, TensorSlice, get_handler, register_handler, unregister_handler


class Scale(nn.Module):
    """A per-channel scale no built-in handler knows."""

    def __init__(self, c):
        super().__init__()
        self.gain = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        return x * self.gain.view(1, -1, 1, 1)


def test_two_structure_handlers_claiming_one_module_are_refused_with_both_names():
    class A(LayerHandler):
        def matches(self, m):
            return isinstance(getattr(m, "gain", None), nn.Parameter)

    class B(A):
        pass
    register_handler(A)
    register_handler(B)
    try:
        with pytest.raises(ValueError, match="matches two structure-registered handlers, A and B"):
            get_handler(Scale(3))
    finally:
        unregister_handler(A)
        unregister_handler(B)
    assert get_handler(Scale(3)) is None


def test_duplicate_type_registration_names_the_fix_and_unregister_works():
    @register_handler
    class First(LayerHandler):
        module_types = (Scale,)
    try:
        with pytest.raises(ValueError, match=r"call unregister_handler\(First\) first"):
            @register_handler
            class Second(LayerHandler):
                module_types = (Scale,)
    finally:
        unregister_handler(First)
    assert get_handler(Scale(2)) is None


def test_handlers_receive_the_trace_unit_kind_as_an_argument():
    seen = []

    @register_handler
    class ScaleHandler(LayerHandler):
        module_types = (Scale,)
        couples_in_out = True
        backend_lacks = True

        def slices(self, m, role, units="heads"):
            seen.append(units)
            return [TensorSlice("gain", 0)]

        def num_channels(self, m, role):
            return m.gain.numel()
    try:
        m = nn.Sequential(nn.Conv2d(3, 4, 1), Scale(4), nn.Conv2d(4, 2, 1))
        for kind in ("heads", "head_dims"):
            seen.clear()
            g = eg.trace(m, torch.randn(1, 3, 4, 4), ignored_layers=[m[2]], attention_units=kind)
            assert [(x.root, x.size) for x in g.groups] == [("0", 4)] and set(seen) == {kind}
        with pytest.raises(ValueError, match="attention_units must be one of"):
            eg.trace(m, torch.randn(1, 3, 4, 4), attention_units="channels")
    finally:
        unregister_handler(ScaleHandler)
