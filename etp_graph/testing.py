"""``assert_prune_equivalent``: the engine's invariant as a helper users can run on their models."""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, List, Optional, Sequence

from torch import nn

from .counting import count_macs, count_params
from .graph import trace
from .graph.inputs import Outputs
from .graph.verify import experiment, sample_units

__all__ = ["assert_prune_equivalent", "GroupCheck"]


@dataclasses.dataclass(frozen=True)
class GroupCheck:
    root: str             # the group's root ("*" for a check of every group at once)
    size: int
    pruned: int
    checked: str          # "values" (masked == pruned) or "shape" (LayerNorm/GroupNorm in the group)
    params: tuple         # (before, after)
    macs: tuple           # (before, after)


def assert_prune_equivalent(model: nn.Module, example_inputs: Any,
                            ignored_layers: Optional[Iterable[nn.Module]] = None, *,
                            fraction: float = 0.25, check_macs: bool = True,
                            attention_units: str = "heads", units: Optional[Sequence[int]] = None,
                            together: bool = False, outputs: Optional[Sequence[Any]] = None) -> List[GroupCheck]:
    """For every group of ``eg.trace(model, …)``: masking units equals pruning them.

    On two deep copies of ``model``, some units of a group are zeroed in one and removed from
    the other; the outputs must agree within float tolerance, and parameters (and MACs, with
    ``check_macs``) must strictly drop. Where a normalisation over the pruned dimension
    (LayerNorm, GroupNorm) makes equality impossible, shapes and finiteness are checked instead,
    and the record says ``checked="shape"``. ``model`` is not modified.

    Which units: by default ``fraction`` of each group's units (at least one, never all, drawn
    with other seeds than ``trace``'s own verification), then the first and then the last unit,
    three checks per group; ``units=[...]``: exactly these units of every group, one check per
    group. ``together=True``: one check that removes them from every group at once.
    ``attention_units`` and ``outputs`` (the outputs compared; default all) are passed to
    ``trace``.

    Raises:
        AssertionError: listing every group that failed, with the reason.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    graph = trace(model, example_inputs, ignored_layers=ignored_layers, attention_units=attention_units,
                  outputs=outputs)
    probe = Outputs(example_inputs, outputs) if outputs is not None else example_inputs
    base = (count_params(model), count_macs(model, example_inputs) if check_macs else 0)

    def chosen(g) -> List[List[int]]:
        if units is not None:
            return [list(units)]
        if g.ordered:   # only the last units can go: a share of them, the last one, all but the first
            return [g.sample(fraction, seed=0), [g.size - 1], list(range(1, g.size))]
        return [sample_units(g.size, fraction, seed=10_000 + g.id), [0], [g.size - 1]]

    if together:
        cuts = [[(g, chosen(g)[0]) for g in graph.groups]]
    else:
        cuts = [[(g, u)] for g in graph.groups for u in chosen(g)]
    results, failures = [], []
    for cut in cuts:
        why, after = _check(model, probe, cut, base, check_macs)
        g, u = cut[0] if len(cut) == 1 else (None, [])
        where = f"group {g.id} rooted at {g.root!r} (units {u[:8]})" if g is not None else "every group at once"
        if why:
            failures.append(f"{where}: {why}")
        exact = all(gr.exact for gr, _ in cut)
        results.append(GroupCheck(g.root if g is not None else "*", g.size if g is not None else len(cut),
                                  len(u) if g is not None else sum(len(x) for _, x in cut),
                                  "values" if exact else "shape", (base[0], after[0]), (base[1], after[1])))
    if failures:
        raise AssertionError("mask-then-prune equivalence failed:\n  " + "\n  ".join(failures))
    return results


def _check(model, example_inputs, cut, base, check_macs):
    """``(reason or None, (params, macs) after)`` of one mask-versus-prune experiment."""
    exact = all(g.exact for g, _ in cut)
    try:
        why, pruned = experiment(model, example_inputs, cut, exact)
    except Exception as e:
        return f"{type(e).__name__}: {e}", (0, 0)
    params = count_params(pruned)
    macs = count_macs(pruned, example_inputs) if check_macs and why is None else 0
    if why is None and params >= base[0]:
        why = f"parameters did not drop ({base[0]} -> {params})"
    if why is None and check_macs and macs >= base[1]:
        why = f"MACs did not drop ({base[1]} -> {macs})"
    return why, (params, macs)
