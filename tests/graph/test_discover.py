"""Attention found from the trace (graph.shadow + graph.discover): hand-written attentions that
no handler claims, with their head counts under names the engine has never seen."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import etp_graph as eg
from etp_graph.testing import assert_prune_equivalent

B, T, C = 2, 6, 32


class Block(nn.Module):
    """x + attn(x), then a head; the attention is one of the variants below."""

    def __init__(self, attn):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.attn, self.head = nn.Linear(8, C), attn, nn.Linear(C, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.head(h + self.attn(h))


class Separate(nn.Module):
    """q, k, v, o as four Linears, SDPA; the head count lives in ``self.n_h``."""

    def __init__(self, n_h=4):
        super().__init__()
        self.n_h, self.d = n_h, C // n_h
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(C, C) for _ in range(4))

    def forward(self, x):
        split = lambda t: t.view(B, T, self.n_h, self.d).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(split(self.wq(x)), split(self.wk(x)), split(self.wv(x)))
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_h * self.d))


class Fused(nn.Module):
    """One fused projection, reshape → permute → unbind, eager softmax(q·kᵀ)·v; the head count
    in ``self.groups_of_heads`` and the width in ``self.width``."""

    def __init__(self, heads=4):
        super().__init__()
        self.groups_of_heads, self.width = heads, C
        self.packed, self.out = nn.Linear(C, 3 * C), nn.Linear(C, C)

    def forward(self, x):
        q, k, v = self.packed(x).reshape(B, T, 3, self.groups_of_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        att = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)
        return self.out((att @ v).transpose(1, 2).reshape(B, T, self.width))


class GQA(nn.Module):
    """4 query heads share 2 key/value heads (``repeat_kv``-style expand + reshape)."""

    def __init__(self):
        super().__init__()
        self.q_heads, self.kv_heads, self.hd = 4, 2, 8
        self.q, self.k, self.v = nn.Linear(C, 32), nn.Linear(C, 16), nn.Linear(C, 16)
        self.o = nn.Linear(32, C)

    def forward(self, x):
        q = self.q(x).view(B, T, -1, self.hd).transpose(1, 2)
        k, v = (p(x).view(B, T, -1, self.hd).transpose(1, 2) for p in (self.k, self.v))
        rep = self.q_heads // self.kv_heads
        k, v = (t[:, :, None].expand(B, t.shape[1], rep, T, self.hd).reshape(B, -1, T, self.hd) for t in (k, v))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


def _rotate_half(x):
    a, b = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-b, a), dim=-1)


class Rotary(Separate):
    """LLaMA-style rotary embeddings on q and k: dims j and j + d/2 are mixed."""

    def forward(self, x):
        split = lambda t: t.view(B, T, self.n_h, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.wq(x)), split(self.wk(x)), split(self.wv(x))
        pos = torch.arange(T)[:, None] * torch.arange(1, q.shape[-1] // 2 + 1)[None] / 10
        cos, sin = torch.cat([pos.cos()] * 2, -1), torch.cat([pos.sin()] * 2, -1)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class TableBias(Separate):
    """A per-head relative position bias table ``[2T-1, heads]`` (Swin's layout), indexed and
    added to the scores, and a causal mask buffer all heads share."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(2 * T - 1, self.n_h))
        self.register_buffer("index", torch.arange(T)[:, None] - torch.arange(T)[None] + T - 1)
        self.register_buffer("mask", torch.full((T, T), -1e4).triu(1))

    def forward(self, x):
        split = lambda t: t.view(B, T, self.n_h, self.d).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.wq(x)), split(self.wk(x)), split(self.wv(x))
        bias = self.table[self.index.flatten()].view(T, T, -1).permute(2, 0, 1)
        att = (q @ k.transpose(-2, -1) * self.d ** -0.5 + bias + self.mask).softmax(-1)
        return self.wo((att @ v).transpose(1, 2).reshape(B, T, -1))


class Einsum(Separate):
    """``Separate`` written with ``einsum`` for the scores and the weighted values (MaxViT's and
    many research codebases' style)."""

    def forward(self, x):
        split = lambda t: t.view(B, T, self.n_h, self.d).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.wq(x)), split(self.wk(x)), split(self.wv(x))
        att = (torch.einsum("bhtd,bhsd->bhts", q, k) * self.d ** -0.5).softmax(-1)
        return self.wo(torch.einsum("bhts,bhsd->bthd", att, v).reshape(B, T, -1))


class BaddbmmByName(Separate):
    """BLOOM's scores: ``bias.baddbmm(batch1=q, batch2=kᵀ)``, the operands passed by name."""

    def forward(self, x):
        split = lambda t: t.view(B, T, self.n_h, self.d).transpose(1, 2).reshape(B * self.n_h, T, self.d)  # noqa: E731
        q, k, v = split(self.wq(x)), split(self.wk(x)), split(self.wv(x))
        att = torch.zeros(1, T, T).baddbmm(batch1=q, batch2=k.transpose(1, 2), alpha=self.d ** -0.5).softmax(-1)
        y = torch.bmm(att, v).view(B, self.n_h, T, self.d).transpose(1, 2)
        return self.wo(y.reshape(B, T, self.n_h * self.d))


X = torch.randn(B, T, 8)


def _attention(model, units="heads"):
    g = eg.trace(model, X, ignored_layers=[model.head], attention_units=units)
    att = [gr for gr in g.groups if "attention" in gr.ops]
    return g, att


class Scaled(Separate):
    """``Separate`` with the softmax scale fixed at construction (as Hugging Face passes it)."""

    def forward(self, x):
        split = lambda t: t.view(B, T, self.n_h, self.d).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(split(self.wq(x)), split(self.wk(x)), split(self.wv(x)), scale=8 ** -0.5)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_h * self.d))


@pytest.mark.parametrize("attn, units, heads, dims, counters", [
    (Separate, "heads", 4, 8, [("n_h", 1)]),
    (Fused, "heads", 4, 8, [("groups_of_heads", 1), ("width", 8)]),
    (Scaled, "head_dims", 4, 8, [("d", 1)]),
    (Einsum, "heads", 4, 8, [("n_h", 1)]),
    (BaddbmmByName, "heads", 4, 8, [("n_h", 1)]),
], ids=["separate", "fused", "head_dims", "einsum", "baddbmm-by-name"])
def test_heads_found_from_the_trace(attn, units, heads, dims, counters):
    m = Block(attn())
    g, att = _attention(m, units)
    assert not g.skipped, g.skipped
    (a,) = att
    assert a.size == (heads if units == "heads" else dims) and a.exact
    assert sorted((c.attr, c.per_unit) for c in a.counters) == counters
    checks = assert_prune_equivalent(m, X, ignored_layers=[m.head], attention_units=units)
    assert all(c.checked == "values" for c in checks if c.root == a.root)
    before = m.attn.wo.in_features if hasattr(m.attn, "wo") else m.attn.out.in_features
    a.prune([0, a.size - 1])
    after = m.attn.wo.in_features if hasattr(m.attn, "wo") else m.attn.out.in_features
    assert after == before - 2 * (dims if units == "heads" else heads)
    assert m(X).shape == (B, T, 3)


def test_fused_projection_rows_of_one_head_are_its_q_k_and_v():
    m = Block(Fused())
    _, (a,) = _attention(m)
    rows = {i.owner: i for i in a.items if i.role == "out" and i.attr == "weight"}["attn.packed"]
    head0 = sorted(rows.index[rows.unit == 0].tolist())
    assert head0 == list(range(0, 8)) + list(range(32, 40)) + list(range(64, 72))


def test_grouped_query_attention_unit_is_a_kv_head_with_its_query_heads():
    m = Block(GQA())
    _, (a,) = _attention(m)
    assert a.size == 2
    q = next(i for i in a.items if i.owner == "attn.q" and i.attr == "weight")
    k = next(i for i in a.items if i.owner == "attn.k" and i.attr == "weight")
    assert sorted(q.index[q.unit == 0].tolist()) == list(range(16))   # query heads 0 and 1
    assert sorted(k.index[k.unit == 0].tolist()) == list(range(8))    # key/value head 0
    assert_prune_equivalent(m, X, ignored_layers=[m.head])
    a.prune([1])
    assert (m.attn.q.out_features, m.attn.k.out_features, m.attn.o.in_features) == (16, 8, 16)
    assert m(X).shape == (B, T, 3)


def test_rotary_embeddings_offer_whole_heads_only_with_the_reason():
    m = Block(Rotary())
    _, (a,) = _attention(m, "heads")
    assert a.size == 4
    assert_prune_equivalent(m, X, ignored_layers=[m.head])
    g, att = _attention(m, "head_dims")
    assert not att
    (why,) = [s.reason for s in g.skipped if s.root == "attn.wq"]
    assert "rotary" in why and "attention_units='heads'" in why


def test_per_head_table_is_cut_with_its_head_and_a_shared_mask_is_not():
    m = Block(TableBias())
    g, (a,) = _attention(m)
    assert a.size == 4 and not g.skipped
    (table,) = [i for i in a.items if i.attr == "table"]
    assert table.owner == "attn" and table.dim == 1 and table.unit.tolist() == [0, 1, 2, 3]
    assert not [i for i in a.items if i.attr == "mask"]
    assert_prune_equivalent(m, X, ignored_layers=[m.head])
    a.prune([2])
    assert m.attn.table.shape == (2 * T - 1, 3) and m.attn.mask.shape == (T, T) and m(X).shape == (B, T, 3)
    g, att = _attention(m, "head_dims")
    assert not att and "one value per head" in next(s.reason for s in g.skipped if s.root == "attn.wq")


def test_the_cut_updates_only_the_attributes_the_forward_needs():
    class Unused(Separate):
        def __init__(self):
            super().__init__()
            self.layer_idx = 4     # equal to the head count, read in the forward, not a count

        def forward(self, x):
            assert self.layer_idx == 4
            return super().forward(x)

    m = Block(Unused())
    _, (a,) = _attention(m)
    a.prune([1])
    assert m.attn.layer_idx == 4 and m.attn.n_h == 3 and m(X).shape == (B, T, 3)
    # n_h: the forward's view needs it; the head size d stays
    assert [(c.attr, c.per_unit) for c in a.counters] == [("n_h", 1)]


@pytest.mark.parametrize("attn, why", [(Separate, "default scale"), (Fused, "differs between masking and pruning")])
def test_head_dims_that_change_the_softmax_scale_are_refused(attn, why):
    m = Block(attn())
    g, att = _attention(m, "head_dims")
    assert not att and why in g.skipped[0].reason


class HardCodedWidth(Separate):
    """The heads' output reshaped to the input's width ``C`` (MaxViT's ``reshape(B, G, P, D)``):
    removing a head breaks the forward whatever attribute is updated."""

    def forward(self, x):
        split = lambda t: t.view(B, T, self.n_h, self.d).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.wq(x)), split(self.wk(x)), split(self.wv(x))
        att = torch.einsum("bhtd,bhsd->bhts", q, k).softmax(-1)
        return self.wo(torch.einsum("bhts,bhsd->bhtd", att, v).transpose(1, 2).reshape(B, T, x.shape[-1]))


class ThreeOperands(Separate):
    """Scores from a three-operand ``einsum`` (a per-head scale): an op the shadow run does not
    follow."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(self.n_h))

    def forward(self, x):
        split = lambda t: t.view(B, T, self.n_h, self.d).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.wq(x)), split(self.wk(x)), split(self.wv(x))
        att = torch.einsum("bhtd,bhsd,h->bhts", q, k, self.scale).softmax(-1)
        return self.wo((att @ v).transpose(1, 2).reshape(B, T, -1))


def test_an_attention_whose_forward_ties_its_heads_to_the_width_is_cut_with_that_width():
    """A head can go only with as many channels of the hidden width: one group, unit ``k`` =
    head ``k`` and width channels ``[8k, 8k + 8)``, checked by value (no normalisation here)."""
    m = Block(HardCodedWidth())
    g = eg.trace(m, X, ignored_layers=[m.head])
    assert not g.skipped, g.table()
    (joint,) = g.groups
    assert joint.size == 4 and joint.exact and "attention" in joint.ops
    assert {it.owner for it in joint.items} == {"inp", "attn.wq", "attn.wk", "attn.wv", "attn.wo", "head"}
    assert [(c.attr, c.per_unit) for c in joint.counters] == [("n_h", 1)]
    checks = assert_prune_equivalent(m, X, ignored_layers=[m.head])
    assert [c.checked for c in checks] == ["values"] * 3
    joint.prune([1])
    assert (m.inp.out_features, m.attn.wq.out_features, m.attn.n_h, m.head.in_features) == (C - 8, C - 8, 3, C - 8)
    assert m(X).shape == (B, T, 3)


@pytest.mark.parametrize("attn, why", [
    (ThreeOperands, "matrix product"),
], ids=["three-operand-einsum"])
def test_an_attention_the_trace_cannot_complete_is_refused_with_a_reason(attn, why):
    m = Block(attn())
    before = {k: v.clone() for k, v in m.state_dict().items()}
    g = eg.trace(m, X, ignored_layers=[m.head])
    assert not [gr for gr in g.groups if "attention" in gr.ops]
    reasons = [s.reason for s in g.skipped if s.root.startswith("attn.w")]
    assert reasons and any(why in r for r in reasons), reasons
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_query_heads_of_grouped_query_attention_go_one_per_key_value_head():
    """``attention_units="query_heads"``: unit ``s`` is the ``s``-th query head of every key/value
    head (query heads 0 and 2 for ``s = 0``); keys and values stay, and the forward's own ratio
    (``q_heads // kv_heads``) follows because ``q_heads`` loses one head per key/value head."""
    m = Block(GQA())
    g, (a,) = _attention(m, "query_heads")
    assert a.size == 2 and not g.skipped
    q = next(i for i in a.items if i.owner == "attn.q" and i.attr == "weight")
    assert sorted(q.index[q.unit == 0].tolist()) == list(range(8)) + list(range(16, 24))
    assert not [i for i in a.items if i.owner in ("attn.k", "attn.v")]
    o = next(i for i in a.items if i.owner == "attn.o" and i.attr == "weight")
    assert sorted(o.index[o.unit == 1].tolist()) == list(range(8, 16)) + list(range(24, 32))
    assert [(c.attr, c.per_unit) for c in a.counters] == [("q_heads", 2)]
    checks = assert_prune_equivalent(m, X, ignored_layers=[m.head], attention_units="query_heads")
    assert all(c.checked == "values" for c in checks if c.root == a.root)
    a.prune([1])
    assert (m.attn.q.out_features, m.attn.k.out_features, m.attn.o.in_features, m.attn.q_heads) == (16, 16, 16, 2)
    assert m(X).shape == (B, T, 3)


class Frequencies(nn.Module):
    """A rotary embedding's table of frequencies (a buffer ``[d/2]``) turned into cos/sin once
    and handed to every layer, as Hugging Face's LLaMA does."""

    def __init__(self, d):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / 100 ** (torch.arange(0, d, 2) / d), persistent=False)

    def forward(self, x):
        ang = torch.arange(T, dtype=x.dtype)[:, None] * self.inv_freq[None]
        emb = torch.cat([ang, ang], -1)
        return emb.cos(), emb.sin()


class MultiQuery(nn.Module):
    """Multi-query attention: 4 query heads share one key/value head, rotary on q and k."""

    def __init__(self):
        super().__init__()
        self.n_q, self.hd = 4, 8
        self.q, self.kv = nn.Linear(C, 32), nn.Linear(C, 16)
        self.o = nn.Linear(32, C)

    def forward(self, x, cos, sin):
        q = self.q(x).view(B, T, -1, self.hd).transpose(1, 2)
        k, v = self.kv(x).view(B, T, 1, 2 * self.hd).transpose(1, 2).split(self.hd, dim=-1)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k.expand(B, self.n_q, T, self.hd), v.expand(B, self.n_q, T, self.hd))
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


class TwoMultiQuery(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.rope, self.head = nn.Linear(8, C), Frequencies(8), nn.Linear(C, 3)
        self.a0, self.a1 = MultiQuery(), MultiQuery()

    def forward(self, x):
        h = self.inp(x)
        cos, sin = self.rope(h)
        h = h + self.a0(h, cos, sin)
        return self.head(h + self.a1(h, cos, sin))


def test_multi_query_attention_prunes_its_query_heads_and_the_rotary_table_joins_no_layers():
    """One key/value head: whole heads means query heads. The frequencies every layer reads meet
    each head at dimensions ``j`` and ``j + d/2``, not as a per-head table: the two layers stay
    two attentions and the table is not cut."""
    m = TwoMultiQuery()
    g, att = _attention(m)
    assert not g.skipped, g.skipped
    assert [(a.root, a.size) for a in att] == [("a0.q", 4), ("a1.q", 4)]
    assert all(i.owner != "rope" for a in att for i in a.items)
    assert all(not [i for i in a.items if i.owner.endswith(".kv")] for a in att)
    checks = assert_prune_equivalent(m, X, ignored_layers=[m.head])
    assert all(c.checked == "values" for c in checks if c.root in ("a0.q", "a1.q"))
    att[1].prune([0, 3])
    assert (m.a1.q.out_features, m.a1.kv.out_features, m.a1.o.in_features, m.a1.n_q) == (16, 16, 16, 2)
    assert m(X).shape == (B, T, 3)
