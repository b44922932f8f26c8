"""The ``torch-pruning`` row: Torch-Pruning 1.6 end to end, on the task's budget, where it is exact.

First :func:`exactness` asks whether Torch-Pruning prunes the task's model exactly: it prunes a
copy with its own ``BasePruner`` (30 % of every group, ``GroupMagnitudeImportance``), zeroes the
same channels in another copy through Torch-Pruning's own groups (``pruning_history`` replayed as
masks) and compares the outputs (mask-then-prune, as ``etp_graph.testing`` does for us). Where
that fails the cell records the error and no numbers. Where it holds: the regularisation phase
calls Torch-Pruning's ``GroupNormPruner.regularize(model, alpha=16)`` after ``backward()`` (its
sparse-learning recipe, ``reg`` = the task's ``group-sl`` strength), and each speed-up is cut by a
``BasePruner`` (global, ``GroupMagnitudeImportance``) whose ``pruning_ratio`` is bisected until
our fvcore count reaches the target. Fine-tuning and measurement are the suite's own.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Dict, List, Optional

import torch
import torch_pruning as tp
from torch import nn

import etp_graph as eg

from . import methods as methods_mod
from .phases import Clock, finetune_cut
from .tasks.base import Task


def _heads_in(model: nn.Module, original: nn.Module, heads: List[nn.Module]) -> List[nn.Module]:
    names = {id(m): n for n, m in original.named_modules()}
    return [model.get_submodule(names[id(h)]) for h in heads]


def _tp_pruner(model, inputs, heads, ratio: float, global_pruning: bool):
    return tp.pruner.BasePruner(model, inputs, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                pruning_ratio=ratio, global_pruning=global_pruning, ignored_layers=heads)


def _call(model, inputs):
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def _zero_out_channels(dg, module: nn.Module, idxs: List[int]) -> None:
    """Zero these output channels of ``module``'s weight and bias, along the dim whose size is the
    module's output width as Torch-Pruning reports it (dim 0 first: an ambiguous shape can only
    make the check refuse, never pass wrongly)."""
    width = dg.get_out_channels(module)
    for attr in ("weight", "bias"):
        t = getattr(module, attr, None)
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            continue
        dim = next((d for d in range(min(t.dim(), 2)) if t.shape[d] == width), None)
        if dim is not None:
            t.index_fill_(dim, torch.tensor(idxs, dtype=torch.long), 0.0)


def exactness(model: nn.Module, inputs: Any, heads: List[nn.Module], ratio: float = 0.3) -> Optional[str]:
    """``None`` when Torch-Pruning's pruning equals masking the same channels; else why not."""
    try:
        pruned = copy.deepcopy(model).eval()
        pruner = _tp_pruner(pruned, inputs, _heads_in(pruned, model, heads), ratio, False)
        pruner.step()
        history = pruner.DG.pruning_history()
        if not history or eg.count_params(pruned) >= eg.count_params(model):
            return ("Torch-Pruning found nothing to prune in this model at pruning_ratio "
                    f"{ratio} (its layers are not ones it knows how to prune)")
        masked = copy.deepcopy(model).eval()
        dg = tp.DependencyGraph().build_dependency(masked, inputs, ignored_layers=_heads_in(masked, model, heads))
        groups = []
        for name, is_out, idxs in history:
            mod = masked.get_submodule(name)
            fns = dg.get_pruner_of_module(mod)
            groups.append(dg.get_pruning_group(mod, fns.prune_out_channels if is_out else fns.prune_in_channels, idxs))
        with torch.no_grad():
            for group in groups:
                for dep, dep_idxs in group:
                    if dg.is_out_channel_pruning_fn(dep.handler) and isinstance(dep.target.module, nn.Module):
                        _zero_out_channels(dg, dep.target.module, [int(getattr(i, "idx", i)) for i in dep_idxs])
            a, b = _call(pruned, inputs), _call(masked, inputs)
        if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
            return (f"Torch-Pruning's pruned model differs from masking the same channels (max |diff| "
                    f"{(a - b).abs().max().item() if a.shape == b.shape else 'shapes ' + str((a.shape, b.shape))})")
        return None
    except Exception as e:      # what Torch-Pruning raises is the answer we record
        return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


class _TPRegularizer:
    """Torch-Pruning's ``GroupNormPruner.regularize`` behind the suite's regulariser hook."""

    def __init__(self, model, inputs, heads, reg: float):
        self.model = model
        self.pruner = tp.pruner.GroupNormPruner(model, inputs, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                                reg=reg, ignored_layers=heads)

    def apply_(self) -> None:
        self.pruner.regularize(self.model, alpha=16.0)

    def decay_(self, lr: float) -> None:
        raise NotImplementedError("Torch-Pruning's sparse learning has no decoupled form; run it on a 'grad' task")


def _cut_to(model, inputs, heads, target: float, plan) -> nn.Module:
    base = eg.count_macs(model, inputs)

    def cut(ratio):
        m = copy.deepcopy(model)
        p = _tp_pruner(m, inputs, _heads_in(m, model, heads), ratio, True)
        if plan.round_to:
            p.round_to = plan.round_to
        if plan.max_pruning_ratio is not None:
            p.max_pruning_ratio = plan.max_pruning_ratio
        p.step()
        return m, base / max(eg.count_macs(m, inputs), 1)

    # Torch-Pruning skips a group it would empty, so the speed-up is not monotone near ratio 1:
    # find the first of 0.05 … 0.95 that reaches the target, then bisect below it
    lo, best = 0.0, None
    for k in range(1, 20):
        m, s = cut(k / 20)
        if s >= target:
            hi, best = k / 20, (m, s)
            break
        lo = k / 20
    if best is None:
        raise ValueError(f"Torch-Pruning does not reach {target}x at any pruning_ratio up to 0.95")
    for _ in range(8):
        if best[1] <= target * 1.02:
            break
        mid = (lo + hi) / 2
        m, s = cut(mid)
        if s >= target:
            hi, best = mid, (m, s)
        else:
            lo = mid
    return best[0]


def run_tp_cell(task: Task, seed: int, speedups: List[float], plan, latency_repeat: int) -> Dict[str, Any]:
    """The ``torch-pruning`` row: Torch-Pruning's own sparse learning, pruner and importance, cut
    with the run's ``PlanOptions`` (``plan``), where it prunes the task's model exactly."""
    from .tasks.base import RegHook
    clock = Clock()
    with clock("dense"):
        model = task.dense(seed)
    inputs, heads = task.example_inputs(), task.heads(model)
    method = methods_mod.TORCH_PRUNING
    beta = task.betas["group-sl"]
    out: Dict[str, Any] = {"dense": task.evaluate(model), "requested_speedups": speedups, "cuts": [],
                           "config": {"method": {"name": method.name, "description": method.description,
                                                 "regularizer": {"reg": beta, "alpha": 16.0},
                                                 "importance": "tp.importance.GroupMagnitudeImportance(p=2)"},
                                      "task": task.describe(), "budget": dict(vars(task.budget)),
                                      "pruner": {**dataclasses.asdict(plan),
                                                 "planner": "tp BasePruner, global, ratio bisected"}},
                           "wall_s": clock.wall}
    refused = exactness(model, inputs, heads)
    out["refused"] = refused
    out["regularised"] = out["dense"]
    if refused is not None or task.reg_mode != "grad":
        out["refused"] = refused or "the task's optimiser needs a decoupled regulariser; Torch-Pruning has none"
        return out
    hook = RegHook(_TPRegularizer(model, inputs, heads, beta), "grad")
    with clock("regularise"):
        task.train(model, task.budget.reg, seed=100 + seed, hook=hook, phase="regularise")
    out["regularised"] = task.evaluate(model)
    lat_inputs = task.latency_inputs()
    macs, params = eg.count_macs(model, inputs), eg.count_params(model)
    for target in speedups:
        with clock("plan"):
            small = _cut_to(model, inputs, heads, target, plan)
        m2 = eg.count_macs(small, inputs)
        report = {"macs": [macs, m2], "params": [params, eg.count_params(small)], "speedup": macs / max(m2, 1),
                  "units_kept": {}}
        out["cuts"].append(finetune_cut(task, small, report, target, model, lat_inputs, seed, latency_repeat, clock))
    return out
