"""ETPImportance inside Torch-Pruning's own pruner, and ETPRegularizedPruner's sparse training."""
import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

import etp_graph as eg


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        return self.fc(F.relu(self.b2(self.c2(x))).mean((2, 3)))


class Encoder(nn.Module):
    """Token embedding → 2 pre-LN blocks with hand-written single-head attention and an FFN."""

    def __init__(self, d=16, ff=32):
        super().__init__()
        self.embed = nn.Linear(6, d)
        self.blocks = nn.ModuleList()
        for _ in range(2):
            self.blocks.append(nn.ModuleDict(dict(
                ln1=nn.LayerNorm(d), q=nn.Linear(d, d), k=nn.Linear(d, d), v=nn.Linear(d, d), o=nn.Linear(d, d),
                ln2=nn.LayerNorm(d), up=nn.Linear(d, ff), down=nn.Linear(ff, d))))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.embed(x)
        for b in self.blocks:
            t = b["ln1"](h)
            a = torch.softmax(b["q"](t) @ b["k"](t).transpose(1, 2), -1)
            h = h + b["o"](a @ b["v"](t))
            h = h + b["down"](F.gelu(b["up"](b["ln2"](h))))
        return self.head(h.mean(1))


def _imp_scores(model, x, layer, config):
    dg = tp.DependencyGraph().build_dependency(model, x)
    group = dg.get_pruning_group(layer, tp.prune_linear_out_channels if isinstance(layer, nn.Linear)
                                 else tp.prune_conv_out_channels, list(range(layer.weight.shape[0])))
    return eg.ETPImportance(config)(group)


def test_scores_equal_our_coupled_unit_norms():
    torch.manual_seed(0)
    model, x = CNN(), torch.randn(2, 3, 8, 8)
    ours = eg.trace(model, x, ignored_layers=[model.fc]).groups[1]        # root c2
    scores = _imp_scores(model, x, model.c2, eg.ETPConfig(beta=0))
    assert torch.allclose(scores, ours.unit_norms().detach(), rtol=1e-4)
    l1 = _imp_scores(model, x, model.c2, eg.ETPConfig(beta=0, norm="l1"))
    assert torch.allclose(l1, ours.unit_sums(norm="l1").detach(), rtol=1e-4)


@pytest.mark.parametrize("global_pruning", [False, True])
@pytest.mark.parametrize("steps", [1, 2])
def test_inside_torch_pruning_base_pruner_on_a_cnn(global_pruning, steps):
    torch.manual_seed(0)
    model, x = CNN(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model.c2.weight[[1, 4, 30]] = 0
        model.c2.bias[[1, 4, 30]] = 0
        model.b2.weight[[1, 4, 30]] = 0
        model.b2.bias[[1, 4, 30]] = 0
        model.fc.weight[:, [1, 4, 30]] = 0
    pruner = tp.pruner.BasePruner(model, x, importance=eg.ETPImportance(eg.ETPConfig(beta=1e-4)),
                                  pruning_ratio=0.25, global_pruning=global_pruning, iterative_steps=steps,
                                  ignored_layers=[model.fc])
    for _ in range(steps):
        pruner.step()
    assert model(x).shape == (2, 5)
    if not global_pruning:
        assert (model.c1.out_channels, model.c2.out_channels) == (12, 24)
    # the zeroed units were the first to go: no all-zero filter is left
    assert (model.c2.weight.flatten(1).abs().sum(1) > 0).all()


def test_inside_torch_pruning_base_pruner_on_a_transformer():
    torch.manual_seed(0)
    model, x = Encoder(), torch.randn(2, 5, 6)
    ffn = model.blocks[0]["up"]
    with torch.no_grad():
        ffn.weight[[3, 7]] = 0
        ffn.bias[[3, 7]] = 0
        model.blocks[0]["down"].weight[:, [3, 7]] = 0
    pruner = tp.pruner.BasePruner(model, x, importance=eg.ETPImportance(), pruning_ratio=0.25,
                                  ignored_layers=[model.head])
    pruner.step()
    assert ffn.out_features == 24 and model(x).shape == (2, 3)
    assert (ffn.weight.abs().sum(1) > 0).all()       # the two zeroed FFN units went first


def test_global_iterative_pruning_of_a_transformer_and_of_tiny_bert():
    torch.manual_seed(1)
    model, x = Encoder(), torch.randn(2, 5, 6)
    with torch.no_grad():                        # four dead FFN units in block 1
        model.blocks[1]["up"].weight[:4] = 0
        model.blocks[1]["up"].bias[:4] = 0
        model.blocks[1]["down"].weight[:, :4] = 0
    pruner = tp.pruner.BasePruner(model, x, importance=eg.ETPImportance(), pruning_ratio=0.5,
                                  global_pruning=True, iterative_steps=3, ignored_layers=[model.head])
    widths = []
    for _ in range(3):
        pruner.step()
        widths.append(sum(b["up"].out_features for b in model.blocks))
    assert widths[0] > widths[1] > widths[2] and model(x).shape == (2, 3)
    assert (model.blocks[1]["up"].weight.abs().sum(1) > 0).all()      # the dead units went
    bert = eg.zoo.create("tiny_bert")
    inputs = eg.zoo.entry("tiny_bert").example_inputs()
    pruner = tp.pruner.BasePruner(bert, inputs, importance=eg.ETPImportance(), pruning_ratio=0.25,
                                  global_pruning=True, iterative_steps=2, ignored_layers=[bert.classifier])
    for _ in range(2):
        pruner.step()
    ffn = [layer.intermediate.dense.out_features for layer in bert.hf.bert.encoder.layer]
    assert sum(ffn) < 2 * 48 and bert(**inputs).shape == (2, 2)


def test_regularized_pruner_applies_the_etp_gradient():
    torch.manual_seed(0)
    model, x = CNN(), torch.randn(4, 3, 8, 8)
    cfg = eg.ETPConfig(beta=1e-2)
    reference = eg.ETPPruner(model, x, ignored_layers=[model.fc], config=cfg, pruning_ratio=0.5)
    reference.penalty().backward()
    expect = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    pruner = eg.ETPRegularizedPruner(model, x, config=cfg, pruning_ratio=0.5, ignored_layers=[model.fc])
    assert isinstance(pruner, tp.pruner.BasePruner)
    pruner.regularize(model)
    for n, p in model.named_parameters():
        if n in expect:
            assert torch.allclose(p.grad, expect[n], rtol=1e-5), n
    # a short sparse-training loop, then Torch-Pruning's own step
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    y = torch.randint(0, 5, (4,))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pruner.regularize(model)
        opt.step()
    pruner.step()
    assert model.c2.out_channels == 16 and model(x).shape == (4, 5)
    pruner.regularize(model)            # re-traced for the pruned shapes
    assert model.c2.weight.grad.shape == model.c2.weight.shape
