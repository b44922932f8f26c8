"""Each MAC handle against its closed form; latency returns its spread and thread count."""
import pytest
import torch
from torch import nn

import etp_graph as eg


def test_linear_and_conv_closed_form():
    assert eg.count_macs(nn.Linear(8, 4), torch.randn(3, 8)) == 3 * 8 * 4
    conv = nn.Conv2d(3, 8, 3, bias=False)
    assert eg.count_macs(conv, torch.randn(1, 3, 10, 10)) == 8 * 8 * (8 * 3 * 9)
    g = nn.Conv2d(8, 8, 3, groups=4, bias=False)
    assert eg.count_macs(g, torch.randn(1, 8, 5, 5)) == 3 * 3 * 8 * (2 * 9)


@pytest.mark.parametrize("cell, gates", [(nn.LSTM, 4), (nn.GRU, 3)])
def test_rnn_handle(cell, gates):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.r = cell(5, 7, num_layers=2, batch_first=True, bidirectional=True)

        def forward(self, x):
            return self.r(x)[0]
    T, B = 3, 2
    per_step = 2 * gates * 7 * (5 + 7) + 2 * gates * 7 * (14 + 7)
    assert eg.count_macs(Net(), torch.randn(B, T, 5)) == T * B * per_step
    assert eg.unsupported_ops(Net(), torch.randn(B, T, 5)) == {}


def test_sdpa_handle():
    class Att(nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    assert eg.count_macs(Att(), (q, k, v)) == 2 * 4 * 5 * 6 * (8 + 8)


def test_latency_report():
    r = eg.measure_latency(nn.Linear(16, 16), torch.randn(4, 16), warmup=1, repeat=5)
    assert r["repeat"] == 5 and r["threads"] == torch.get_num_threads()
    assert 0 < r["min_ms"] <= r["median_ms"] and r["iqr_ms"] >= 0
    with pytest.raises(ValueError, match="repeat"):
        eg.measure_latency(nn.Linear(2, 2), torch.randn(1, 2), repeat=0)


def test_models_compared_side_by_side_take_turns_in_every_round(monkeypatch):
    """compare_latency times one forward of every model per round; a slow round (a busy machine)
    slows both models alike, and the paired ratio cancels it."""
    import time
    big, small = nn.Linear(4, 4), nn.Linear(4, 4)
    calls, now = [], {"t": 0.0}
    monkeypatch.setattr(time, "perf_counter", lambda: now["t"])

    def tick(m, args, out):     # a fake clock: big takes 4 ticks, small 1; every third round x100
        calls.append("big" if m is big else "small")
        now["t"] += (4.0 if m is big else 1.0) * (100.0 if (len(calls) - 1) // 2 % 3 == 2 else 1.0)
    big.register_forward_hook(tick)
    small.register_forward_hook(tick)
    before, after = eg.compare_latency([big, small], torch.randn(2, 4), warmup=0, repeat=6)
    assert calls == ["big", "small"] * 6
    assert before["ratio_to_first"] == 1.0 and after["ratio_to_first"] == pytest.approx(4.0)
    assert before["median_ms"] == pytest.approx(4e3) and after["min_ms"] == pytest.approx(1e3)
    assert before["repeat"] == after["repeat"] == 6 and before["threads"] == torch.get_num_threads()
    with pytest.raises(ValueError, match="at least one model"):
        eg.compare_latency([], torch.randn(1, 2))
    with pytest.raises(ValueError, match="repeat"):
        eg.compare_latency([nn.Linear(2, 2)], torch.randn(1, 2), repeat=0)


def test_free_ops_hold_only_what_fvcore_neither_counts_nor_ignores():
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_analysis import _IGNORED_OPS
    from etp_graph.counting import FREE_OPS, MAC_HANDLES
    counted = FlopCountAnalysis(nn.Linear(2, 2), (torch.randn(1, 2),))._op_handles
    assert not set(FREE_OPS) & set(counted), "fvcore counts these: a FREE_OPS entry would be dead"
    assert not set(FREE_OPS) & set(_IGNORED_OPS), "fvcore ignores these already"
    assert list(FREE_OPS) == sorted(set(FREE_OPS)) and not set(FREE_OPS) & set(MAC_HANDLES)
