"""Informer: deterministic ProbSparse attention, heads/FFN pruning, the ETT loader's protocol."""
import copy

import pytest
import torch

import etp_graph as eg
from benchmarks.data import ETT_HORIZONS, load_ett
from etp_graph.zoo.informer import ProbAttention, informer_inputs


def test_probsparse_attention_is_deterministic_under_its_seed():
    q, k, v = (torch.randn(2, 20, 3, 8) for _ in range(3))
    a, b = ProbAttention(False, seed=3).eval(), ProbAttention(False, seed=3).eval()
    torch.testing.assert_close(a(q, k, v), b(q, k, v))
    assert not torch.allclose(a(q, k, v), ProbAttention(False, seed=4).eval()(q, k, v))


def test_informer_heads_and_ffn_prune_exactly_with_bookkeeping():
    m = eg.zoo.create("informer_etth1").eval()
    x = informer_inputs()
    # the encoder's width (shape-checked: LayerNorm) is left out so that masking equals pruning
    pruner = eg.ETPPruner(m, x, ignored_layers=[m.projection], pruning_ratio=0.5, group_filter=lambda g: g.exact)
    roots = {g.root: g.size for g in pruner.graph.groups}
    assert roots == {"encoder.0.attention": 4, "encoder.0.conv1": 128, "encoder.1.attention": 4,
                     "encoder.1.conv1": 128, "decoder.0.cross_attention": 4, "decoder.0.conv1": 128}
    masked = copy.deepcopy(m)
    plan = pruner.plan()
    for g in pruner.graph.groups:
        g.zero_(plan[g.id], model=masked)
    report = pruner.step()
    with torch.no_grad():
        torch.testing.assert_close(masked(*x), m(*x), rtol=1e-4, atol=1e-5)
    assert m.encoder[0].attention.n_heads == 2 and m.encoder[0].conv1.out_channels == 64
    assert m.encoder[0].attention.inner_attention.scale == pytest.approx(16 ** -0.5)   # pinned: 1/sqrt(d_head)
    assert report.macs_after < report.macs_before


def test_informer_encoder_width_is_cut_with_its_fixed_position_table():
    m = eg.zoo.create("informer_etth1").eval()
    x = informer_inputs()
    g = eg.trace(m, x, ignored_layers=[m.projection])
    (width,) = [grp for grp in g.groups if grp.root == "enc_embedding.token"]
    assert width.size == 64 and not width.exact
    (pe,) = [it for it in width.items if it.attr == "pe"]
    assert (pe.owner, pe.dim, pe.index.tolist()) == ("enc_embedding", 1, list(range(64)))
    width.prune([0, 63])
    assert m.enc_embedding.pe.shape == (5000, 62) and m.enc_embedding.token.out_channels == 62
    assert m(*x).shape == eg.zoo.create("informer_etth1").eval()(*x).shape


@pytest.mark.parametrize("split,n", [("train", 8521), ("val", 2857), ("test", 2857)])
def test_ett_loader_standard_split_and_scaling(split, n):
    d = load_ett("ETTh1", split, seq_len=96, label_len=48, pred_len=24)
    assert d["x_enc"].shape == (n, 96, 7) and d["y"].shape == (n, 24, 7) and d["x_dec"].shape == (n, 72, 7)
    assert d["x_mark_enc"].shape == (n, 96, 4) and float(d["x_mark_enc"].abs().max()) <= 0.5
    assert torch.count_nonzero(d["x_dec"][:, 48:]) == 0
    torch.testing.assert_close(d["x_dec"][:, :48], d["x_enc"][:, 48:])    # decoder start = encoder tail
    if split == "train":   # scaled with the train statistics
        first = d["x_enc"][:, 0]
        assert first.mean(0).abs().max() < 0.05 and (first.std(0) - 1).abs().max() < 0.05


def test_ett_loader_every_horizon_and_clear_errors(tmp_path):
    for h in ETT_HORIZONS:
        assert load_ett("ETTh2", "test", pred_len=h)["y"].shape[1:] == (h, 7)
    with pytest.raises(FileNotFoundError, match="ETTh1.csv"):
        load_ett("ETTh1", root=tmp_path)
    with pytest.raises(ValueError, match="ETTh1"):
        load_ett("ETTm3")
