"""Mask-then-prune verification, shared by ``trace(validate=True)`` and ``etp_graph.testing``."""
from __future__ import annotations

import copy
from typing import Any, List, Optional, Sequence, Tuple

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


class Mismatch(str):
    """Why masked and pruned outputs differ; ``kind`` is ``"count"``, ``"shape"`` or ``"value"``."""

    def __new__(cls, kind: str, text: str):
        obj = super().__new__(cls, text)
        obj.kind = kind
        return obj


def compare(masked: Any, pruned: Any, exact: bool, rtol: float = 1e-4, atol: float = 1e-5) -> Optional[Mismatch]:
    """``None`` when the outputs agree (values when ``exact``, else shapes and finiteness)."""
    a, b = flat_tensors(masked), flat_tensors(pruned)
    if len(a) != len(b):
        return Mismatch("count", f"the pruned model returns {len(b)} tensors, the masked one {len(a)}")
    for k, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape:
            return Mismatch("shape", f"output {k} has shape {tuple(y.shape)} after pruning, "
                                     f"{tuple(x.shape)} after masking")
        if not y.is_floating_point():
            if not torch.equal(x, y):
                return Mismatch("value", f"output {k} differs after pruning")
            continue
        if not torch.isfinite(y).all():
            return Mismatch("value", f"output {k} is not finite after pruning")
        if exact:
            scale = max(1.0, x.abs().max().item()) if x.numel() else 1.0
            err = (x - y).abs().max().item() if x.numel() else 0.0
            if not torch.allclose(x, y, rtol=rtol, atol=atol * scale):
                return Mismatch("value", f"output {k} differs between masking and pruning (max abs error {err:.3g})")
    return None


def mask_and_prune(model: nn.Module, example_inputs: Any, cuts: Sequence[Tuple[Any, Sequence[int]]],
                   inside: Optional[List[Tuple[str, str]]] = None) -> Tuple[Any, Any, nn.Module]:
    """The mask-versus-prune experiment, written once: on two deep copies of ``model`` (eval
    mode), zero the ``(group, units)`` of ``cuts`` in one and remove them from the other, run
    both on ``example_inputs``. Returns ``(masked output, pruned output, pruned copy)``; ``model``
    is not modified. ``inside``: a list that holds, while the pruned copy runs, ``(name, class)``
    of the modules whose forward is in progress (to say where a forward broke)."""
    masked, pruned = copy.deepcopy(model).eval(), copy.deepcopy(model).eval()
    for group, units in cuts:
        group.zero_(units, model=masked)
        group.cut(pruned, units)
    hooks = []
    if inside is not None:
        def leave(*_):
            if inside:
                inside.pop()
        for name, m in pruned.named_modules():
            hooks.append(m.register_forward_pre_hook(lambda _m, _a, n=name: inside.append((n, type(_m).__name__))))
            hooks.append(m.register_forward_hook(leave))
    try:
        with torch.no_grad():
            return forward(masked, example_inputs), forward(pruned, example_inputs), pruned
    finally:
        for h in hooks:
            h.remove()


def check_group(model: nn.Module, example_inputs: Any, group, fraction: float = 0.25) -> Optional[str]:
    """Mask a copy, prune another copy, compare outputs; ``None`` when they agree, else the reason."""
    units = sample_units(group.size, fraction, seed=group.id)
    inside: List[Tuple[str, str]] = []   # modules whose forward is running in the pruned copy
    try:
        a, b, pruned = mask_and_prune(model, example_inputs, [(group, units)], inside)
    except Exception as e:  # a cut that breaks the forward is a refused group, not a crash
        where = ""
        if inside and inside[-1][0]:
            where = " in '{}' ({})".format(*inside[-1])
        return (f"pruning units {units[:8]} breaks the forward{where}: {type(e).__name__}: {e}; the "
                "forward there combines the pruned width with a fixed-size tensor (a buffer, a "
                "parameter or a hard-coded shape)")
    why = compare(a, b, group.exact)
    if why is None:
        return None
    if why.kind == "shape":
        return (f"its channels reach a model output ({why}); add the layer producing that output "
                "to ignored_layers")
    return f"verification failed ({why}); the backend's channel map is wrong here"
