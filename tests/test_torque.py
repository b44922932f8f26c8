"""ETP/Torque regularisers: closed-form penalty and gradients, apply_ == backward, config errors."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import etp_graph as eg


class Net(nn.Module):
    """conv → BN → conv (residual partner) + a free per-channel scale → flatten → Linear head."""

    def __init__(self):
        super().__init__()
        self.a, self.bn = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.b = nn.Conv2d(4, 4, 1)
        self.scale = nn.Parameter(torch.linspace(0.5, 2.0, 4).view(1, 4, 1, 1))
        self.c = nn.Conv2d(4, 3, 1, bias=False)
        self.head = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x):
        h = F.relu(self.bn(self.a(x)))
        h = (h + self.b(h)) * self.scale
        return self.head(F.relu(self.c(h)).flatten(1))


X = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0))


def _unit_sq(net):
    """Hand-written Σθ² per unit of the two groups (root a, 4 units; root c, 3 units)."""
    a = (net.a.weight.pow(2).sum((1, 2, 3)) + net.a.bias.pow(2) + net.bn.weight.pow(2) + net.bn.bias.pow(2)
         + net.b.weight.pow(2).sum((1, 2, 3)) + net.b.bias.pow(2) + net.b.weight.pow(2).sum((0, 2, 3))
         + net.scale.pow(2).flatten() + net.c.weight.pow(2).sum((0, 2, 3)))
    c = net.c.weight.pow(2).sum((1, 2, 3)) + net.head.weight.view(2, 3, 16).pow(2).sum((0, 2))
    return [a, c]


def _w(n, p, c, profile):
    d = (torch.arange(n, dtype=torch.float32) - p).abs() / n
    return torch.exp(c * d) if profile == "exp" else d


@pytest.mark.parametrize("profile,pivot", [("exp", 0), ("exp", "center"), ("linear", 2), ("exp", 7)])
def test_penalty_matches_closed_form(profile, pivot):
    torch.manual_seed(1)
    net = Net()
    cfg = eg.ETPConfig(beta=0.01, c=3.0, pivot=pivot, profile=profile)
    pruner = eg.ETPPruner(net, X, ignored_layers=[net.head], config=cfg, pruning_ratio=0.5)
    assert [(g.root, g.size) for g in pruner.graph.groups] == [("a", 4), ("c", 3)]
    expect = 0.0
    for s in _unit_sq(net):
        n = len(s)
        p = n // 2 if pivot == "center" else min(pivot, n - 1)
        expect = expect + (_w(n, p, 3.0, profile) * s).sum() / n
    assert torch.allclose(pruner.penalty(), 0.01 * expect, rtol=1e-5)
    assert isinstance(pruner.regularizer, eg.ETP if profile == "exp" else eg.Torque)


def test_gradient_is_two_beta_w_over_n_theta_and_apply_matches_backward():
    torch.manual_seed(2)
    net = Net()
    beta, c = 0.05, 5.0
    pruner = eg.ETPPruner(net, X, ignored_layers=[net.head], config=eg.ETPConfig(beta=beta, c=c), threshold=0.1)
    pruner.penalty().backward()
    auto = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    w4, w3 = _w(4, 0, c, "exp"), _w(3, 0, c, "exp")
    # closed forms on slices that belong to exactly one unit of one group
    assert torch.allclose(auto["a.weight"], 2 * beta * (w4 / 4).view(4, 1, 1, 1) * net.a.weight, rtol=1e-5)
    assert torch.allclose(auto["bn.bias"], 2 * beta * w4 / 4 * net.bn.bias, rtol=1e-5)
    assert torch.allclose(auto["head.weight"], 2 * beta * (w3 / 3).repeat_interleave(16) * net.head.weight, rtol=1e-5)
    # b.weight rows and columns are both unit slices of group a: the two terms add
    rows = (w4 / 4).view(4, 1, 1, 1)
    cols = (w4 / 4).view(1, 4, 1, 1)
    assert torch.allclose(auto["b.weight"], 2 * beta * (rows + cols) * net.b.weight, rtol=1e-5)
    assert net.head.bias.grad is None          # the head's own outputs are never penalised
    net.zero_grad(set_to_none=True)
    pruner.apply_()
    for n, p in net.named_parameters():
        if n in auto:
            assert torch.allclose(p.grad, auto[n], rtol=1e-5, atol=1e-9), n


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_decay_is_a_plain_step_on_the_penalty(norm):
    torch.manual_seed(6)
    net = Net()
    pruner = eg.ETPPruner(net, X, ignored_layers=[net.head], config=eg.ETPConfig(beta=0.3, norm=norm, order="norm"),
                          pruning_ratio=0.5)
    pruner.penalty().backward()
    expect = {n: (p - 0.1 * p.grad).detach() if p.grad is not None else p.detach().clone()
              for n, p in net.named_parameters()}
    before = net.a.weight.detach().clone()
    pruner.decay_(0.1)
    assert (net.a.weight - before).abs().max() > 1e-3            # it moved the weights …
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), expect[n], rtol=1e-5, atol=1e-7, msg=n)
    assert net.head.bias.grad is None                               # … never the head's own outputs
    with pytest.raises(ValueError, match="lr"):
        pruner.decay_(-1.0)


def test_l1_norm_penalty_and_gradient():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    cfg = eg.ETPConfig(beta=0.1, norm="l1", profile="linear", pivot=1)
    pruner = eg.ETPPruner(net, torch.randn(4, 3), ignored_layers=[net[2]], config=cfg, pruning_ratio=0.4)
    s = net[0].weight.abs().sum(1) + net[0].bias.abs() + net[2].weight.abs().sum(0)
    w = _w(5, 1, 0.0, "linear")
    assert torch.allclose(pruner.penalty(), 0.1 * (w * s).sum() / 5)
    pruner.apply_()
    assert torch.allclose(net[0].weight.grad, 0.1 * (w / 5).view(5, 1) * net[0].weight.sign())


@pytest.mark.parametrize("pivot", [0, "center"])
def test_order_norm_places_the_strongest_unit_on_the_pivot(pivot):
    torch.manual_seed(4)
    net = Net()
    cfg = eg.ETPConfig(beta=0.02, c=4.0, pivot=pivot, order="norm")
    pruner = eg.ETPPruner(net, X, ignored_layers=[net.head], config=cfg, pruning_ratio=0.5)
    expect = 0.0
    for g, s in zip(pruner.graph.groups, _unit_sq(net)):
        n = len(s)
        p = n // 2 if pivot == "center" else 0
        # hand-made ranking: the k-th strongest unit takes the k-th nearest place to the pivot
        slots = sorted(range(n), key=lambda i: (abs(i - p), i))
        places = torch.empty(n, dtype=torch.long)
        for k, unit in enumerate(sorted(range(n), key=lambda i: -float(s[i].detach()))):
            places[unit] = slots[k]
        assert pruner.regularizer.places(g).tolist() == places.tolist()
        expect = expect + (_w(n, p, 4.0, "exp")[places] * s).sum() / n
    assert torch.allclose(pruner.penalty(), 0.02 * expect.detach(), rtol=1e-5)
    # the gradient follows the places too, and apply_() still equals backward()
    pruner.penalty().backward()
    w4 = _w(4, 0 if pivot == 0 else 2, 4.0, "exp")[pruner.regularizer.places(pruner.graph.groups[0])]
    assert torch.allclose(net.a.weight.grad, 2 * 0.02 * (w4 / 4).view(4, 1, 1, 1) * net.a.weight, rtol=1e-5)
    auto = net.a.weight.grad.clone()
    net.zero_grad(set_to_none=True)
    pruner.apply_()
    assert torch.allclose(net.a.weight.grad, auto, rtol=1e-5)


def test_order_norm_is_fixed_at_build_and_survives_state_dict():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    with torch.no_grad():
        net[0].weight.mul_(torch.tensor([1.0, 4.0, 0.1, 2.0, 0.5]).view(5, 1))
    graph = eg.trace(net, torch.randn(2, 3), ignored_layers=[net[2]])
    reg = eg.ETP(graph.groups, eg.ETPConfig(beta=1.0, order="norm"))
    places = reg.places(graph.groups[0]).tolist()
    assert places[1] == 0 and places[2] == 4            # strongest on pivot 0, weakest farthest
    with torch.no_grad():                               # training changes the norms, not the places
        net[0].weight.mul_(torch.tensor([9.0, 0.0, 9.0, 0.0, 9.0]).view(5, 1))
    assert reg.places(graph.groups[0]).tolist() == places
    other = eg.ETP(graph.groups, eg.ETPConfig(beta=1.0, order="norm"))   # ranked from the new norms
    assert other.places(graph.groups[0]).tolist() != places
    other.load_state_dict(reg.state_dict())
    assert other.places(graph.groups[0]).tolist() == places
    assert eg.ETP(graph.groups, eg.ETPConfig(beta=1.0)).places(graph.groups[0]).tolist() == list(range(5))


def test_zero_below_and_state_dict_round_trip():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight.fill_(1e-5)
    graph = eg.trace(net, torch.randn(2, 3), ignored_layers=[net[2]])
    reg = eg.ETP(graph.groups, eg.ETPConfig(beta=1.0, zero_below=1e-4))
    assert reg.zero_small_() == 12 and net[0].weight.abs().sum() == 0
    other = eg.ETP(graph.groups, eg.ETPConfig(beta=2.0))
    other.load_state_dict(reg.state_dict())
    assert other.config == reg.config
    with pytest.raises(ValueError, match="Torque"):
        eg.Torque(graph.groups, eg.ETPConfig(beta=1.0, profile="linear")).load_state_dict(reg.state_dict())


@pytest.mark.parametrize("profile", ["exp", "linear"])
def test_unit_scale_drops_the_one_over_n(profile):
    """scale="unit": the same closed form without 1/N, so both groups push their units alike."""
    torch.manual_seed(1)
    net = Net()
    cfg = eg.ETPConfig(beta=0.01, c=3.0, pivot=0, profile=profile, scale="unit")
    pruner = eg.ETPPruner(net, X, ignored_layers=[net.head], config=cfg, pruning_ratio=0.5)
    expect = sum((_w(len(s), 0, 3.0, profile) * s).sum() for s in _unit_sq(net))
    assert torch.allclose(pruner.penalty(), 0.01 * expect, rtol=1e-5)
    mean = eg.ETPPruner(net, X, ignored_layers=[net.head], config=eg.ETPConfig(beta=0.01, c=3.0, profile=profile),
                        pruning_ratio=0.5)
    for g, gm in zip(pruner.graph.groups, mean.graph.groups):
        torch.testing.assert_close(pruner.regularizer.coefficients(g), mean.regularizer.coefficients(gm) * g.size)


@pytest.mark.parametrize("kwargs,match", [
    (dict(beta=-1), "beta"), (dict(beta=math.nan), "beta"), (dict(beta=1, c=-2), "c"),
    (dict(beta=1, pivot="left"), "pivot"), (dict(beta=1, pivot=-1), "pivot"), (dict(beta=1, pivot=True), "pivot"),
    (dict(beta=1, profile="cubic"), "profile"), (dict(beta=1, norm="l3"), "norm"), (dict(beta=1, zero_below=0), "zero_below"),
    (dict(beta=1, order="random"), "order"), (dict(beta=1, scale="sum"), "scale"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        eg.ETPConfig(**kwargs)


def test_config_is_frozen():
    cfg = eg.ETPConfig(beta=1e-4)
    with pytest.raises(Exception):
        cfg.beta = 1.0
    assert (cfg.c, cfg.pivot, cfg.profile, cfg.norm, cfg.zero_below, cfg.order) == (5.0, 0, "exp", "l2", None, "index")


# ------------------------------------------------------------------ group-sl == Torch-Pruning
class ResCNN(nn.Module):
    """stem → two residual blocks (identity, then a strided 1x1 projection) → pooled Linear head."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.down, self.bnd = nn.Conv2d(8, 16, 1, stride=2), nn.BatchNorm2d(16)
        self.c3, self.bn3 = nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        h = F.relu(self.bn0(self.stem(x)))
        h = F.relu(h + self.bn2(self.c2(F.relu(self.bn1(self.c1(h))))))
        h = F.relu(self.bnd(self.down(h)) + self.bn3(self.c3(h)))
        return self.fc(h.mean((2, 3)))


def test_group_sl_gradient_equals_torch_pruning_regularize():
    import torch_pruning as tp
    torch.manual_seed(3)
    net = ResCNN()
    with torch.no_grad():          # distinct BN affines so every unit's norm differs
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.2, 2.0)
                m.bias.uniform_(-1.0, 1.0)
    x = torch.randn(2, 3, 8, 8)
    ours_net, reg, alpha = copy.deepcopy(net), 1e-2, 16.0

    tp_pruner = tp.pruner.GroupNormPruner(net, x, importance=tp.importance.GroupMagnitudeImportance(p=2, bias=True),
                                          reg=reg, ignored_layers=[net.fc])
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    tp_pruner.regularize(net, alpha=alpha, bias=True)

    graph = eg.trace(ours_net, x, ignored_layers=[ours_net.fc])
    config = eg.ETPConfig(beta=reg, c=math.log(alpha), profile="group-sl")
    sl = eg.make_regularizer(graph.groups, config, ours_net)
    assert isinstance(sl, eg.GroupSL) and len(graph.groups) == 3
    for p in ours_net.parameters():
        p.grad = torch.zeros_like(p)
    sl.apply_()
    theirs = dict(net.named_parameters())
    for name, p in ours_net.named_parameters():
        assert (theirs[name].grad.abs().sum() > 0) == (name != "fc.bias"), name   # the head's bias is no unit's
        torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-5, atol=1e-9, msg=name)

    # the penalty is the same rule as a loss term: its gradient equals apply_()
    for p in ours_net.parameters():
        p.grad = torch.zeros_like(p)
    sl.penalty().backward()
    for name, p in ours_net.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-5, atol=1e-9, msg=name)


def test_group_sl_closed_form_and_config_checks():
    net = Net()
    graph = eg.trace(net, X, ignored_layers=[net.head])
    sl = eg.GroupSL(graph.groups, eg.ETPConfig(beta=0.5, c=math.log(4.0), profile="group-sl"))
    want = 0.0
    for s in _unit_sq(net):
        n = s.detach().sqrt()
        gamma = 4.0 ** ((n.max() - n) / (n.max() - n.min()))
        want += 0.25 * float((gamma * s.detach()).sum())
    assert float(sl.penalty().detach()) == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="norm='l2'"):
        eg.ETPConfig(beta=1.0, profile="group-sl", norm="l1")
    with pytest.raises(ValueError, match="make_regularizer"):
        eg.ETP(graph.groups, eg.ETPConfig(beta=1.0, profile="linear"))


def test_the_regulariser_hooks_are_abstract():
    with pytest.raises(TypeError, match="abstract method coefficients"):
        eg.Regularizer([], eg.ETPConfig(beta=1.0))
    with pytest.raises(TypeError, match="abstract method weights"):
        eg.torque.ProfileRegularizer([], eg.ETPConfig(beta=1.0))
