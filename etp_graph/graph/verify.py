"""Mask-then-prune verification, shared by ``trace(validate=True)`` and ``etp_graph.testing``."""
from __future__ import annotations

import copy
from typing import Any, List, Optional

import torch
from torch import nn

from .inputs import forward


def flat_tensors(out: Any) -> List[torch.Tensor]:
    """Every tensor of a model output (tensor, tuple/list, dict, dataclass-like ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flat_tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flat_tensors(v)]
    if hasattr(out, "to_tuple"):
        return flat_tensors(out.to_tuple())
    return []


def sample_units(size: int, fraction: float, seed: int) -> List[int]:
    """A reproducible subset of ``max(1, round(fraction·size))`` units, never all of them."""
    k = min(size - 1, max(1, round(fraction * size)))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(size, generator=g)[:k].tolist())


def compare(masked: Any, pruned: Any, exact: bool, rtol: float = 1e-4, atol: float = 1e-5) -> Optional[str]:
    """``None`` when the outputs agree (values when ``exact``, else shapes and finiteness)."""
    a, b = flat_tensors(masked), flat_tensors(pruned)
    if len(a) != len(b):
        return f"the pruned model returns {len(b)} tensors, the masked one {len(a)}"
    for k, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape:
            return f"output {k} has shape {tuple(y.shape)} after pruning, {tuple(x.shape)} after masking"
        if not y.is_floating_point():
            if not torch.equal(x, y):
                return f"output {k} differs after pruning"
            continue
        if not torch.isfinite(y).all():
            return f"output {k} is not finite after pruning"
        if exact:
            scale = max(1.0, x.abs().max().item()) if x.numel() else 1.0
            err = (x - y).abs().max().item() if x.numel() else 0.0
            if not torch.allclose(x, y, rtol=rtol, atol=atol * scale):
                return f"output {k} differs between masking and pruning (max abs error {err:.3g})"
    return None


def check_group(model: nn.Module, example_inputs: Any, group, fraction: float = 0.25) -> Optional[str]:
    """Mask a copy, prune another copy, compare outputs; ``None`` when they agree, else the reason."""
    units = sample_units(group.size, fraction, seed=group.id)
    masked, pruned = copy.deepcopy(model).eval(), copy.deepcopy(model).eval()
    inside: List[str] = []        # modules whose forward is running in the pruned copy
    hooks = []
    try:
        group.zero_(units, model=masked)
        group.cut(pruned, units)
        def leave(*_):
            if inside:
                inside.pop()
        for name, m in pruned.named_modules():
            hooks.append(m.register_forward_pre_hook(lambda _m, _a, n=name: inside.append(n)))
            hooks.append(m.register_forward_hook(leave))
        with torch.no_grad():
            a = forward(masked, example_inputs)
            b = forward(pruned, example_inputs)
    except Exception as e:  # a cut that breaks the forward is a refused group, not a crash
        where = ""
        if inside and inside[-1]:
            where = f" in '{inside[-1]}' ({type(pruned.get_submodule(inside[-1])).__name__})"
        return (f"pruning units {units[:8]} breaks the forward{where}: {type(e).__name__}: {e}; the "
                "forward there combines the pruned width with a fixed-size tensor (a buffer, a "
                "parameter or a hard-coded shape)")
    finally:
        for h in hooks:
            h.remove()
    why = compare(a, b, group.exact)
    if why and "has shape" in why:
        return (f"its channels reach a model output ({why}); add the layer producing that output "
                "to ignored_layers")
    if why:
        return f"verification failed ({why}); the backend's channel map is wrong here"
    return None
