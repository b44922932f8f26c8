"""A trace's bounded cost (etp_graph.graph.budget): a walk that does not close is refused with
the reason, the time limit refuses what is left, and nothing hangs."""
import importlib
import time

import pytest
import torch
from torch import nn

import etp_graph as eg
from etp_graph.graph import budget
from etp_graph.testing import assert_prune_equivalent

from graph_models import X8, chain, departition, partition

trace_mod = importlib.import_module("etp_graph.graph.trace")   # the package exports the function


class Partition(nn.Module):
    """MaxViT's partition attention on ``(B, C, H, W)`` (torchvision's ``maxvit.py``, rebuilt):
    window partition (reshape, permute, reshape to channel-last windows), optionally the grid
    swap, multi-head attention over each window, departition back. The einsums are called
    below the torch-function layer (``torch.ops.aten``), so the shadow run cannot see them and
    find the attention: only the backend's walk is left, and through these reshapes it does not
    close (``torch.einsum`` itself is followed; see test_discover.py)."""

    def __init__(self, c: int, heads: int, p: int, grid: bool):
        super().__init__()
        self.p, self.heads, self.grid = p, heads, grid
        self.norm = nn.LayerNorm(c)
        self.qkv = nn.Linear(c, 3 * c)
        self.merge = nn.Linear(c, c)

    def forward(self, x):
        b, c, h, w = x.shape
        t = partition(x, self.p, self.grid)
        g, n = t.shape[1], t.shape[2]
        q, k, v = self.qkv(self.norm(t)).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, g, n, self.heads, c // self.heads).permute(0, 1, 3, 2, 4) for z in (q, k, v))
        einsum = torch.ops.aten.einsum.default
        a = einsum("bghid,bghjd->bghij", [q, k]).softmax(-1)
        o = t + self.merge(einsum("bghij,bghjd->bghid", [a, v]).permute(0, 1, 3, 2, 4).reshape(b, g, n, c))
        return departition(o, x.shape, self.p, self.grid)


class Partitioned(nn.Module):
    """A stem, then ``n`` blocks of (1×1 conv, window attention, grid attention), a head."""

    def __init__(self, n: int = 3, c: int = 16, p: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 1), Partition(c, 2, p, False), Partition(c, 2, p, True))
                                    for _ in range(n))
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean((2, 3)))


@pytest.fixture
def unbounded_walks(monkeypatch):
    """The walk bounds off: only the time limit stops the backend's enumeration."""
    monkeypatch.setattr(budget, "SLACK", 10 ** 12)
    monkeypatch.setattr(trace_mod, "step_limit", lambda n: 10 ** 12)


def test_partitions_that_do_not_close_are_refused_fast_with_the_reason():
    model, x = Partitioned(3).eval(), torch.randn(2, 3, 8, 8)
    start = time.perf_counter()
    g = eg.trace(model, x)
    assert time.perf_counter() - start < 30       # unbounded, one block's walk runs past 60 s
    reasons = {s.root: s.reason for s in g.skipped}
    for k in range(3):
        for attn in (1, 2):
            why = reasons[f"blocks.{k}.{attn}.qkv"]
            assert "did not close" in why and f"blocks.{k}.{attn}.qkv" in why and "indices" in why
    assert [grp.root for grp in g.groups] == ["stem"]
    assert eg.trace(model, x).skipped == g.skipped      # deterministic: no time in the verdict
    checks = assert_prune_equivalent(model, x, check_macs=False)
    assert [c.root for c in checks].count("stem") == 3


def test_the_time_limit_stops_a_walk_that_runs_on(unbounded_walks):
    model, x = Partitioned(1).eval(), torch.randn(2, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    start = time.perf_counter()
    g = eg.trace(model, x, time_limit=2)
    assert time.perf_counter() - start < 20
    reasons = {s.root: s.reason for s in g.skipped}
    assert "was not done when the trace's time limit of 2 s ran out" in reasons["blocks.0.1.qkv"]
    assert "time_limit=... (trace, ETPPruner; --time-limit in the CLI" in reasons["blocks.0.1.qkv"]
    assert "was not examined" in reasons["head"]
    assert not g.groups or all(grp.root == "stem" for grp in g.groups)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_spent_time_limit_refuses_every_group_and_leaves_the_model():
    model = chain()
    out = model(X8)
    g = eg.trace(model, X8, time_limit=0)
    assert g.groups == []
    assert {s.root for s in g.skipped} >= {"0", "3"}
    assert all("time limit of 0 s ran out" in s.reason for s in g.skipped)
    assert torch.equal(model(X8), out)
    assert len(eg.trace(model, X8, time_limit=None).groups) == 2


def test_time_running_out_in_verification_keeps_the_verdicts_already_reached(monkeypatch):
    """The clock runs out during the first group's check: its verdict stands (kept, or refused
    with its own reason), every group after it is refused for the time."""
    model = chain()
    clock, order = {"now": 0.0}, []
    monkeypatch.setattr(budget.time, "perf_counter", lambda: clock["now"])
    monkeypatch.setattr(trace_mod, "_all_hold", lambda *a: False)
    real = trace_mod.check_group

    def slow_check(model, x, group, **kwargs):
        clock["now"] += 10.0
        order.append(group.root)
        return real(model, x, group, **kwargs)

    monkeypatch.setattr(trace_mod, "check_group", slow_check)
    g = eg.trace(model, X8, time_limit=5)
    assert len(order) == 1
    reasons = {s.root: s.reason for s in g.skipped}
    assert sorted([grp.root for grp in g.groups] + list(reasons)) == ["0", "3", "6"]
    late = [r for r in ("0", "3", "6") if r != order[0]]
    assert all("the verification of every group was not done" in reasons[r] for r in late)
    if order[0] == "6":
        assert "reach a model output" in reasons["6"]
    else:
        assert [grp.root for grp in g.groups] == order


def test_step_limit_scales_with_the_graph():
    assert budget.step_limit(0) == 2_000 and budget.step_limit(100) == 7_000
    walk = budget._Walk(budget.Budget(None, steps=10, widest=8))
    walk.carry(budget.SLACK * 8)
    with pytest.raises(budget.Exhausted, match="did not close"):
        walk.carry(budget.SLACK * 8 + 1)
