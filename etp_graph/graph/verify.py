"""Mask-then-prune verification, shared by ``trace(validate=True)`` and ``etp_graph.testing``."""
from __future__ import annotations

import copy
import itertools
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.utils._pytree as pytree
from torch import nn

from .inputs import flat_tensors, forward


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


def compare(masked: Any, pruned: Any, exact: bool, rtol: float = 1e-4, atol: float = 1e-5,
            relative: bool = False, what: str = "output") -> Optional[Mismatch]:
    """``None`` when the outputs agree (values when ``exact``, else shapes and finiteness).

    The absolute tolerance is ``atol`` times the largest magnitude of the masked output, at
    least 1 (``relative=True``: the largest magnitude itself, for activations far below 1)."""
    a, b = flat_tensors(masked), flat_tensors(pruned)
    if len(a) != len(b):
        return Mismatch("count", f"the pruned model returns {len(b)} tensors, the masked one {len(a)}")
    for k, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape:
            return Mismatch("shape", f"{what} {k} has shape {tuple(y.shape)} after pruning, "
                                     f"{tuple(x.shape)} after masking")
        if not y.is_floating_point():
            if not torch.equal(x, y):
                return Mismatch("value", f"{what} {k} differs after pruning")
            continue
        if not torch.isfinite(y).all():
            return Mismatch("value", f"{what} {k} is not finite after pruning")
        if exact:
            top = x.abs().max().item() if x.numel() else 1.0
            scale = max(top, 1e-30) if relative else max(1.0, top)
            err = (x - y).abs().max().item() if x.numel() else 0.0
            if not torch.allclose(x, y, rtol=rtol, atol=atol * scale):
                return Mismatch("value", f"{what} {k} differs between masking and pruning (max abs error {err:.3g})")
    return None


def mask_and_prune(model: nn.Module, example_inputs: Any, cuts: Sequence[Tuple[Any, Sequence[int]]],
                   inside: Optional[List[Tuple[str, str]]] = None,
                   dtype: Optional[torch.dtype] = None,
                   watch: Optional[Dict[str, Tuple[list, list]]] = None) -> Tuple[Any, Any, nn.Module]:
    """The mask-versus-prune experiment, written once: on two deep copies of ``model`` (eval
    mode), zero the ``(group, units)`` of ``cuts`` in one and remove them from the other, run
    both on ``example_inputs``. Returns ``(masked output, pruned output, pruned copy)``; ``model``
    is not modified. ``inside``: a list that holds, while the pruned copy runs, ``(name, class)``
    of the modules whose forward is in progress (to say where a forward broke). ``dtype``: run
    the experiment with both copies and the floating inputs in this precision. ``watch``: module
    name → two lists that receive that module's outputs in the masked and the pruned copy."""
    masked, pruned = copy.deepcopy(model).eval(), copy.deepcopy(model).eval()
    if dtype is not None:
        masked.to(dtype), pruned.to(dtype)
        example_inputs = pytree.tree_map(
            lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, example_inputs)
    for group, units in cuts:
        group.zero_(units, model=masked)
        group.cut(pruned, units)
    hooks = []
    for name, (got_m, got_p) in (watch or {}).items():
        for copy_, got in ((masked, got_m), (pruned, got_p)):
            hooks.append(copy_.get_submodule(name).register_forward_hook(
                lambda _m, _a, out, got=got: got.extend(t.detach() for t in flat_tensors(out))))
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


def _low_precision(model: nn.Module) -> bool:
    return any(p.is_floating_point() and p.dtype != torch.float64
               for p in itertools.chain(model.parameters(), model.buffers()))


def experiment(model: nn.Module, example_inputs: Any, cuts, exact: bool,
               inside: Optional[List[Tuple[str, str]]] = None) -> Tuple[Optional[Mismatch], nn.Module]:
    """``(why masked and pruned outputs differ or None, the pruned copy)``.

    A value mismatch in float32 (or lower) is measured again in float64 copies: removing units
    changes the order of the sums in every layer downstream, and the rest of a network can
    amplify that round-off past any fixed tolerance (large weights, re-estimated BatchNorm
    statistics); a wrong channel map differs at any precision, round-off does not.

    For an exact group the outputs of the layers that read its channels (its ``"in"`` layers)
    are compared too, relative to their own magnitude: a wrong map there can be invisible at the
    model's output (a small randomly initialised transformer's attention barely moves its
    logits)."""
    # layers that read the cut channels without losing outputs of their own
    outs = {i.module for g, _ in cuts for i in g.items if i.role != "in"}
    consumers = sorted({i.module for g, _ in cuts for i in g.items
                        if i.role == "in" and i.module is not None and i.module not in outs}) if exact else []

    def run(dtype=None, inside=None) -> Tuple[Optional[Mismatch], nn.Module]:
        watch = {n: ([], []) for n in consumers}
        a, b, pruned = mask_and_prune(model, example_inputs, cuts, inside, dtype, watch)
        why = compare(a, b, exact)
        for n, (got_m, got_p) in watch.items():
            if why is None:
                why = compare(got_m, got_p, True, relative=True, what=f"the output of {n!r}, tensor")
        return why, pruned

    why, pruned = run(inside=inside)
    if why is not None and why.kind == "value" and exact and _low_precision(model):
        try:
            again, _ = run(torch.float64)
        except Exception:   # an op without float64 support: the float32 answer stands
            return why, pruned
        if again is None:
            return None, pruned
    return why, pruned


#: the share of a group's units a check removes (at least one, never all)
FRACTION = 0.25


def check_group(model: nn.Module, example_inputs: Any, group, fraction: float = FRACTION) -> Optional[str]:
    """Mask a copy, prune another copy, compare outputs; ``None`` when they agree, else the reason."""
    units = sample_units(group.size, fraction, seed=group.id)
    inside: List[Tuple[str, str]] = []   # modules whose forward is running in the pruned copy
    try:
        why, _ = experiment(model, example_inputs, [(group, units)], group.exact, inside)
    except Exception as e:  # a cut that breaks the forward is a refused group, not a crash
        where = ""
        if inside and inside[-1][0]:
            where = " in '{}' ({})".format(*inside[-1])
        return (f"pruning units {units[:8]} breaks the forward{where}: {type(e).__name__}: {e}; the "
                "forward there combines the pruned width with a fixed-size tensor (a buffer, a "
                "parameter or a hard-coded shape)")
    if why is None:
        return None
    if why.kind == "shape":
        return (f"its channels reach a model output ({why}); add the layer producing that output "
                "to ignored_layers")
    return f"verification failed ({why}); the backend's channel map is wrong here"
