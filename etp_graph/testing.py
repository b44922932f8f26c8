"""``assert_prune_equivalent``: the engine's invariant as a helper users can run on their models."""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Iterable, List, Optional

import torch
from torch import nn

from .counting import count_macs, count_params
from .graph import trace
from .graph.inputs import forward
from .graph.verify import compare, sample_units

__all__ = ["assert_prune_equivalent", "GroupCheck"]


@dataclasses.dataclass(frozen=True)
class GroupCheck:
    root: str
    size: int
    pruned: int
    checked: str          # "values" (masked == pruned) or "shape" (LayerNorm/GroupNorm in the group)
    params: tuple         # (before, after)
    macs: tuple           # (before, after)


def assert_prune_equivalent(model: nn.Module, example_inputs: Any,
                            ignored_layers: Optional[Iterable[nn.Module]] = None,
                            fraction: float = 0.25, check_macs: bool = True,
                            attention_units: str = "heads") -> List[GroupCheck]:
    """For every group of ``eg.trace(model, …)``: masking units equals pruning them.

    On two deep copies of ``model``, ``fraction`` of each group's units (at least one, never all)
    are zeroed in one and removed from the other; the outputs must agree within float tolerance,
    and parameters (and MACs, with ``check_macs``) must strictly drop. Where a normalisation over
    the pruned dimension (LayerNorm, GroupNorm) makes equality impossible, shapes and finiteness
    are checked instead, and the returned record says ``checked="shape"``. The units are drawn
    with other seeds than ``trace``'s own verification, and the first and last unit are checked
    too, so this is an independent check of the groups ``trace`` returns. ``model`` is not modified.
    ``attention_units`` is passed to ``trace`` (``"heads"`` or ``"head_dims"``).

    Raises:
        AssertionError: listing every group that failed, with the reason.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    graph = trace(model, example_inputs, ignored_layers=ignored_layers, attention_units=attention_units)
    base_params = count_params(model)
    base_macs = count_macs(model, example_inputs) if check_macs else 0
    results, failures = [], []
    for g, units in ((g, u) for g in graph.groups
                     for u in (sample_units(g.size, fraction, seed=10_000 + g.id), [0], [g.size - 1])):
        masked, pruned = copy.deepcopy(model).eval(), copy.deepcopy(model).eval()
        try:
            g.zero_(units, model=masked)
            g.cut(pruned, units)
            with torch.no_grad():
                why = compare(forward(masked, example_inputs), forward(pruned, example_inputs), g.exact)
        except Exception as e:
            why = f"{type(e).__name__}: {e}"
        params = count_params(pruned)
        macs = count_macs(pruned, example_inputs) if check_macs and why is None else 0
        if why is None and params >= base_params:
            why = f"parameters did not drop ({base_params} -> {params})"
        if why is None and check_macs and macs >= base_macs:
            why = f"MACs did not drop ({base_macs} -> {macs})"
        if why:
            failures.append(f"group {g.id} rooted at {g.root!r} (units {units[:8]}): {why}")
        results.append(GroupCheck(g.root, g.size, len(units), "values" if g.exact else "shape",
                                  (base_params, params), (base_macs, macs)))
    if failures:
        raise AssertionError("mask-then-prune equivalence failed:\n  " + "\n  ".join(failures))
    return results
