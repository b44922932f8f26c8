"""``CoupledGroup``: one set of units tied across tensors (``SliceItem``s), and what it can do:
measure, mask, prune (atomically), renumber."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..handlers import get_handler
from .atomic import atomic

if TYPE_CHECKING:  # pragma: no cover
    from .graph import ChannelGraph


@dataclasses.dataclass
class SliceItem:
    """Tensor ``owner.attr`` cut along ``dim``: unit ``unit[k]`` owns index ``index[k]``.

    ``module``/``role`` name the layer whose bookkeeping is refreshed after a cut; ``channel[k]``
    is the layer-local channel number behind pair ``k`` (counted to tell the layer how many it lost).
    """

    owner: str
    attr: str
    dim: int
    unit: torch.Tensor
    index: torch.Tensor
    module: Optional[str]
    role: str
    channel: torch.Tensor
    #: unique (unit, index) pairs, cached for the regulariser; reset when the item is renumbered
    pairs: Optional[torch.Tensor] = dataclasses.field(default=None, repr=False, compare=False)

    def unique_pairs(self) -> torch.Tensor:
        if self.pairs is None:
            self.pairs = torch.unique(torch.stack([self.unit, self.index]), dim=1)
        return self.pairs


@dataclasses.dataclass(frozen=True)
class Counter:
    """An int attribute ``owner.attr`` that the forward reads to shape its tensors (an
    attention's ``num_heads``, ``split_size``): it drops by ``per_unit`` for every unit cut."""

    owner: str
    attr: str
    per_unit: int


def slice_sums(t: torch.Tensor, dim: int, norm: str = "l2") -> torch.Tensor:
    """``Tensor[t.shape[dim]]``: per index along ``dim``, ``Σ t²`` (``"l2"``) or ``Σ |t|`` (``"l1"``)
    over the other dims; the one place the coupled norms are summed (groups and ETPImportance)."""
    per_elem = t.pow(2) if norm == "l2" else t.abs()
    dims = [d for d in range(t.dim()) if d != dim]
    return per_elem.sum(dim=dims) if dims else per_elem


def _resolve(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


class CoupledGroup:
    """Units (output channels, hidden units …) whose slices in several tensors go together.

    ``size`` units, numbered in the order of the root layer's channels. Every method acts on all
    coupled slices at once: the root layer's rows, the BatchNorm entries, the next layers' input
    columns, residual partners, free per-channel parameters.

    Example::

        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
        >>> g = eg.trace(model, torch.randn(1, 3, 8, 8)).groups[0]
        >>> g.root, g.size
        ('0', 8)
        >>> g.prune([0, 5]); model[0].out_channels, model[3].in_channels
        (6, 6)
    """

    def __init__(self, graph: "ChannelGraph", gid: int, root: str, size: int,
                 items: List[SliceItem], exact: bool, ops: Sequence[str] = (),
                 counters: Sequence[Counter] = (), heads: Optional[Dict[str, int]] = None):
        self._graph = graph
        self.id = gid
        self.root = root
        self._size = size
        #: the number of units when traced (``size`` drops as units are pruned)
        self.original_size = size
        self.items = items
        #: False when a normalisation over the pruned dimension (LayerNorm, GroupNorm) is in the
        #: group: masking then differs from removal and only shapes can be compared.
        self.exact = exact
        #: non-parametric ops the group's channels flow through (names of autograd nodes)
        self.ops = tuple(ops)
        #: attributes the forward reads that follow the number of units (found from the trace)
        self.counters = tuple(counters)
        #: attention groups: layer → heads of that layer per unit (a GQA unit is one key/value
        #: head and the query heads sharing it: ``{"q_proj": 2, "k_proj": 1, …}``)
        self.heads = dict(heads or {})
        #: ordered groups only (a split–shuffle stage cut with its channels re-arranged,
        #: :mod:`.arrange`): entry ``r - 1`` holds, for removing the last ``r`` units, the order in
        #: which each tensor dimension keeps its indices, ``{(owner, attr, dim): indices}``, and
        #: each layer its channels, ``{(layer, role): channels}``
        self.arrangements: Optional[List[Tuple[Dict[Tuple[str, str, int], torch.Tensor],
                                               Dict[Tuple[Optional[str], str], torch.Tensor]]]] = None

    @property
    def ordered(self) -> bool:
        """Whether the units go in order: only the last ``k`` can be removed (any ``k``), and a
        cut re-arranges the channels it keeps (:mod:`.arrange`)."""
        return self.arrangements is not None

    def sample(self, fraction: float, seed: int) -> List[int]:
        """Units a check removes: ``fraction`` of them drawn with ``seed`` (at least one, never
        all); the last ones of an ordered group."""
        from .verify import sample_units
        if self.ordered:
            k = min(self.size - 1, max(1, round(fraction * self.size)))
            return list(range(self.size - k, self.size))
        return sample_units(self.size, fraction, seed)

    # ----------------------------------------------------------------------------------- info
    @property
    def size(self) -> int:
        return self._size

    @property
    def model(self) -> nn.Module:
        """The model the group was traced from (its ``prune`` acts on it)."""
        return self._graph.model

    @property
    def modules(self) -> List[str]:
        """Qualified names of the layers with a slice in this group, in order of appearance."""
        return list(dict.fromkeys(i.module if i.module is not None else i.owner for i in self.items))

    def __repr__(self) -> str:
        return f"CoupledGroup(id={self.id}, root={self.root!r}, size={self.size}, layers={len(self.modules)})"

    # ------------------------------------------------------------------------------- checking
    def _check(self, indices: Iterable[int], allow_all: bool = False) -> torch.Tensor:
        if isinstance(indices, torch.Tensor):
            indices = indices.flatten().tolist()
        try:
            idx = [int(i) for i in indices]
        except TypeError as e:
            raise TypeError(f"group {self.root!r}: indices must be a sequence of ints, got "
                            f"{type(indices).__name__}") from e
        bad = [i for i in idx if not 0 <= i < self.size]
        if bad:
            raise ValueError(f"group {self.root!r} has {self.size} units (0..{self.size - 1}); "
                             f"indices {bad} are out of range")
        if len(set(idx)) != len(idx):
            dup = sorted({i for i in idx if idx.count(i) > 1})
            raise ValueError(f"group {self.root!r}: duplicate indices {dup}; pass each unit once")
        if not allow_all and len(idx) >= self.size:
            raise ValueError(f"group {self.root!r}: removing all {self.size} units would delete the "
                             f"layer; keep at least one unit")
        if not allow_all and self.ordered and idx and sorted(idx) != list(range(self.size - len(idx), self.size)):
            raise ValueError(f"group {self.root!r}: its units are the widths of a split–shuffle stage and go "
                             f"in order: remove the last {len(idx)} ({self.size - len(idx)}..{self.size - 1}), "
                             f"not {sorted(idx)[:8]}")
        return torch.tensor(sorted(idx), dtype=torch.long)

    # ---------------------------------------------------------------------------- operations
    def unit_norms(self, model: Optional[nn.Module] = None) -> torch.Tensor:
        """``Tensor[size]``: per unit, the L2 norm over every coupled parameter slice (differentiable).

        Weights, biases, norm affine parameters and the next layers' input slices count; buffers
        (BatchNorm running statistics) do not, as training cannot move them. A tensor index shared
        by several channels of one unit (a grouped convolution's weight column) is counted once.
        """
        return self.unit_sums(model, "l2").sqrt()

    def unit_sums(self, model: Optional[nn.Module] = None, norm: str = "l2") -> torch.Tensor:
        """``Tensor[size]``: per unit, ``Σ θ²`` (``norm="l2"``) or ``Σ |θ|`` (``"l1"``) over every
        coupled parameter slice; differentiable, no square root (its gradient at 0 is undefined)."""
        model = self._graph.model if model is None else model
        total = None
        for it, t, pairs in self.parameter_slices(model):
            per_index = slice_sums(t, it.dim, norm)
            contrib = torch.zeros(self.size, dtype=t.dtype, device=t.device).index_add(
                0, pairs[0].to(t.device), per_index[pairs[1].to(t.device)])
            total = contrib if total is None else total + contrib
        return torch.zeros(self.size) if total is None else total

    def parameter_slices(self, model: Optional[nn.Module] = None):
        """``(item, parameter, pairs)`` for every slice that is a parameter; ``pairs`` is the
        ``2 × K`` tensor of unique ``(unit, index)`` pairs of the item."""
        model = self._graph.model if model is None else model
        for it in self.items:
            t = getattr(_resolve(model, it.owner), it.attr)
            if not isinstance(t, nn.Parameter):
                continue
            yield it, t, it.unique_pairs()

    @torch.no_grad()
    def zero_(self, indices: Iterable[int], model: Optional[nn.Module] = None) -> None:
        """Zero every coupled slice of these units in place: a mask with the pruned model's output."""
        for t, dim, index in self.slices_of(indices, model):
            t.index_fill_(dim, index, 0)

    def slices_of(self, indices: Iterable[int], model: Optional[nn.Module] = None):
        """``(tensor, dim, index)`` of every coupled slice of these units (what :meth:`zero_` zeroes)."""
        units = self._check(indices, allow_all=True)
        model = self._graph.model if model is None else model
        for it in self.items:
            sel = torch.isin(it.unit, units)
            if sel.any():
                t = getattr(_resolve(model, it.owner), it.attr)
                yield t, it.dim, it.index[sel].unique().to(t.device)

    def prune(self, indices: Iterable[int]) -> None:
        """Physically remove these units from every coupled tensor. Atomic: on error nothing changes.

        The group stays usable: its remaining units are renumbered ``0 … size - len(indices) - 1``
        in the same order, and the other groups of the graph stay valid (where they share a
        tensor dimension with this one, a concat's consumer, their indices follow the cut).
        """
        prune_groups(self._graph, [(self, indices)])

    # ------------------------------------------------------------------------------ internals
    def cut(self, model: nn.Module, units: Iterable[int]) -> None:
        """Remove ``units``' slices from ``model``: the graph's model or a copy of it (same module
        names), without renumbering. Atomic: on error ``model`` is unchanged. Use :meth:`prune`
        for the graph's own model and :func:`cut_groups` to cut several groups of one copy."""
        cut_groups(model, [(self, units)])

    def _renumber(self, units: torch.Tensor, index_gone: Dict[Tuple[str, str, int], torch.Tensor],
                  channel_gone: Dict[Tuple[Optional[str], str], torch.Tensor]) -> None:
        """Drop ``units`` (may be none) and shift every index and channel number past the ones
        removed by the cut (of this group and of the others cut with it)."""
        if self.ordered and len(units):
            return self._rearrange(units)
        unit_map = torch.full((self.size,), -1, dtype=torch.long)
        dropped = set(units.tolist())
        kept = torch.tensor([u for u in range(self.size) if u not in dropped], dtype=torch.long)
        unit_map[kept] = torch.arange(len(kept))
        empty = torch.zeros(0, dtype=torch.long)
        for it in self.items:
            keep = ~torch.isin(it.unit, units)
            idx = it.index[keep]
            it.index = idx - torch.searchsorted(index_gone.get((it.owner, it.attr, it.dim), empty), idx)
            it.unit = unit_map[it.unit[keep]]
            ch = it.channel[keep]
            it.channel = ch - torch.searchsorted(channel_gone.get((it.module, it.role), empty), ch)
            it.pairs = None
        self._size = len(kept)

    def _rearrange(self, units: torch.Tensor) -> None:
        """:meth:`_renumber` of an ordered group cut by its last ``len(units)`` units: every index
        and channel goes where the cut's arrangement put it, and the arrangements of the deeper
        cuts are read in the new numbering."""
        r = len(units)
        orders, channels = self.arrangements[r - 1]
        inv = {k: _inverse(v) for k, v in orders.items()}
        inv_ch = {k: _inverse(v) for k, v in channels.items()}
        for it in self.items:
            keep = it.unit < self.size - r
            it.index = inv[(it.owner, it.attr, it.dim)][it.index[keep]]
            it.channel = inv_ch[(it.module, it.role)][it.channel[keep]]
            it.unit = it.unit[keep]
            it.pairs = None
        self.arrangements = [({k: inv[k][v] for k, v in o.items()}, {k: inv_ch[k][v] for k, v in c.items()})
                             for o, c in self.arrangements[r:]]
        self._size -= r


def _inverse(order: torch.Tensor) -> torch.Tensor:
    """``inv[order[k]] = k`` (``-1`` where ``order`` holds no such index)."""
    inv = torch.full((int(order.max()) + 1 if len(order) else 0,), -1, dtype=torch.long)
    inv[order] = torch.arange(len(order))
    return inv


def cut_groups(model: nn.Module, cuts: Sequence[Tuple["CoupledGroup", Iterable[int]]]):
    """Remove every ``(group, units)`` of ``cuts`` from ``model`` at once. Groups may share a
    tensor dimension (the input columns of a layer after a concat belong to both branches):
    the indices of all of them are read in the numbering before the cut, so cutting them one
    after the other would shift the later ones. Atomic: on error ``model`` is unchanged.

    Returns ``(index_gone, channel_gone)``: per ``(owner, attr, dim)`` the sorted indices removed,
    per ``(layer, role)`` the layer-local channel numbers removed (to renumber the groups)."""
    plan: Dict[Tuple[str, str], Dict[int, set]] = {}
    removed: Dict[Tuple[Optional[str], str], set] = {}
    arranged: Dict[Tuple[str, str], Dict[int, torch.Tensor]] = {}   # ordered groups: the order kept
    touched = set()
    for group, units in cuts:
        units = group._check(units)
        if group.ordered and len(units):
            for (owner, attr, dim), order in group.arrangements[len(units) - 1][0].items():
                arranged.setdefault((owner, attr), {})[dim] = order
                plan.setdefault((owner, attr), {}).setdefault(dim, set())
        for it in group.items:
            sel = torch.isin(it.unit, units)
            if not sel.any():
                continue
            plan.setdefault((it.owner, it.attr), {}).setdefault(it.dim, set()).update(it.index[sel].tolist())
            if it.module is not None:
                removed.setdefault((it.module, it.role), set()).update(it.channel[sel].tolist())
        if len(units):
            touched |= {c.owner for c in group.counters}
    touched |= {o for o, _ in plan} | {m for m, _ in removed}
    # a tensor shared by several modules (tied embeddings) is cut once and stays shared
    shared: Dict[int, Tuple[torch.Tensor, Dict[int, set], List[Tuple[nn.Module, str]], Dict[int, torch.Tensor]]] = {}
    for (owner, attr), dims in plan.items():
        mod = _resolve(model, owner)
        t = getattr(mod, attr)
        entry = shared.setdefault(id(t), (t, {}, [], {}))
        for dim, drop in dims.items():
            entry[1].setdefault(dim, set()).update(drop)
        entry[2].append((mod, attr))
        entry[3].update(arranged.get((owner, attr), {}))
    for t, dims, places, orders in shared.values():
        for dim, order in orders.items():
            if sorted(order.tolist()) != [i for i in range(t.shape[dim]) if i not in dims[dim]]:
                raise ValueError(f"{places[0][1]!r} of an ordered group's layer: its arrangement does not keep "
                                 "exactly the indices the cut leaves (another group cuts the same dimension)")
    with atomic(model, touched):
        for t, dims, places, orders in shared.values():
            new = base = t.detach()
            for dim, drop in dims.items():
                keep = orders[dim].tolist() if dim in orders else [i for i in range(new.shape[dim]) if i not in drop]
                new = new.index_select(dim, torch.tensor(keep, dtype=torch.long, device=t.device))
            if new is base:   # (index_select made a new tensor; never share the old one)
                new = new.clone()
            new = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
            for mod, attr in places:
                if isinstance(t, nn.Parameter):
                    setattr(mod, attr, new)
                else:
                    mod._buffers[attr] = new
        counts: Dict[str, Dict[str, int]] = {}
        for (mname, role), ch in removed.items():
            counts.setdefault(mname, {})[role] = len(ch)
        for mname, c in counts.items():
            mod = _resolve(model, mname)
            get_handler(mod).refresh(mod, c)
        for group, units in cuts:
            n = len(group._check(units))
            for c in group.counters:
                if n:
                    mod = _resolve(model, c.owner)
                    setattr(mod, c.attr, getattr(mod, c.attr) - c.per_unit * n)
    as_sorted = lambda v: torch.tensor(sorted(v), dtype=torch.long)  # noqa: E731
    return ({(o, a, d): as_sorted(v) for (o, a), dims in plan.items() for d, v in dims.items()},
            {k: as_sorted(v) for k, v in removed.items()})


def prune_groups(graph: "ChannelGraph", cuts: Sequence[Tuple["CoupledGroup", Iterable[int]]]) -> None:
    """Remove ``cuts`` from the graph's model at once (:func:`cut_groups`) and renumber every
    group of the graph. Atomic: on error nothing changes."""
    cuts = [(g, g._check(u)) for g, u in cuts]
    cuts = [(g, u) for g, u in cuts if len(u)]
    if not cuts:
        return
    index_gone, channel_gone = cut_groups(graph.model, cuts)
    units = {id(g): u for g, u in cuts}
    empty = torch.zeros(0, dtype=torch.long)
    for g in list(dict.fromkeys(list(graph.groups) + [g for g, _ in cuts])):
        g._renumber(units.get(id(g), empty), index_gone, channel_gone)
