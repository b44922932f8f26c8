"""graph.verify: one mask-versus-prune experiment, typed mismatches, reasons that name the module."""
import copy
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

import etp_graph as eg
from etp_graph.testing import assert_prune_equivalent
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


class HardCoded(nn.Module):
    """Scales by a tensor made in the forward with a literal width: nothing can cut it."""

    def forward(self, x):
        return x * torch.arange(1.0, 5.0).view(1, 4, 1, 1)


def test_a_cut_that_breaks_the_forward_is_a_reason_naming_the_module():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), FixedWidth(), nn.Conv2d(4, 2, 1))
    g = eg.trace(m, torch.randn(1, 3, 4, 4), ignored_layers=[m[2]], validate=False).groups[0]
    why = check_group(m, torch.randn(1, 3, 4, 4), g)
    assert "breaks the forward in '1' (FixedWidth)" in why and "fixed-size tensor" in why
    # the trace then cuts the fixed tensor with the width (graph/flow.py: tables)
    (kept,) = eg.trace(m, torch.randn(1, 3, 4, 4), ignored_layers=[m[2]]).groups
    assert [(it.owner, it.attr, it.dim) for it in kept.items if it.attr == "offset"] == [("1", "offset", 1)]
    m = nn.Sequential(nn.Conv2d(3, 4, 1), HardCoded(), nn.Conv2d(4, 2, 1))
    graph = eg.trace(m, torch.randn(1, 3, 4, 4), ignored_layers=[m[2]])
    assert graph.groups == [] and "breaks the forward in '1' (HardCoded)" in graph.skipped[0].reason


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


# ---------------------------------------------------------------- round-off on a real network
class Bottleneck(nn.Module):
    def __init__(self, i, w, stride, down):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(i, w, 1, bias=False), nn.BatchNorm2d(w)
        self.conv2, self.bn2 = nn.Conv2d(w, w, 3, stride, 1, bias=False), nn.BatchNorm2d(w)
        self.conv3, self.bn3 = nn.Conv2d(w, w * 4, 1, bias=False), nn.BatchNorm2d(w * 4)
        self.downsample = (nn.Sequential(nn.Conv2d(i, w * 4, 1, stride, bias=False), nn.BatchNorm2d(w * 4))
                           if down else None)

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return torch.relu(self.bn3(self.conv3(y)) + idt)


class ResNet50(nn.Module):
    """torchvision's ResNet-50 layout (Bottleneck blocks 3-4-6-3, expansion 4)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        stages, i = [], 64
        for n, w, stride in ((3, 64, 1), (4, 128, 2), (6, 256, 2), (3, 512, 2)):
            stages.append(nn.Sequential(Bottleneck(i, w, stride, True), *(Bottleneck(w * 4, w, 1, False)
                                                                         for _ in range(n - 1))))
            i = w * 4
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(2048, 10)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))


def test_resnet50_with_large_weights_has_no_round_off_refusals():
    """torchvision's ResNet-50 layout, convolution weights at 3x the default scale and BatchNorm
    statistics re-estimated (64-px inputs): before the float64 re-check, a float32 verification
    refused one of its 37 groups ("max abs error 4.66e-05")."""
    torch.manual_seed(0)
    m = ResNet50()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.Conv2d):
                mod.weight.mul_(3.0)
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 2.0), mod.bias.normal_(0, 0.5)
                mod.momentum = None
        m.train()
        for _ in range(4):
            m(torch.randn(8, 3, 64, 64))
    g = eg.trace(m.eval(), torch.randn(2, 3, 64, 64), ignored_layers=[m.fc])
    assert (len(g.groups), g.skipped) == (37, [])


class Trigram(nn.Module):
    """MobileBERT's embedding: each token's vector beside its neighbours' (pads along the
    sequence of a (B, T, C) tensor), projected to a hidden width that a second embedding is
    added into; the hidden width and the embedding width are two exact groups, and the layer
    reading the embedding's channels is the one whose outputs are the hidden width."""

    def __init__(self, e=12, h=16):
        super().__init__()
        self.tok = nn.Embedding(50, e)
        self.proj = nn.Linear(3 * e, h)
        self.pos = nn.Embedding(10, h)
        self.head = nn.Linear(h, 3)

    def forward(self, ids):
        x = self.tok(ids)
        x = torch.cat([F.pad(x[:, 1:], [0, 0, 0, 1]), x, F.pad(x[:, :-1], [0, 0, 1, 0])], dim=2)
        return self.head(torch.relu(self.proj(x) + self.pos(torch.arange(ids.shape[1]))))


IDS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))


def test_a_pad_along_the_sequence_leaves_the_channels_where_they_are():
    torch.manual_seed(0)
    m = Trigram()
    g = eg.trace(m, IDS, ignored_layers=[m.head])
    tok = next(x for x in g.groups if x.root == "tok")
    assert tok.size == 12 and not g.skipped
    cols = next(i for i in tok.items if i.owner == "proj")
    assert sorted(cols.index.tolist()) == list(range(36))
    per_unit = cols.index.view(3, 12)   # unit u's column in each of the three copies
    assert all(set(per_unit[:, u].tolist()) == {u, 12 + u, 24 + u} for u in range(12))
    assert_prune_equivalent(m, IDS, ignored_layers=[m.head])


def test_a_wrong_map_read_by_a_layer_another_group_cuts_is_refused(monkeypatch):
    """The checks of all exact groups at once must not lose the comparison at the layer that
    reads a group's channels because another group of the same pair cuts that layer's outputs."""
    from etp_graph.graph import index_maps
    right = index_maps._padded
    monkeypatch.setattr(index_maps, "_padded", lambda pad, ndim, dim: right(pad, ndim, 1))  # dim 1 taken for channels
    torch.manual_seed(0)
    m = Trigram()
    with torch.no_grad():   # a head that barely moves: the wrong map is invisible at the output
        m.head.weight.mul_(1e-6)
    g = eg.trace(m, IDS, ignored_layers=[m.head])
    assert [s.root for s in g.skipped] == ["tok"]
    assert "the output of 'proj'" in g.skipped[0].reason
    assert any("proj" in {i.owner for i in x.items if i.role == "out"} for x in g.groups)   # the hidden width


def test_groups_whose_reader_another_group_cuts_are_checked_in_one_pair(monkeypatch):
    """ResNet-56's stream group is read by every block's first conv, whose outputs the block's
    own group cuts: all groups are still checked in one masked/pruned pair, the reader's kept
    outputs compared, and the model itself is the masked run (no copy), left as it was."""
    from etp_graph import zoo
    from etp_graph.graph import verify
    pairs, copies = [], []
    real_mp, real_twin = verify.mask_and_prune, verify.twin
    monkeypatch.setattr(verify, "mask_and_prune", lambda *a, **k: pairs.append(len(a[2])) or real_mp(*a, **k))
    monkeypatch.setattr(verify, "twin", lambda m: copies.append(m) or real_twin(m))
    torch.manual_seed(0)
    m = zoo.create("resnet56_cifar").eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    g = eg.trace(m, torch.randn(2, 3, 32, 32), ignored_layers=[m.linear])
    assert (len(g.groups), g.skipped) == (28, [])
    assert pairs == [28] and len(copies) == 1   # one pair for every group, one copy (the pruned one)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_the_kept_outputs_of_a_layer_cut_on_both_sides_are_compared():
    """Trigram's hidden width and embedding width cut together: `proj` reads the one and its
    outputs are the other; the experiment compares `proj`'s kept outputs and agrees, and a
    layer's removed outputs are read from its own weight and bias."""
    from etp_graph.graph.verify import removed_outputs
    torch.manual_seed(0)
    m = Trigram()
    g = eg.trace(m, IDS, ignored_layers=[m.head])
    tok = next(x for x in g.groups if x.root == "tok")
    hidden = next(x for x in g.groups if x is not tok)
    cuts = [(tok, [1, 5]), (hidden, [0, 2, 9])]
    assert sorted(removed_outputs(cuts)) == ["pos", "proj", "tok"]
    assert removed_outputs(cuts)["proj"].tolist() == [0, 2, 9]
    why, pruned = experiment(m, IDS, cuts, True)
    assert why is None and pruned.proj.weight.shape == (13, 30)
