"""Channel flows (etp_graph.graph.flow): ShuffleNet v2's stage width is one group whose units keep
every chunk's halves equal and every shuffle aligned; MaxViT's heads go with the width their
forward reshapes to."""
import importlib

import pytest
import torch
from torch import nn

import etp_graph as eg
from etp_graph.graph import flow
from etp_graph.testing import assert_prune_equivalent
from etp_graph.zoo.tiny import TinyShuffleNetV2, _conv_bn
from graph_models import DeepStage, departition, partition


def test_balanced_joins_classes_that_cancel_and_leaves_out_what_nothing_cancels():
    # two halves of one split: a class in the first half (-1) goes with one in the second (+1)
    classes, vectors = [[0], [1], [2], [3]], [(-1,), (-1,), (1,), (1,)]
    assert flow.balanced(classes, vectors) == [[0, 2], [1, 3]]
    # a class already balanced is a unit alone; the fewest classes cancel (two +1 for one -2)
    assert flow.balanced([[0, 4], [1], [2], [3]], [(0,), (-2,), (1,), (1,)]) == [[0, 4], [1, 2, 3]]
    # nothing cancels +1: it stays out of the units (never removed)
    assert flow.balanced([[0], [1], [2]], [(1,), (-1,), (1,)]) == [[0, 1]]


def test_balanced_gives_up_past_its_state_limit(monkeypatch):
    monkeypatch.setattr(flow, "BALANCE_STATES", 3)
    vectors = [(k, -k, 2 * k) for k in (1, 2, 3, 4, 5)] + [(-15, 15, -30)]
    assert flow.balanced([[k] for k in range(6)], vectors) is None


def test_a_shufflenet_v2_stage_is_one_group_whose_cuts_keep_the_halves_equal():
    model = TinyShuffleNetV2().eval()
    x = torch.randn(2, 3, 16, 16)
    g = eg.trace(model, x, ignored_layers=[model.fc])
    assert not g.skipped, g.table()
    (stage,) = [grp for grp in g.groups if "Split" in grp.ops]
    assert stage.root == "stage.0.branch1.1.0" and stage.size == 2 and stage.exact
    owners = {it.owner for it in stage.items}
    # births of every unit, the per-channel layers they pass, the convolutions that read them
    assert {"stage.0.branch1.1.0", "stage.0.branch2.2.0", "stage.1.branch2.2.0", "stage.2.branch2.2.0",
            "stage.1.branch2.0.0", "stage.2.branch2.0.0", "conv5.0", "stage.0.branch1.1.1"} <= owners
    checks = assert_prune_equivalent(model, x, ignored_layers=[model.fc])
    assert [c.checked for c in checks if c.root == stage.root] == ["values"] * 3
    before = model.stage[1].branch2[0][0].in_channels
    stage.prune([0])
    # a unit is four of the eight pairs: the stage's width 16 -> 8, every chunk's halves 8 -> 4
    assert model.conv5[0].in_channels == 8 and model.stage[1].branch2[0][0].in_channels == before - 4
    assert model(x).shape == (2, 4)


def test_flows_leave_a_glu_and_a_kept_group_alone(monkeypatch):
    """A model whose splits the backend's path already handles (GLU halves) gets nothing from the
    flows: the same groups and refusals as with the flows switched off; the split with fixed
    sizes stays refused with its own reason."""
    e = eg.zoo.entry("tiny_glu")
    model, x = e.build(), e.example_inputs()
    g = eg.trace(model, x, ignored_layers=e.heads(model))
    def off_run(*args, **kwargs):
        raise RuntimeError("flows switched off")
    monkeypatch.setattr(importlib.import_module("etp_graph.graph.trace"), "flow_run", off_run)
    off = eg.trace(model, x, ignored_layers=e.heads(model))
    assert [(grp.root, grp.size) for grp in g.groups] == [(grp.root, grp.size) for grp in off.groups]
    assert g.groups and g.skipped == off.skipped
    assert [s.reason for s in g.skipped if "fixed sizes [4, 3]" in s.reason]


@pytest.mark.parametrize("blocks, units", [(2, 4), (3, 2)])
def test_units_follow_the_depth_of_the_chain(blocks, units):
    """Width 16 (8 pairs): one chunk after the first unit balances pairs two by two (4 units),
    two chunks four by four (2 units)."""
    model, x = DeepStage(blocks, plain=True).eval(), torch.randn(2, 3, 16, 16)
    g = eg.trace(model, x, ignored_layers=[model.fc])
    (stage,) = [grp for grp in g.groups if "Split" in grp.ops]
    assert stage.size == units
    assert_prune_equivalent(model, x, ignored_layers=[model.fc])


class PartitionAttention(nn.Module):
    """MaxViT's partition attention (torchvision's ``maxvit.py``, rebuilt): window partition of
    ``(B, C, H, W)`` into channel-last windows (the grid swap optional), pre-norm, fused q/k/v,
    ``einsum`` scores with a per-head relative-position table, the heads' output reshaped to the
    input's width ``D = x.shape[-1]``, a residual, departition."""

    def __init__(self, c: int, head_dim: int, p: int, grid: bool, window: int = 2):
        super().__init__()
        self.p, self.grid, self.n_heads, self.head_dim = p, grid, c // head_dim, head_dim
        self.norm = nn.LayerNorm(c)
        self.to_qkv, self.merge = nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.table = nn.Parameter(torch.randn((2 * window - 1) ** 2, self.n_heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = coords[:, :, None] - coords[:, None, :] + window - 1     # every offset of two positions
        self.register_buffer("index", rel[0] * (2 * window - 1) + rel[1])

    def forward(self, x):
        t = partition(x, self.p, self.grid)
        B, G, P, D = t.shape
        q, k, v = self.to_qkv(self.norm(t)).chunk(3, dim=-1)
        q, k, v = (z.reshape(B, G, P, self.n_heads, self.head_dim).permute(0, 1, 3, 2, 4) for z in (q, k, v))
        bias = self.table[self.index.view(-1)].view(P, P, -1).permute(2, 0, 1).unsqueeze(0)
        a = (torch.einsum("bghid,bghjd->bghij", q, k) * D ** -0.5 + bias).softmax(-1)
        o = torch.einsum("bghij,bghjd->bghid", a, v).permute(0, 1, 3, 2, 4).reshape(B, G, P, D)
        return departition(t + self.merge(o), x.shape, self.p, self.grid)


class MaxViTLike(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = _conv_bn(3, 16, 3, 2)
        # 8×8 maps: windows of 2×2, and a 2×2 grid over 4×4 blocks (swapped to 4 positions)
        self.blocks = nn.Sequential(*[nn.Sequential(_conv_bn(16, 16), PartitionAttention(16, 4, 2, False),
                                                    PartitionAttention(16, 4, 4, True)) for _ in range(2)])
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def test_partition_attention_heads_go_with_the_width_their_forward_reshapes_to():
    model, x = MaxViTLike().eval(), torch.randn(2, 3, 16, 16)
    g = eg.trace(model, x, ignored_layers=[model.fc])
    assert not g.skipped, g.table()
    joint = [grp for grp in g.groups if "attention" in grp.ops]
    assert [grp.root for grp in joint] == ["blocks.0.1.to_qkv", "blocks.1.1.to_qkv"]
    for k, grp in enumerate(joint):
        assert grp.size == 4 and not grp.exact     # four heads of 4 channels; LayerNorm: shape-checked
        # with as many heads as head dims, a head_dim count also fits the reshapes: the check of
        # one unit alone (the bias table no longer broadcasts) leaves the head count
        assert sorted((c.attr, c.per_unit) for c in grp.counters) == [("n_heads", 1), ("n_heads", 1)]
        tensors = {f"{it.owner}.{it.attr}" for it in grp.items}
        assert {f"blocks.{k}.0.0.weight", f"blocks.{k}.1.table", f"blocks.{k}.2.table", f"blocks.{k}.2.merge.weight",
                f"blocks.{k}.1.norm.weight"} <= tensors
    assert_prune_equivalent(model, x, ignored_layers=[model.fc])
    joint[0].prune([0, 3])
    block = model.blocks[0]
    assert (block[0][0].out_channels, block[1].n_heads, block[2].table.shape[1], block[2].to_qkv.out_features) == \
        (8, 2, 2, 24)
    assert model(x).shape == (2, 4)


def test_a_forward_the_flows_cannot_follow_leaves_the_refusals(monkeypatch):
    trace_mod = importlib.import_module("etp_graph.graph.trace")

    def broken(*args, **kwargs):
        raise RuntimeError("no flows here")
    monkeypatch.setattr(trace_mod, "flow_run", broken)
    model = TinyShuffleNetV2().eval()
    g = eg.trace(model, torch.randn(2, 3, 16, 16), ignored_layers=[model.fc])
    assert "stage.0.branch1.1.0" in {s.root for s in g.skipped}
    assert not [grp for grp in g.groups if "Split" in grp.ops]
    assert [grp.id for grp in g.groups] == list(range(len(g.groups)))


@pytest.mark.parametrize("make", [TinyShuffleNetV2, MaxViTLike], ids=["shufflenet-v2", "maxvit"])
def test_etp_prunes_flow_groups_to_a_target_like_any_other(make):
    model, x = make().eval(), torch.randn(2, 3, 16, 16)
    pruner = eg.ETPPruner(model, x, ignored_layers=[model.fc], config=eg.ETPConfig(beta=1e-2), target_speedup=1.5)
    flows = [g for g in pruner.graph.groups if {"Split", "attention"} & set(g.ops)]
    assert flows
    before = eg.count_macs(model, x)
    for _ in range(2):
        pruner.penalty().backward()
    report = pruner.step()
    assert report.macs_before == before and report.macs_before / report.macs_after >= 1.5
    assert eg.count_macs(model, x) == report.macs_after
    # the pruned model traces again, its flow groups found anew on the narrower widths
    again = eg.trace(model, x, ignored_layers=[model.fc])
    assert [g.root for g in again.groups if {"Split", "attention"} & set(g.ops)] == [g.root for g in flows]
    assert model(x).shape == (2, 4)


class Patches(nn.Module):
    """torchvision's ViT input step: patches by a strided conv, reshaped with the width read from
    ``self.hidden_dim`` (and the token count from ``self.a_tokens``, which sorts first and also
    equals the width here), a learned position table, an MLP, a head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.hidden_dim, self.a_tokens = 16, 16
        self.conv_proj = nn.Conv2d(3, 16, 4, 4)
        self.pos = nn.Parameter(torch.randn(1, 16, 16))
        self.fc1, self.head = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x):
        n = x.shape[0]
        x = self.conv_proj(x).reshape(n, self.hidden_dim, self.a_tokens).permute(0, 2, 1) + self.pos
        return self.head(torch.relu(self.fc1(x))).mean(1)


def test_a_width_the_forward_reads_from_an_attribute_is_cut_with_that_attribute_updated():
    model, x = Patches().eval(), torch.randn(2, 3, 16, 16)
    g = eg.trace(model, x, ignored_layers=[model.head])
    assert not g.skipped, g.table()
    (width,) = [grp for grp in g.groups if grp.root == "conv_proj"]
    assert width.exact and [(c.owner, c.attr, c.per_unit) for c in width.counters] == [("", "hidden_dim", 1)]
    checks = assert_prune_equivalent(model, x, ignored_layers=[model.head])
    assert [c.checked for c in checks if c.root == "conv_proj"] == ["values"] * 3
    width.prune([0, 5, 9])
    assert (model.hidden_dim, model.a_tokens, model.conv_proj.out_channels, model.pos.shape[-1]) == (13, 16, 13, 13)
    assert model(x).shape == (2, 4)


class PositionTable(nn.Module):
    """A time series embedding: a Conv1d over time plus a fixed sinusoidal table (a buffer of
    ``max_len × width``, sliced to the sequence), an MLP, a head (Informer's DataEmbedding)."""

    def __init__(self, width: int = 16, max_len: int = 50):
        super().__init__()
        torch.manual_seed(0)
        self.token = nn.Conv1d(3, width, 3, padding=1)
        pos = torch.arange(max_len).unsqueeze(1).float()
        div = torch.exp(torch.arange(0, width, 2).float() * -(9.21 / width))
        pe = torch.zeros(max_len, width)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
        self.register_buffer("pe", pe, persistent=False)
        self.fc1, self.head = nn.Linear(width, 32), nn.Linear(32, 4)

    def forward(self, x):
        v = self.token(x.transpose(1, 2)).transpose(1, 2) + self.pe[: x.shape[1]]
        return self.head(torch.relu(self.fc1(v)))


def test_a_fixed_table_added_to_a_width_is_cut_with_it():
    model, x = PositionTable().eval(), torch.randn(2, 10, 3)
    g = eg.trace(model, x, ignored_layers=[model.head])
    assert not g.skipped, g.table()
    (width,) = [grp for grp in g.groups if grp.root == "token"]
    (pe,) = [it for it in width.items if it.attr == "pe"]
    assert width.exact and (pe.owner, pe.dim, pe.index.tolist()) == ("", 1, list(range(16)))
    checks = assert_prune_equivalent(model, x, ignored_layers=[model.head])
    assert [c.checked for c in checks if c.root == "token"] == ["values"] * 3
    width.prune([2, 7])
    assert model.pe.shape == (50, 14) and model(x).shape == (2, 10, 4)
