"""Normalisations recognised by what they compute: a reduction over the channel dimension (a
hand-written RMSNorm's mean of squares, a functional layer norm, a softmax over channels) makes
the group shape-checked, as an ``nn.LayerNorm`` does; reductions over other dimensions keep it
exact (value-checked)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import etp_graph as eg
from etp_graph.testing import assert_prune_equivalent
from etp_graph.graph.ops import REDUCTIONS, reduced_dims


class HandRMSNorm(nn.Module):
    """LLaMA's RMSNorm, written as Hugging Face writes it (no class or attribute we know)."""

    def __init__(self, width, eps=1e-6):
        super().__init__()
        self.gain = nn.Parameter(torch.rand(width) + 0.5)
        self.eps = eps

    def forward(self, x):
        var = x.pow(2).mean(-1, keepdim=True)
        return self.gain * (x * torch.rsqrt(var + self.eps))


class Tokens(nn.Module):
    """(B, L, C) tokens: up → <norm> → down → head, with a residual around the MLP."""

    def __init__(self, norm):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.up, self.down, self.head = nn.Linear(5, 8), nn.Linear(8, 12), nn.Linear(12, 8), nn.Linear(8, 3)
        self.norm = norm

    def forward(self, x):
        h = self.inp(x)
        h = h + self.down(F.gelu(self.up(self.norm(h))))
        return self.head(h)


X = torch.randn(2, 7, 5)


def _group(model, root="inp", x=X):
    g = eg.trace(model, x, ignored_layers=[model.head])
    assert not g.skipped, g.skipped
    return {gr.root: gr for gr in g.groups}[root]


def test_hand_written_rmsnorm_makes_a_shape_checked_group_not_a_refusal():
    m = Tokens(HandRMSNorm(8))
    gr = _group(m)
    assert gr.size == 8 and not gr.exact and "Mean" in gr.ops
    assert "norm.gain" in {f"{s.owner}.{s.attr}" for s in gr.items}
    checks = assert_prune_equivalent(m, X, ignored_layers=[m.head])
    assert {c.root: c.checked for c in checks}["inp"] == "shape"
    assert {c.root: c.checked for c in checks}["up"] == "values"   # the FFN units stay exact
    gr.cut(m, [1, 4])
    assert m.norm.gain.shape == (6,) and m(X).shape == (2, 7, 3)


@pytest.mark.parametrize("norm", [
    lambda: _Fn(lambda x, w: F.layer_norm(x, x.shape[-1:], w)),
    lambda: _Fn(lambda x, w: x.softmax(-1) * w),
    lambda: _Fn(lambda x, w: (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + 1e-5).sqrt() * w),
    lambda: _Fn(lambda x, w: F.rms_norm(x, x.shape[-1:], w)),
], ids=["layer_norm", "softmax", "var", "rms_norm"])
def test_functional_statistics_over_channels_are_shape_checked(norm):
    m = Tokens(norm())
    assert not _group(m).exact
    assert_prune_equivalent(m, X, ignored_layers=[m.head])


class _Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn, self.w = fn, nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x):
        return self.fn(x, self.w)


def test_reductions_over_other_dimensions_stay_exact():
    # over the tokens of (B, L, C), and a spatial mean of (B, C, H, W): channels are kept
    m = Tokens(_Fn(lambda x, w: x * x.softmax(1) * w + x.mean(1, keepdim=True)))
    assert _group(m).exact
    conv = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), _Pool(), nn.Linear(6, 2))
    g = eg.trace(conv, torch.randn(2, 3, 8, 8), ignored_layers=[conv[3]])
    assert [(gr.root, gr.exact) for gr in g.groups] == [("0", True)]
    assert "Mean" in g.groups[0].ops and not g.unknown_ops


class _Pool(nn.Module):
    def forward(self, x):
        return x.mean((2, 3))


def test_reduced_dims_reads_what_autograd_saved():
    x = torch.randn(2, 3, 4, requires_grad=True)
    assert reduced_dims(x.mean(-1).grad_fn) == ((2,), 3)
    assert reduced_dims(x.mean().grad_fn) == ((0, 1, 2), 3)
    assert reduced_dims(x.softmax(1).grad_fn) == ((1,), 3)
    assert reduced_dims(F.layer_norm(x, (3, 4)).grad_fn) == ((1, 2), 3)
    assert reduced_dims(x.amax((0, -1)).grad_fn) == ((0, 2), 3)
    assert {"Mean", "Var", "Softmax", "NativeLayerNorm"} <= REDUCTIONS and "Sum" not in REDUCTIONS


def test_outputs_that_are_not_tensors_are_left_out_of_the_trace():
    class Cache:   # a Hugging Face DynamicCache stands beside the logits in the output
        pass

    class WithCache(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.head = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            return {"logits": self.head(torch.relu(self.a(x))), "cache": Cache(), "n": 3}

    m = WithCache()
    g = eg.trace(m, torch.randn(2, 4), ignored_layers=[m.head])
    assert [(gr.root, gr.size, gr.exact) for gr in g.groups] == [("a", 6, True)]
