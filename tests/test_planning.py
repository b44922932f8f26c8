"""etp_graph.planning: MACs predicted from per-module costs equal fvcore's count of the cut model,
and the planner confirms its answer with a handful of fvcore counts instead of one per group."""
import pytest
import torch

import etp_graph as eg
from etp_graph import pruner as pruner_module
from etp_graph import zoo
from etp_graph.planning import MacModel
from test_pruner import VGGish, X


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=50)
    m = transformers.LlamaForCausalLM(cfg).eval()
    m.config.use_cache = False
    return m, {"input_ids": torch.randint(0, 50, (2, 6))}, [m.lm_head]


def _case(name):
    if name == "llama":
        return _tiny_llama()
    entry = zoo.entry(name)
    torch.manual_seed(0)
    m = zoo.create(name).eval()
    return m, entry.example_inputs(), entry.heads(m)


@pytest.mark.parametrize("name", ["resnet20_cifar", "tiny_grouped", "tiny_concat", "tiny_mha", "tiny_bert", "llama"])
def test_predicted_macs_equal_fvcore_on_random_plans(name):
    model, x, heads = _case(name)
    pruner = eg.ETPPruner(model, x, ignored_layers=heads, pruning_ratio=0.5)
    costs = MacModel(model, x, pruner.graph.groups)
    assert costs.total == eg.count_macs(model, x)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        plan = {}
        for g in pruner.graph.groups:
            k = int(torch.randint(0, g.size, (1,), generator=gen))
            if k:
                plan[g.id] = sorted(torch.randperm(g.size, generator=gen)[:k].tolist())
        assert costs.predict(plan) == pytest.approx(pruner._counted(plan), rel=1e-4)


@pytest.fixture
def counted(monkeypatch):
    """``(net, pruner for 2x, calls)``: every fvcore count the pruner makes from now on lands in ``calls``."""
    torch.manual_seed(1)
    net = VGGish(w=12)
    pruner = eg.ETPPruner(net, X, ignored_layers=[net.fc], target_speedup=2.0)
    calls = []
    count = pruner_module.ETPPruner._macs
    monkeypatch.setattr(pruner_module.ETPPruner, "_macs", lambda self, m: calls.append(1) or count(self, m))
    return net, pruner, calls


def test_path_confirms_with_few_counts_and_finds_the_shortest_prefix(counted):
    net, pruner, calls = counted
    plans = pruner.path([1.5, 2.0, 3.0])
    assert len(calls) <= 3 * 3
    # the same answer as counting every prefix with fvcore
    candidates = pruner._candidates(MacModel(net, X, pruner.graph.groups))
    base = eg.count_macs(net, X)
    for plan in plans:
        n = next(n for n in range(len(candidates) + 1)
                 if base / pruner._counted(pruner._prefix(candidates, n)) >= plan.target_speedup)
        assert plan.removed == pruner._prefix(candidates, n)
        assert plan.macs_after == pruner._counted(plan.removed)


def test_step_reuses_the_counts_of_its_plan_and_they_are_the_true_ones(counted):
    net, pruner, calls = counted
    report = pruner.step()
    assert len(calls) <= 3
    assert report.macs_after == eg.count_macs(net, X) and report.speedup >= 2.0
