"""Coverage of torchvision's own model code: random weights, small inputs or configurations.

    python -m benchmarks.tv_coverage [--source DIR] [--speedup S] [name,name,...]

Per model: the time of ``eg.trace`` (the last Linear ignored), its groups and refusals, how many
Conv/Linear layers outside the head belong to a returned group, ``assert_prune_equivalent`` on
every group, and the groups built through channel splits (ShuffleNet v2's stages) with their units;
with ``--speedup``, ``ETPPruner`` to that MACs target and the pruned model against masking. torchvision is not a dependency: use the installed one, or ``--source DIR``, the
package folder of a torchvision wheel unpacked there (``python -m zipfile -e torchvision-*.whl
DIR``); its C extension is then not loaded (a CUDA build does not load on the CPU torch), which
the model files do not need.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import sys
import time
import types
import warnings

import torch
from torch import nn


def import_torchvision(source):
    if source:
        sys.path.insert(0, source)
        # the C-op registrations are all the package needs its extension for; the models do not
        sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    try:
        return importlib.import_module("torchvision")
    except Exception as e:
        raise SystemExit(f"torchvision is not importable ({type(e).__name__}: {e}); install it, or pass "
                         "--source DIR with the folder of an unpacked torchvision wheel") from e


def models(tv):
    M = tv.models
    from torchvision.models.maxvit import MaxVit
    from torchvision.models.swin_transformer import SwinTransformer
    from torchvision.models.vision_transformer import VisionTransformer

    def maxvit(channels, layers):
        return lambda: MaxVit(input_size=(32, 32), stem_channels=16, partition_size=2, block_channels=channels,
                              block_layers=layers, head_dim=8, stochastic_depth_prob=0.0, num_classes=10)
    cnn = lambda f, **k: (lambda: f(num_classes=10, **k))  # noqa: E731
    return {
        "alexnet": (cnn(M.alexnet), 96), "vgg11_bn": (cnn(M.vgg11_bn), 64), "resnet18": (cnn(M.resnet18), 64),
        "resnext50_32x4d": (cnn(M.resnext50_32x4d), 64), "densenet121": (cnn(M.densenet121), 64),
        "squeezenet1_1": (cnn(M.squeezenet1_1), 64),
        "googlenet": (cnn(M.googlenet, aux_logits=False, init_weights=True), 64),
        "inception_v3": (cnn(M.inception_v3, aux_logits=False, init_weights=True), 96),
        "mobilenet_v2": (cnn(M.mobilenet_v2), 64), "mobilenet_v3_small": (cnn(M.mobilenet_v3_small), 64),
        "mnasnet0_5": (cnn(M.mnasnet0_5), 64), "efficientnet_b0": (cnn(M.efficientnet_b0), 64),
        "efficientnet_v2_s": (cnn(M.efficientnet_v2_s), 64), "regnet_x_400mf": (cnn(M.regnet_x_400mf), 64),
        "regnet_y_400mf": (cnn(M.regnet_y_400mf), 64), "convnext_tiny": (cnn(M.convnext_tiny), 64),
        "shufflenet_v2_x0_5": (cnn(M.shufflenet_v2_x0_5), 64), "shufflenet_v2_x1_0": (cnn(M.shufflenet_v2_x1_0), 64),
        "maxvit-16-32": (maxvit([16, 32], [1, 1]), 32), "maxvit-32-64": (maxvit([32, 64], [2, 1]), 32),
        "vit-small": (lambda: VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                                                mlp_dim=128, num_classes=10), 32),
        "swin-small": (lambda: SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                                               window_size=[4, 4], num_classes=10), 64),
    }


def head_of(m: nn.Module) -> nn.Module:
    if hasattr(m, "classifier") and isinstance(m.classifier, nn.Sequential) and \
            not any(isinstance(x, nn.Linear) for x in m.classifier):
        return m.classifier[1]                 # SqueezeNet: a 1×1 conv head
    return [x for x in m.modules() if isinstance(x, nn.Linear)][-1]


@torch.no_grad()
def calibrate(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """BatchNorm statistics of ``x`` (random weights with the default statistics shrink the
    activations layer after layer until there is little left to compare); in eval mode after."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None          # a cumulative average
    model.train()
    model(x)
    for m in norms:
        m.momentum = 0.1
    return model.eval()


def prune_to(eg, model: nn.Module, x: torch.Tensor, head: nn.Module, speedup: float) -> str:
    """``ETPPruner(target_speedup=speedup)`` on ``model``; its output against a copy with the same
    units masked (zeroed), by value (relative to the largest output) where every group cut is exact."""
    masked = copy.deepcopy(model)
    pruner = eg.ETPPruner(model, x, ignored_layers=[head], target_speedup=speedup)
    plan = pruner.path([speedup])[0]
    by_root = {g.root: g for g in eg.trace(masked, x, ignored_layers=[head_of(masked)]).groups}
    cut = [g for g in pruner.graph.groups if plan.removed.get(g.id)]
    for g in cut:
        by_root[g.root].zero_(plan.removed[g.id])
    report = pruner.step(plan=plan)
    with torch.no_grad():
        want, got = masked(x), model(x)
    ordered = [f"{g.root} {g.original_size} -> {g.size} units" for g in pruner.graph.groups if g.ordered]
    if all(g.exact for g in cut):
        compared = f"max |pruned - masked| / max |masked| {((got - want).abs().max() / want.abs().max()).item():.1e}"
    else:
        compared = (f"{sum(not g.exact for g in cut)} of the {len(cut)} groups cut hold a normalisation over "
                    f"their width (shape-checked): output {tuple(got.shape)}, finite {bool(got.isfinite().all())}")
    return (f"ETPPruner to {speedup:g}x: {report.speedup:.2f}x MACs, {compared}"
            + (f"; ordered: {', '.join(ordered)}" if ordered else ""))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="?", default="", help="comma-separated models (default: all)")
    p.add_argument("--source", help="folder holding an unpacked torchvision wheel")
    p.add_argument("--speedup", type=float, default=None,
                   help="also prune each model to this MACs speed-up with ETPPruner and compare it with "
                        "the same units masked in a copy")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    import etp_graph as eg
    from etp_graph.testing import assert_prune_equivalent
    table = models(import_torchvision(args.source))
    for name in [n for n in args.names.split(",") if n] or list(table):
        make, size = table[name]
        torch.manual_seed(0)
        x = torch.randn(2, 3, size, size)
        m = calibrate(make(), x)
        head = head_of(m)
        if not head.weight.any():       # torchvision's ViT starts its head at zero: nothing to compare
            nn.init.normal_(head.weight, std=0.02)
        start = time.perf_counter()
        g = eg.trace(m, x, ignored_layers=[head])
        took = time.perf_counter() - start
        layers = {n for n, l in m.named_modules() if isinstance(l, (nn.Conv2d, nn.Linear)) and l is not head}
        covered = {it.owner for grp in g.groups for it in grp.items} & layers
        try:
            checks = f"{len(assert_prune_equivalent(m, x, ignored_layers=[head], check_macs=False))} checks pass"
        except AssertionError as e:
            checks = f"EQUIVALENCE FAILED: {str(e).splitlines()[1][:120]}"
        print(f"{name}: {took:.1f} s, {len(g.groups)} groups, {len(g.skipped)} skipped, "
              f"{len(covered)}/{len(layers)} Conv/Linear layers in a group, {checks}", flush=True)
        split = [f"{grp.root} ({grp.size} units{', ordered: cut re-arranged' if grp.ordered else ''})"
                 for grp in g.groups if "Split" in grp.ops]
        if split:
            print(f"   split groups: {', '.join(split)}", flush=True)
        for s in g.skipped[:3]:
            print(f"   skipped {s.root}: {s.reason[:140]}", flush=True)
        if args.speedup:
            print(f"   {prune_to(eg, m, x, head, args.speedup)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
