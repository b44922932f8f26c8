"""ETP importance: the coupled norm of a unit, usable inside Torch-Pruning's own pruners.

ETP training drives the far-from-pivot units' coupled norms to zero, so the importance of a unit
is that norm (squared-L2 root for ``norm="l2"``, the L1 sum for ``"l1"``) over every parameter
slice the unit owns. Exact ties (units already at zero) go far-from-pivot first.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch_pruning as tp
from torch import nn

from .graph.group import slice_sums
from .handlers import get_handler
from .torque import ETPConfig

__all__ = ["ETPImportance", "ETPRegularizedPruner", "removal_order"]


def removal_order(scores: torch.Tensor, pivot: int, places: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Unit indices, first to remove first: lowest score, ties broken farthest from the pivot
    (along the regulariser's ``places``; by index when not given)."""
    n = len(scores)
    dist = ((torch.arange(n) if places is None else places.cpu()) - pivot).abs()
    # sort by distance (far first), then stably by score: equal scores keep far-first order
    by_dist = torch.argsort(-dist, stable=True)
    return by_dist[torch.argsort(scores.detach().cpu()[by_dist], stable=True)]


def tie_break(scores: torch.Tensor, pivot: int) -> torch.Tensor:
    """``scores`` nudged so a plain ascending sort follows :func:`removal_order`."""
    order = removal_order(scores, pivot)
    out = torch.empty(len(scores), dtype=torch.float64)
    sorted_scores = scores.detach().cpu().double()[order]
    # equal neighbours get strictly increasing values, far below any real gap
    gaps = torch.diff(sorted_scores)
    eps = max(float(gaps[gaps > 0].min()) if (gaps > 0).any() else 1.0, 1e-30) * 1e-3 / max(len(scores), 1)
    out[order] = sorted_scores + eps * torch.arange(len(scores), dtype=torch.float64)
    return out.to(scores.dtype)


class ETPImportance(tp.importance.Importance):
    """A Torch-Pruning importance: ``imp(group) -> Tensor[len(group[0].idxs)]``.

    Each dependency of the group is read through our handlers (Conv, Linear, norms, RNNs …) or,
    for a free ``nn.Parameter``, along its pruning dim; per root unit the squared values (or
    magnitudes for ``norm="l1"``) are summed over every coupled slice.

    Example::

        >>> imp = eg.ETPImportance(config=eg.ETPConfig(beta=1e-4))
        >>> pruner = tp.pruner.BasePruner(model, x, importance=imp, pruning_ratio=0.5,
        ...                               ignored_layers=[model.fc])
        >>> pruner.step()
    """

    def __init__(self, config: Optional[ETPConfig] = None):
        self.config = config if config is not None else ETPConfig(beta=0.0)

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor:
        n = len(group[0].idxs)
        total = torch.zeros(n, dtype=torch.float64)
        l2 = self.config.norm == "l2"
        for k, (dep, idxs) in enumerate(group):
            root_list = list(group[k].root_idxs)
            if not idxs or len(root_list) != len(idxs) or any(r is None for r in root_list):
                continue   # the backend lost track of which root unit these channels belong to
            roots = torch.tensor(root_list, dtype=torch.long)
            if (roots < 0).any() or (roots >= n).any():
                continue
            local = torch.tensor([int(getattr(i, "idx", i)) for i in idxs], dtype=torch.long)
            for t, dim, pos, index in _slices(dep, local):
                sel = t.detach().index_select(dim, index.to(t.device))
                per = slice_sums(sel, dim, self.config.norm).double().cpu()
                total.index_add_(0, roots[pos], per)
        scores = total.sqrt() if l2 else total
        return tie_break(scores.float(), self.config.pivot_of(n))


def _slices(dep, local: torch.Tensor):
    """``(tensor, dim, pos, index)`` for each parameter slice a dependency cuts: entry ``pos[k]``
    of ``local`` owns ``index[k]`` of ``tensor`` along ``dim``."""
    target = dep.target.module
    if isinstance(target, nn.Parameter):
        yield target, dep.target.pruning_dim % target.dim(), torch.arange(len(local)), local
        return
    handler = get_handler(target) if isinstance(target, nn.Module) else None
    role = "out" if _is_out(dep) else "in"
    if handler is None or handler.unsupported(target, role):
        return
    for s in handler.slices(target, role):
        t = getattr(target, s.attr, None)
        if isinstance(t, nn.Parameter):
            pos, index = s.index(local)
            yield t, s.dim, pos, index


def _is_out(dep) -> bool:
    # Torch-Pruning's pruning functions are the methods prune_out_channels / prune_in_channels
    return getattr(dep.handler, "__name__", None) == "prune_out_channels"


class ETPRegularizedPruner(tp.pruner.BasePruner):
    """Torch-Pruning's ``BasePruner`` with ETP sparse training: swap the class name, keep the loop.

    ``regularize(model)`` (call it after ``loss.backward()``, before ``optimizer.step()``, as in
    Torch-Pruning's sparse-training recipe) adds the ETP penalty's gradient over the coupled groups
    of :func:`etp_graph.trace` (same ignored layers). ``importance`` defaults to
    :class:`ETPImportance` with the same config; every other argument is ``BasePruner``'s.

    Example::

        >>> pruner = eg.ETPRegularizedPruner(model, x, config=eg.ETPConfig(beta=1e-4),
        ...                                  pruning_ratio=0.5, ignored_layers=[model.fc])
        >>> for x, y in loader:
        ...     loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward()
        ...     pruner.regularize(model); opt.step()
        >>> pruner.step()
    """

    def __init__(self, model: nn.Module, example_inputs, importance=None, config: Optional[ETPConfig] = None,
                 **kwargs):
        self.config = config if config is not None else ETPConfig(beta=1e-4)
        super().__init__(model, example_inputs, importance=importance or ETPImportance(self.config), **kwargs)
        self._etp_inputs = example_inputs
        self._etp_ignored = list(kwargs.get("ignored_layers") or [])
        self._etp_reg = None
        self._etp_shapes = None

    def update_regularizer(self) -> None:
        self._etp_reg = None

    def regularize(self, model: nn.Module, loss=None) -> None:
        from .graph import trace
        from .torque import make_regularizer
        shapes = [tuple(p.shape) for p in model.parameters()]
        if self._etp_reg is None or shapes != self._etp_shapes or self._etp_reg.model is not model:
            graph = trace(model, self._etp_inputs, self._etp_ignored)
            self._etp_reg, self._etp_shapes = make_regularizer(graph.groups, self.config, model), shapes
        self._etp_reg.apply_()
