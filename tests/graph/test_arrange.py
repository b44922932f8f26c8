"""Split–shuffle stages too deep for a balanced cut (etp_graph.graph.arrange): the stage's widths
as an ordered group whose cuts re-arrange the channels, exact against masking."""
import copy

import pytest
import torch

import etp_graph as eg
from etp_graph import load_pruned, save_pruned
from etp_graph.graph import arrange
from etp_graph.testing import assert_prune_equivalent
from graph_models import DeepStage


X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def stage_of(g):
    (stage,) = [grp for grp in g.groups if grp.ordered]
    return stage


@pytest.mark.parametrize("blocks", [4, 8])
def test_a_deep_stage_is_an_ordered_group_exact_at_every_width(blocks):
    model = DeepStage(blocks).eval()
    g = eg.trace(model, X, ignored_layers=[model.fc])
    assert not g.skipped, g.table()
    stage = stage_of(g)
    assert stage.root == "stage.0.branch1.1.0" and stage.exact and stage.size >= 4
    assert len(stage.arrangements) == stage.size - 1
    # the width at every removal: each cut (the last r units) exact against masking them
    widths = []
    for r in range(1, stage.size):
        units = list(range(stage.size - r, stage.size))
        (check,) = assert_prune_equivalent(model, X, ignored_layers=[model.fc], units=units,
                                           check_macs=False)[stage.id:stage.id + 1]
        assert check.checked == "values"
        small = copy.deepcopy(model)
        stage.cut(small, units)
        widths.append(small.stage[1].branch2[0][0].in_channels)
    assert widths == sorted(widths, reverse=True) and widths[0] < 8 and widths[-1] >= 1
    # and every unit's own branch width is still a group of its own
    assert len([grp for grp in g.groups if grp.root.endswith("branch2.0.0")]) == blocks


def test_only_the_last_units_can_go_and_a_refused_cut_changes_nothing():
    model = DeepStage().eval()
    g = eg.trace(model, X, ignored_layers=[model.fc])
    stage = stage_of(g)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"stage.0.branch1.1.0.*go in order: remove the last 2"):
        stage.prune([0, stage.size - 1])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert stage.sample(0.25, seed=3) == list(range(stage.size - round(0.25 * stage.size), stage.size))


def test_pruning_twice_renumbers_the_group_and_equals_masking_both_cuts():
    model = DeepStage().eval()
    masked = copy.deepcopy(model)
    g = eg.trace(model, X, ignored_layers=[model.fc])
    stage = stage_of(g)
    n = stage.size
    stage_of(eg.trace(masked, X, ignored_layers=[masked.fc])).zero_(range(n - 3, n))
    stage.prune([n - 1])
    stage.prune([n - 3, n - 2])      # renumbered: still the last two
    assert stage.size == n - 3 and len(stage.arrangements) == n - 4
    with torch.no_grad():
        want, got = masked(X), model(X)
    assert want.abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # what is left is still exact
    assert_prune_equivalent(model, X, ignored_layers=[model.fc], check_macs=False)


def test_the_planner_and_etp_take_the_last_units_first_and_the_family_nests():
    model = DeepStage().eval()
    pruner = eg.ETPPruner(model, X, ignored_layers=[model.fc], target_speedup=2.0,
                          config=eg.ETPConfig(beta=0.1, order="norm"))
    stage = stage_of(pruner.graph)
    # ETP's places run along the order whatever config.order says: the last unit is pushed hardest
    assert torch.equal(pruner.regularizer.places(stage), torch.arange(stage.size))
    plans = pruner.path([1.5, 2.0, 3.0])
    cut = [sorted(p.removed.get(stage.id, [])) for p in plans]
    assert any(cut)
    for units in cut:
        assert units == list(range(stage.size - len(units), stage.size))
    assert [len(u) for u in cut] == sorted(len(u) for u in cut)
    masked = copy.deepcopy(model)
    masked_graph = eg.trace(masked, X, ignored_layers=[masked.fc])
    by_root = {grp.root: grp for grp in masked_graph.groups}
    for grp in pruner.graph.groups:
        if plans[1].removed.get(grp.id):
            by_root[grp.root].zero_(plans[1].removed[grp.id])
    report = pruner.step()
    assert report.speedup == pytest.approx(plans[1].speedup) and report.speedup >= 2.0
    assert report.units_kept[stage.root] == stage.original_size - len(cut[1])
    with torch.no_grad():
        torch.testing.assert_close(model(X), masked(X), rtol=1e-5, atol=1e-5)


def test_a_re_arranged_model_round_trips_through_save_pruned(tmp_path):
    model = DeepStage().eval()
    g = eg.trace(model, X, ignored_layers=[model.fc])
    stage = stage_of(g)
    stage.prune(list(range(stage.size - 2, stage.size)))
    save_pruned(model, tmp_path / "m.pt")
    back = load_pruned(DeepStage().eval(), tmp_path / "m.pt")
    with torch.no_grad():
        torch.testing.assert_close(back(X), model(X))


def test_without_a_narrower_width_the_stage_is_refused_with_both_reasons(monkeypatch):
    monkeypatch.setattr(arrange, "MAX_WIDTHS", 0)
    model = DeepStage().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = eg.trace(model, X, ignored_layers=[model.fc])
    reasons = {s.root: s.reason for s in g.skipped}
    assert "stage.0.branch1.1.0" in reasons
    assert all("7 channel splits" in r and "no proper subset" in r and "re-arranging them does not help" in r
               for r in reasons.values()), reasons
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
