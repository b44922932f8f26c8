"""Attention handlers: heads and head dimensions as units, prune == mask, bookkeeping and scale kept.

The modules here are written for the test (not zoo models): torch's own encoder/decoder layers in
other configurations than the zoo's, a timm-style ViT attention with a fused qkv Linear, and a
hand-written attention the engine has no handler for.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import etp_graph as eg
from etp_graph.testing import assert_prune_equivalent


def _attention_groups(graph):
    return [g for g in graph.groups if "attention" in g.ops]


class _MHAMasked(nn.Module):
    """A bare MHA (sequence-first) called with a key padding mask and a causal mask."""

    def __init__(self, need_weights=True):
        super().__init__()
        self.need_weights = need_weights
        self.inp = nn.Linear(5, 24)
        self.att = nn.MultiheadAttention(24, 6)
        self.head = nn.Linear(24, 3)

    def forward(self, x):
        h = self.inp(x).transpose(0, 1)                      # (L, B, E)
        L = h.shape[0]
        kpm = torch.zeros(x.shape[0], L, dtype=torch.bool)
        kpm[0, -2:] = True
        causal = torch.ones(L, L, dtype=torch.bool).triu(1)
        a, _ = self.att(h, h, h, key_padding_mask=kpm, attn_mask=causal, need_weights=self.need_weights)
        return self.head(a.transpose(0, 1) + h.transpose(0, 1))


@pytest.mark.parametrize("kind,need_weights", [("heads", True), ("head_dims", False)])
def test_mha_with_masks_prunes_heads_exactly_and_updates_bookkeeping(kind, need_weights):
    torch.manual_seed(0)
    m = _MHAMasked(need_weights).eval()
    x = torch.randn(3, 7, 5)
    graph = eg.trace(m, x, ignored_layers=[m.head], attention_units=kind)
    (att,) = _attention_groups(graph)
    assert att.size == (6 if kind == "heads" else 4)
    assert_prune_equivalent(m, x, ignored_layers=[m.head], attention_units=kind)
    masked = copy.deepcopy(m)
    att.zero_([0, 2], model=masked)
    att.prune([0, 2])
    assert (m.att.num_heads, m.att.head_dim) == ((4, 4) if kind == "heads" else (6, 2))
    assert m.att.etp_scale == pytest.approx(4 ** -0.5)           # the unpruned 1/sqrt(d_head)
    assert m.att.in_proj_weight.shape == ((48, 24) if kind == "heads" else (36, 24))
    with torch.no_grad():
        torch.testing.assert_close(masked(x), m(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm_first,activation", [(True, "gelu"), (False, "relu")])
def test_torch_encoder_stack_prunes_heads_ffn_and_width(norm_first, activation):
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(16, 4, 20, dropout=0.0, batch_first=True,
                                       norm_first=norm_first, activation=activation)
    model = nn.Sequential(nn.Linear(3, 16), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                          nn.Linear(16, 2)).eval()
    x = torch.randn(2, 5, 3)
    graph = eg.trace(model, x, ignored_layers=[model[2]])
    assert sorted((g.root, g.size) for g in graph.groups) == [
        ("0", 16), ("1.layers.0.linear1", 20), ("1.layers.0.self_attn", 4),
        ("1.layers.1.linear1", 20), ("1.layers.1.self_attn", 4)]
    assert not graph.skipped
    checks = assert_prune_equivalent(model, x, ignored_layers=[model[2]])
    assert {c.checked for c in checks if c.root == "0"} == {"shape"}   # LayerNorm over the width
    # the fused inference fast path must not run on a pruned layer: compare in inference_mode
    masked = copy.deepcopy(model)
    for g in _attention_groups(graph):
        g.zero_([1, 3], model=masked)
        g.prune([1, 3])
    with torch.inference_mode():
        torch.testing.assert_close(masked(x), model(x), rtol=1e-5, atol=1e-6)
    assert model[1].layers[0].self_attn.num_heads == 2


def test_decoder_cross_attention_heads_prune_and_memory_width_is_refused_with_reason():
    torch.manual_seed(2)
    dec = nn.TransformerDecoderLayer(12, 3, 16, dropout=0.0, batch_first=True)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.src, self.tgt, self.dec, self.head = nn.Linear(4, 12), nn.Linear(4, 12), dec, nn.Linear(12, 2)

        def forward(self, s, t):
            return self.head(self.dec(self.tgt(t), self.src(s)))

    net = Net().eval()
    x = (torch.randn(2, 6, 4), torch.randn(2, 5, 4))
    graph = eg.trace(net, x, ignored_layers=[net.head])
    assert sorted(g.root for g in _attention_groups(graph)) == ["dec.multihead_attn", "dec.self_attn"]
    assert any("cross attention" in s.reason for s in graph.skipped), graph.table()
    assert_prune_equivalent(net, x, ignored_layers=[net.head])


class ViTAttention(nn.Module):
    """timm-style: the forward hard-codes C and C // num_heads."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class TinyViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 24, 4, stride=4)
        self.norm1, self.attn = nn.LayerNorm(24), ViTAttention(24, 3)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(24), nn.Linear(24, 40), nn.Linear(40, 24)
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = t + self.attn(self.norm1(t))
        t = t + self.fc2(F.gelu(self.fc1(self.norm2(t))))
        return self.head(t.mean(1))


@pytest.mark.parametrize("kind", ["heads", "head_dims"])
def test_fused_qkv_vit_attention_prunes_heads_and_width(kind):
    torch.manual_seed(3)
    vit = TinyViT().eval()
    x = torch.randn(2, 3, 16, 16)
    graph = eg.trace(vit, x, ignored_layers=[vit.head], attention_units=kind)
    assert sorted((g.root, g.size) for g in graph.groups) == sorted(
        [("patch", 24), ("attn", 3 if kind == "heads" else 8), ("fc1", 40)])
    assert not graph.skipped
    assert_prune_equivalent(vit, x, ignored_layers=[vit.head], attention_units=kind)
    (att,) = _attention_groups(graph)
    masked = copy.deepcopy(vit)
    att.zero_([1], model=masked)
    att.prune([1])
    with torch.no_grad():
        torch.testing.assert_close(masked(x), vit(x), rtol=1e-5, atol=1e-6)
    assert isinstance(vit.attn, ViTAttention) and vit.attn.etp_scale == pytest.approx(8 ** -0.5)


def test_failed_step_restores_the_original_attention_class():
    torch.manual_seed(4)
    vit = TinyViT().eval()
    x = torch.randn(2, 3, 16, 16)
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    pruner = eg.ETPPruner(vit, x, ignored_layers=[vit.head], pruning_ratio=0.34)
    original = vit.fc2.weight

    def broken(*a, **k):
        raise RuntimeError("boom")
    for g in pruner.graph.groups:
        if g.root == "fc1":
            g._renumber = broken   # fail after every group (the attention's too) was cut
    with pytest.raises(RuntimeError, match="boom"):
        pruner.step()
    assert type(vit.attn) is ViTAttention and not hasattr(vit.attn, "etp_scale")
    assert vit.fc2.weight is original
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())


class HardCodedAttention(nn.Module):
    """Separate q/k/v Linears, a fixed head count in the view: no handler knows this module."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        B, L, _ = x.shape
        q, k, v = (p(x).view(B, L, 4, 4).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = (q @ k.transpose(-2, -1) / 2.0).softmax(-1) @ v
        return self.o(a.transpose(1, 2).reshape(B, L, 16))


def test_unknown_attention_is_refused_with_a_reason_never_pruned_wrongly():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(3, 16), HardCodedAttention(), nn.Linear(16, 2))
    x = torch.randn(2, 6, 3)
    graph = eg.trace(net, x, ignored_layers=[net[2]])
    (refused,) = [s for s in graph.skipped if s.root == "1.q"]
    # its heads are found from the trace, but the literal 4 in its view cannot follow a cut
    assert refused.reason.startswith("attention heads: pruning units"), refused.reason
    assert "'1' (HardCodedAttention)" in refused.reason and "hard-coded shape" in refused.reason
    assert not any(g.root in ("1.q", "1.k", "1.v") for g in graph.groups)
    assert_prune_equivalent(net, x, ignored_layers=[net[2]])   # whatever is returned is exact


def test_etp_penalty_on_heads_matches_the_closed_form():
    """Units are heads: unit h's squared norm is the sum over its q/k/v rows, biases and
    output columns; the penalty orders heads by distance from the pivot."""
    torch.manual_seed(6)
    m = _MHAMasked()
    x = torch.randn(2, 5, 5)
    cfg = eg.ETPConfig(beta=0.3, c=5.0, pivot=0)
    pruner = eg.ETPPruner(m, x, ignored_layers=[m.head], config=cfg, pruning_ratio=0.5)
    (att,) = _attention_groups(pruner.graph)
    W, b, O = m.att.in_proj_weight, m.att.in_proj_bias, m.att.out_proj.weight
    H, d, E = 6, 4, 24
    sq = []
    for h in range(H):
        rows = [blk * E + h * d + j for blk in range(3) for j in range(d)]
        cols = [h * d + j for j in range(d)]
        sq.append(W[rows].pow(2).sum() + b[rows].pow(2).sum() + O[:, cols].pow(2).sum())
    sq = torch.stack(sq)
    torch.testing.assert_close(att.unit_norms().pow(2), sq)
    w = torch.exp(5.0 * torch.arange(H, dtype=torch.float32) / H)
    expected_att = 0.3 / H * (w * sq).sum()
    others = sum(0.3 / g.size * (torch.exp(5.0 * torch.arange(g.size) / g.size) * g.unit_norms().pow(2)).sum()
                 for g in pruner.graph.groups if g is not att)
    torch.testing.assert_close(pruner.penalty(), expected_att + others)
    # the q/k/v biases belong to the heads group only: their gradient is 2·beta·w(h)/N · b
    m.zero_grad()
    pruner.penalty().backward()
    for h in (0, 5):
        rows = [blk * E + h * d + j for blk in range(3) for j in range(d)]
        torch.testing.assert_close(b.grad[rows], 2 * 0.3 * w[h] / H * b[rows].detach())


def test_save_and_load_a_pruned_attention_model(tmp_path):
    torch.manual_seed(7)
    vit = TinyViT().eval()
    mha = _MHAMasked().eval()
    for model, x, head in ((vit, torch.randn(2, 3, 16, 16), vit.head), (mha, torch.randn(2, 5, 5), mha.head)):
        eg.ETPPruner(model, x, ignored_layers=[head], pruning_ratio=0.34).step()
        eg.save_pruned(model, tmp_path / "m.pt")
        fresh = type(model)().eval() if model is vit else _MHAMasked().eval()
        eg.load_pruned(fresh, tmp_path / "m.pt")
        with torch.no_grad():
            torch.testing.assert_close(fresh(x), model(x))
        torch.save(model, tmp_path / "whole.pt")            # pickling the whole model works too
        whole = torch.load(tmp_path / "whole.pt", weights_only=False)
        assert type(whole) is type(model)
        with torch.no_grad():
            torch.testing.assert_close(whole(x), model(x))


class WindowAttention(nn.Module):
    """Swin-style (torchvision's ``shifted_window_attention``, no shift): ``qkv`` and ``proj``
    applied through their parameters, windows cut out of a ``(B, H, W, C)`` map, the head size
    read from the input width, and a per-head bias table: ``qkv``, ``proj`` and ``num_heads``
    like a ViT's fused attention, another forward."""

    def __init__(self, dim, num_heads, window=2):
        super().__init__()
        self.num_heads, self.window = num_heads, window
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.bias_table = nn.Parameter(0.1 * torch.randn(window * window, window * window, num_heads))

    def forward(self, x):
        B, H, W, C = x.shape
        w = self.window
        t = x.view(B, H // w, w, W // w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, C)
        qkv = F.linear(t, self.qkv.weight, self.qkv.bias)
        qkv = qkv.reshape(t.size(0), w * w, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        a = (q * (C // self.num_heads) ** -0.5) @ k.transpose(-2, -1) + self.bias_table.permute(2, 0, 1)
        t = (a.softmax(-1) @ v).transpose(1, 2).reshape(t.size(0), w * w, C)
        t = F.linear(t, self.proj.weight, self.proj.bias)
        return t.view(B, H // w, W // w, w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)


class TinySwin(nn.Module):
    def __init__(self, norm=True):
        super().__init__()
        make = (lambda: nn.LayerNorm(16)) if norm else nn.Identity
        self.patch, self.norm0 = nn.Conv2d(3, 16, 2, stride=2), make()
        self.norm1, self.attn = make(), WindowAttention(16, 4)
        self.norm2, self.fc1, self.fc2 = make(), nn.Linear(16, 24), nn.Linear(24, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        t = self.norm0(self.patch(x).permute(0, 2, 3, 1))
        t = t + self.attn(self.norm1(t))
        t = t + self.fc2(F.gelu(self.fc1(self.norm2(t))))
        return self.head(t.mean((1, 2)))


@pytest.mark.parametrize("norm", [True, False])
def test_a_window_attention_named_like_a_vit_goes_with_its_width(norm):
    """The fused-qkv handler claims a module by its names only where its replacement forward
    computes what the module's own does; this one's forward (windows, a bias table, the head
    size from the input width) is other, so its heads are found from the trace, joined with the
    width they must equal (a head goes with 4 channels of it), and the bias table is cut with
    its heads. ``qkv``/``proj`` run as ``F.linear`` on their parameters: followed all the same."""
    torch.manual_seed(6)
    net = TinySwin(norm).eval()
    x = torch.randn(2, 3, 8, 8)
    assert eg.handlers.get_handler(net.attn) is None
    assert eg.handlers.get_handler(ViTAttention(16, 4)) is not None   # the ViT attention stays ours
    graph = eg.trace(net, x, ignored_layers=[net.head])
    assert not graph.skipped, graph.table()
    (joined,) = [g for g in graph.groups if any(it.module == "attn.qkv" for it in g.items)]
    assert joined.size == 4 and joined.exact is (not norm)
    assert {it.module for it in joined.items} >= {"patch", "attn.qkv", "attn.proj", "fc1", "fc2"}
    assert sorted(g.size for g in graph.groups) == [4, 24]
    checks = assert_prune_equivalent(net, x, ignored_layers=[net.head])
    assert {c.checked for c in checks} == ({"shape", "values"} if norm else {"values"})
    joined.prune([1])
    assert net.attn.num_heads == 3 and net.attn.bias_table.shape == (4, 4, 3)
    assert net.patch.out_channels == 12 and net(x).shape == (2, 5)
