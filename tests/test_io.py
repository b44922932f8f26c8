"""save_pruned / load_pruned: pruned models into fresh instances; wrong files refused, model untouched."""
import pytest
import torch

import etp_graph as eg
from etp_graph import zoo


def _pruned(name):
    e = zoo.entry(name)
    torch.manual_seed(0)
    model = e.build().eval()
    x = e.example_inputs()
    eg.ETPPruner(model, x, ignored_layers=e.heads(model), pruning_ratio=0.5).step()
    return e, model, x


def _out(model, x):
    with torch.no_grad():
        return eg.graph.inputs.forward(model, x)


@pytest.mark.parametrize("name", ["tiny_cnn", "tiny_lstm", "tiny_bert", "gat_cora", "informer_etth1"])
def test_round_trip_into_a_fresh_instance(tmp_path, name):
    e, model, x = _pruned(name)
    eg.save_pruned(model, tmp_path / "m.pt")
    fresh = eg.load_pruned(e.build, tmp_path / "m.pt").eval()
    assert eg.count_params(fresh) == eg.count_params(model) < eg.count_params(e.build())
    torch.testing.assert_close(_out(fresh, x), _out(model, x))


def test_wrong_files_are_refused_and_leave_the_model_unchanged(tmp_path):
    e, model, _ = _pruned("tiny_cnn")
    eg.save_pruned(model, tmp_path / "m.pt")
    torch.save({"x": 1}, tmp_path / "other.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    target = zoo.create("tiny_lstm")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match="not an etp_graph pruned checkpoint"):
        eg.load_pruned(target, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is not a torch.save file"):
        eg.load_pruned(target, tmp_path / "corrupt.pt")
    torch.save(model, tmp_path / "whole.pt")          # a pickled module, not a save_pruned file
    with pytest.raises(ValueError, match=r"weights_only=False\) reads it"):
        eg.load_pruned(target, tmp_path / "whole.pt")
    with pytest.raises(ValueError, match="the model lacks"):
        eg.load_pruned(target, tmp_path / "m.pt")
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_a_narrowed_buffer_outside_the_state_dict_comes_back_with_its_values(tmp_path):
    """Informer's position table is ``persistent=False``: the state dict does not hold it, and a
    cut of the width narrows it; the file keeps the kept columns, not a fresh table's first ones."""
    e, model, x = _pruned("informer_etth1")
    assert model.enc_embedding.pe.shape[1] < e.build().enc_embedding.pe.shape[1]
    eg.save_pruned(model, tmp_path / "m.pt")
    fresh = eg.load_pruned(e.build, tmp_path / "m.pt").eval()
    torch.testing.assert_close(fresh.enc_embedding.pe, model.enc_embedding.pe)
