"""MACs predicted from per-module costs: what a plan saves, without copying and counting a model.

One fvcore count of the model gives every module's own MACs per operator (its total minus its
children's). A layer's own products (linear, conv, norm) scale with the kept part of each
dimension of its weight that groups cut: a Linear's rows and columns, a depthwise
convolution's rows only, a dimension a residual group owns in part (option-A shortcuts pad a
stage into the next). Products between activations (``matmul``, ``bmm``, SDPA) scale with the
kept share of the attention groups inside the module. The planner ranks and bisects on this
prediction, then counts the plan it chose with fvcore and moves to the nearest plan that fvcore
confirms, so an imperfect prediction (an RNN, a product of another kind) costs a few more
counts, never a wrong answer.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from torch import nn

from .counting import _analysis, eval_mode
from .graph.scope import common_prefix, touched

__all__ = ["MacModel"]


#: ops between activations: their cost follows the heads of an attention inside the module
PRODUCTS = frozenset("matmul bmm baddbmm einsum scaled_dot_product_attention".split())


class MacModel:
    """``predict(plan)``: MACs of the model with ``plan`` (group id → units removed) applied."""

    def __init__(self, model: nn.Module, example_inputs: Any, groups: Sequence[Any]):
        with eval_mode(model):
            fca = _analysis(model, example_inputs)
            self.total = int(fca.total())
            inclusive = {k[len("model."):] if k.startswith("model.") else "": v
                         for k, v in fca.by_module_and_operator().items() if k != ""}
        names = dict(model.named_modules())
        self.sizes = {g.id: g.size for g in groups}
        # per (tensor, dim): the indices each group owns there (a residual stream's group may
        # own part of a dim: option-A shortcuts pad it into the next stage)
        owned: Dict[Tuple[str, str], Dict[int, Dict[int, set]]] = {}
        for g in groups:
            for it in g.items:
                owned.setdefault((it.owner, it.attr), {}).setdefault(it.dim, {}).setdefault(g.id, set()).update(
                    it.index.tolist())
        scope = {g.id: common_prefix(touched(g)) for g in groups}
        inside = {g.id: {it.owner for it in g.items} for g in groups if g.heads}   # attentions' layers
        #: (own MACs, ((length, ((group id, indices per unit), ...)) per cut dim), groups that scale it)
        self.terms: List[Tuple[int, tuple, tuple]] = []
        for name, mod in names.items():
            prefix = f"{name}." if name else ""
            ops = dict(inclusive.get(name, {}))
            for child, _ in mod.named_children():
                for op, v in inclusive.get(prefix + child, {}).items():
                    ops[op] = ops.get(op, 0) - v
            ref = self._reference(name, mod, owned)
            for op, cost in ops.items():
                if cost <= 0:
                    continue
                if op in PRODUCTS:   # the heads of an attention inside this module
                    heads = tuple(gid for gid in self.sizes if scope[gid] == name or any(
                        o == name or o.startswith(prefix) for o in inside.get(gid, ())))
                    self.terms.append((cost, (), heads))
                elif ref is not None:   # a layer's own product: its weight's kept dims
                    t = getattr(mod, ref[1])
                    self.terms.append((cost, tuple(
                        (t.shape[d], tuple((gid, len(idx) / self.sizes[gid]) for gid, idx in by.items()))
                        for d, by in owned[(name, ref[1])].items()), ()))
                else:
                    self.terms.append((cost, (), ()))
        self.unexplained = self.total - sum(t[0] for t in self.terms)   # counted outside any module

    @staticmethod
    def _reference(name: str, mod: nn.Module, owned) -> Optional[Tuple[str, str]]:
        """The parameter whose kept dims scale a layer's own products: ``weight`` when cut, else
        its largest cut parameter (``nn.MultiheadAttention``'s ``in_proj_weight``)."""
        cut = [(t.numel(), attr) for attr, t in mod.named_parameters(recurse=False) if (name, attr) in owned]
        if not cut:
            return None
        return (name, "weight") if any(a == "weight" for _, a in cut) else (name, max(cut)[1])

    def predict(self, removed: Dict[int, Sequence[int]]) -> float:
        gone = {gid: len(u) for gid, u in removed.items() if gid in self.sizes}
        out = float(self.unexplained)
        for cost, dims, scaled in self.terms:
            f = 1.0
            for length, by in dims:
                f *= max(0.0, 1.0 - sum(gone.get(gid, 0) * per for gid, per in by) / length)
            for gid in scaled:
                f *= 1.0 - gone.get(gid, 0) / self.sizes[gid]
            out += cost * f
        return out

    def saved_by_one(self, gid: int) -> float:
        """MACs saved by removing one unit of group ``gid`` alone."""
        return self.total - self.predict({gid: [0]})

