"""Channel flows through splits and shuffles, read from what the forward computes.

The backend follows one root layer's channels by position; where halves of a tensor go
different ways and come back interleaved (ShuffleNet v2: ``chunk(2)`` → one half passes, the
other goes through a branch → ``cat`` → channel shuffle), the channels of several layers share
every constraint and no one root's group can hold them. This pass follows every channel of the
model at once instead (a forward with shadows, as :mod:`.shadow`), and builds one group per set
of layers whose channels meet in a channel split:

* every layer that writes channels (a convolution, a Linear) gives each output channel an id;
  a per-channel layer (BatchNorm, a depthwise convolution) passes its input's ids on;
* views, reshapes, permutes, cats and splits move the ids as they move the values; where two
  ids meet element-wise (a residual add, a squeeze-excitation scale) they are one unit;
* a view that splits the channels into ``(g, C/g)`` (a shuffle's first step) ties position ``j``
  of every part: removal must keep the parts aligned;
* a ``chunk``/``split`` of the channels into equal parts asks only that every part lose as many
  channels (:func:`balanced`): the parts go different ways.
* where no set of classes balances every split (a deep, narrow stage), the group is the stage's
  narrower widths, cut with the channels re-arranged (:mod:`.arrange`).

The same run serves three repairs of groups the backend's path refused (:func:`width_with_heads`,
:func:`with_counts`, :func:`with_tables`): an attention whose forward reshapes the heads' output
to its input's width goes with that width (MaxViT); a width the forward reads from an int
attribute is cut with the attribute updated (the run notes the int attributes each module's
forward reads; torchvision's ViT); a fixed table added to a width element-wise is cut with it
(every element of a handler-less module's floating buffer carries an id; Informer's position
table).

A group found here is kept only where it passes the mask-then-prune check, and only where
nothing else already cuts its tensors; it replaces the refusals of the layers it covers.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.utils._pytree as pytree
from torch import nn

from ..handlers import get_handler
from .arrange import arranged_group
from .discover import _Union
from .group import CoupledGroup, Counter, SliceItem
from .inputs import eval_mode, flat_tensors, forward
from .shadow import _Mode, _Run, note_int_reads

__all__ = ["Flows", "flow_run", "flow_groups", "flow_items", "width_with_heads", "with_counts", "with_tables",
           "balanced", "BALANCE_STATES"]

_SPLITS = frozenset("chunk split tensor_split split_with_sizes".split())
_VIEWS = frozenset("view reshape unflatten".split())
#: ops that act on each channel alone (pools, means over space, resizing): their output keeps
#: the channels where they were when the dims up to the channels' keep their sizes
_PER_CHANNEL = frozenset("""
adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d
adaptive_max_pool3d avg_pool1d avg_pool2d avg_pool3d max_pool1d max_pool2d max_pool3d lp_pool1d lp_pool2d
mean sum amax amin nanmean interpolate upsample pad dropout dropout1d dropout2d dropout3d
""".split())

#: reductions among them: ``dim`` and ``keepdim`` say where the channels go
_REDUCTIONS = frozenset("mean sum amax amin nanmean".split())


def _reduced_axis(d: int, rank: int, args, kwargs) -> Optional[int]:
    """Where channel axis ``d`` of a rank-``rank`` input lands after a reduction (``None`` when
    it is reduced, or when the call names no dims: everything is reduced)."""
    dims = kwargs.get("dim", args[1] if len(args) > 1 else None)
    if dims is None:
        return None
    dims = {int(k) % rank for k in ((dims,) if isinstance(dims, int) else dims)}
    if d in dims:
        return None
    keep = kwargs.get("keepdim", args[2] if len(args) > 2 and isinstance(args[2], bool) else False)
    return d if keep else d - sum(1 for k in dims if k < d)


#: Partial sums a balancing search may hold before it gives up (the group is then not offered).
BALANCE_STATES = 50_000
#: Element ids of fixed tables start here (below the shadow run's pair key), after every channel's
TABLE_BASE = 1 << 29
#: Tables larger than this carry no ids (a position table of 5,000 × 512 is 2.6 M)
TABLE_LIMIT = 1 << 23
#: Attributes :func:`with_counts` offers per refused group (each costs two checks)
MAX_COUNTS = 8


@dataclasses.dataclass
class Flows:
    """What the flow run saw: ids per layer, and the constraints on them."""

    sources: Dict[str, Tuple[int, int]]          # layer → (first id, channels) of its output
    passes: Dict[str, torch.Tensor]              # per-channel layer → the ids it carries
    reads: Dict[str, torch.Tensor]               # consuming layer → id per input channel (-1: none)
    parts: List[List[torch.Tensor]]              # channel splits: the ids of each equal part
    aligned: List[Tuple[torch.Tensor, int]]      # channel-splitting views: (ids, part width)
    ties: List[torch.Tensor]                     # [2, K] ids meeting element-wise
    blocked: Set[int]                            # ids that reach a product, a model output or a fixed-size split
    attrs: Dict[str, Dict[str, int]] = dataclasses.field(default_factory=dict)   # module → int attributes its forward read
    #: fixed tables (buffers of modules without a handler) → (first element id, shape); every element has an id
    tables: Dict[str, Tuple[int, Tuple[int, ...]]] = dataclasses.field(default_factory=dict)


def passes_channels(m: nn.Module) -> bool:
    """A layer whose output channel ``j`` is its input channel ``j`` (BatchNorm, LayerNorm,
    a depthwise convolution), as its handler describes it."""
    h = get_handler(m)
    if h is None:
        return False
    try:
        same = h.num_channels(m, "in") == h.num_channels(m, "out")
    except Exception:
        return False
    return bool(same) and (not h.can_root or not h.slices(m, "in"))


def _axis(s: torch.Tensor) -> Optional[int]:
    """The one dimension along which a shadow's ids change (the channels), else ``None``."""
    moving = [d for d in range(s.dim()) if s.shape[d] > 1 and bool((s != s.narrow(d, 0, 1)).any())]
    return moving[0] if len(moving) == 1 else None


def _along(s: torch.Tensor, d: int) -> torch.Tensor:
    return s.movedim(d, -1).reshape(-1, s.shape[d])[0].clone()


class _FlowRun(_Run):
    def __init__(self):
        super().__init__()
        self.parts: List[List[torch.Tensor]] = []
        self.aligned: List[Tuple[torch.Tensor, int]] = []
        self.fixed: Set[int] = set()

    def _merge(self, leaves, shadows, out) -> None:
        # a channel's id wins over a table element's where both meet (x + pe): the sum is the channel
        order = sorted(range(len(shadows)), key=lambda k: shadows[k] is None or bool((shadows[k] >= TABLE_BASE).any()))
        super()._merge([leaves[k] for k in order], [shadows[k] for k in order], out)

    def step(self, func, args, kwargs, out) -> None:
        super().step(func, args, kwargs, out)
        if not isinstance(out, torch.Tensor) or self.get(out) is not None or not out.is_floating_point():
            return
        name = getattr(func, "__name__", "")
        if name not in _PER_CHANNEL or self.hidden:
            return
        shadowed = [(t, self.get(t)) for t in pytree.tree_leaves((args, kwargs)) if self.get(t) is not None]
        if len(shadowed) != 1:
            return
        s = shadowed[0][1]
        d = at = _axis(s)
        if d is None:
            return
        if name in _REDUCTIONS:   # a reduction over dims before the channels moves them up
            at = _reduced_axis(d, s.dim(), args, kwargs)
            same = at is not None and at < out.dim() and out.shape[at] == s.shape[d]
        else:   # a pool, a mean over space, an interpolation: the channels stay where they were
            same = d < out.dim() and tuple(out.shape[:d + 1]) == tuple(s.shape[:d + 1])
        if same:
            ids = _along(s, d)
            self.put(out, ids.view([-1 if k == at else 1 for k in range(out.dim())]).expand(out.shape).clone())

    def _structural(self, func, args, kwargs, out) -> None:
        name = getattr(func, "__name__", "")
        src = args[0] if args else None
        s = self.get(src)
        super()._structural(func, args, kwargs, out)
        if s is None or not isinstance(src, torch.Tensor):
            return
        d = _axis(s)
        if d is None:
            return
        if name in _SPLITS and isinstance(out, (tuple, list)) and len(out) > 1:
            dim = kwargs.get("dim", args[2] if len(args) > 2 else 0)
            if int(dim) % s.dim() == d:
                ids = _along(s, d)
                sizes = [o.shape[d] for o in out]
                if len(set(sizes)) > 1:    # fixed sizes: no cut keeps the forward running
                    self.fixed.update(int(i) for i in ids.tolist() if i >= 0)
                    return
                offsets = [sum(sizes[:k]) for k in range(len(sizes) + 1)]
                self.parts.append([ids[offsets[k]:offsets[k + 1]] for k in range(len(sizes))])
        elif name in _VIEWS and isinstance(out, torch.Tensor):
            so = self.get(out)
            if so is None or so.dim() != s.dim() + 1:
                return
            moving = [k for k in range(so.dim()) if so.shape[k] > 1 and bool((so != so.narrow(k, 0, 1)).any())]
            if len(moving) == 2 and moving[1] == moving[0] + 1 and so.shape[moving[0]] * so.shape[moving[1]] == s.shape[d]:
                ids = _along(s, d)
                flat = so.permute([k for k in range(so.dim()) if k not in moving] + moving)
                flat = flat.reshape(-1, so.shape[moving[0]] * so.shape[moving[1]])[0]
                if torch.equal(flat, ids):
                    self.aligned.append((ids, so.shape[moving[1]]))


def flow_run(model: nn.Module, example_inputs: Any, names: Dict[nn.Module, str]) -> Flows:
    """One forward of ``model`` with channel ids (see the module docstring)."""
    run = _FlowRun()
    sources: Dict[str, Tuple[int, int]] = {}
    passes: Dict[str, torch.Tensor] = {}
    reads: Dict[str, torch.Tensor] = {}
    carried: Dict[int, Optional[torch.Tensor]] = {}
    hooks, base = [], [0]

    def channel_ids(m, x):
        s = run.get(x)
        h = get_handler(m)
        if s is None or s.dim() < 2:
            return None
        d = s.dim() - 1 if (h.channel_last or s.dim() == 2) else 1
        return _along(s, d)

    def pre(m, args, kwargs):
        if get_handler(m) is None:
            run.stack.append(names.get(m, ""))
            return
        if run.hidden == 0:
            x = args[0] if args else next(iter(kwargs.values()), None)
            ids = channel_ids(m, x)
            carried[id(m)] = ids
            if ids is not None:
                reads.setdefault(names.get(m, ""), ids)
        run.hidden += 1

    def post(m, args, kwargs, out):
        h = get_handler(m)
        if h is None:
            run.stack.pop()
            return
        run.hidden -= 1
        if run.hidden or not isinstance(out, torch.Tensor) or out.dim() < 2:
            return
        name = names.get(m, "")
        d = out.dim() - 1 if (h.channel_last or out.dim() == 2) else 1
        ids = carried.pop(id(m), None)
        if passes_channels(m):
            if ids is not None and len(ids) == out.shape[d]:
                passes.setdefault(name, ids)
                run.put(out, ids.view([-1 if k == d else 1 for k in range(out.dim())]).expand(out.shape).clone())
            return
        if h.can_root:
            n = out.shape[d]
            if name not in sources:
                sources[name] = (base[0], n)
                base[0] += n
            first, _ = sources[name]
            fresh = torch.arange(first, first + n).view([-1 if k == d else 1 for k in range(out.dim())])
            run.put(out, fresh.expand(out.shape).clone())

    attrs: Dict[str, Dict[str, int]] = {}
    tables: Dict[str, Tuple[int, Tuple[int, ...]]] = {}
    swapped, next_table = [], TABLE_BASE
    for m in model.modules():
        if get_handler(m) is None:
            for attr, t in m.named_buffers(recurse=False):
                if t is not None and t.is_floating_point() and 0 < t.numel() <= TABLE_LIMIT and \
                        next_table + t.numel() < (1 << 31) and run.get(t) is None:
                    key = f"{names.get(m, '')}.{attr}" if names.get(m, "") else attr
                    tables[key] = (next_table, tuple(t.shape))
                    run.put(t, torch.arange(next_table, next_table + t.numel()).view(t.shape))
                    next_table += t.numel()
    for m in model.modules():
        hooks.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(m.register_forward_hook(post, with_kwargs=True))
        if get_handler(m) is None:
            swapped += note_int_reads(m, attrs.setdefault(names.get(m, ""), {}))
    try:
        with eval_mode(model), torch.no_grad(), _Mode(run):
            out = forward(model, example_inputs)
            blocked = {int(i) for t in flat_tensors(out) for s in [run.get(t)] if s is not None
                       for i in s.unique().tolist() if i >= 0}
    finally:
        for hk in hooks:
            hk.remove()
        for m, cls in swapped:
            m.__class__ = cls
    blocked |= {i for p in run.products for i in p.ids} | run.fixed
    return Flows(sources, passes, reads, run.parts, run.aligned, run.mixed, blocked,
                 {k: v for k, v in attrs.items() if v}, tables)


# ------------------------------------------------------------------------------ balance
def balanced(classes: List[List[int]], vectors: List[Tuple[int, ...]]) -> Optional[List[List[int]]]:
    """``classes`` (of ids) joined into units whose ``vectors`` (the surplus each class removes
    from every part past the first of every split, against the first) sum to zero, so that
    any set of units keeps every split's parts equal. The earliest unbalanced class is joined
    with the fewest others that cancel it (classes with equal vectors are interchangeable: the
    earliest of each are taken), again until none is left; one that nothing cancels stays out
    of the units (never removed). ``None`` when the search grows past :data:`BALANCE_STATES`."""
    zero = (0,) * (len(vectors[0]) if vectors else 0)
    units = [cls for cls, v in zip(classes, vectors) if v == zero]
    pools: Dict[Tuple[int, ...], List[int]] = {}
    for k, v in enumerate(vectors):
        if v != zero:
            pools.setdefault(v, []).append(k)
    while pools:
        first = min(pools, key=lambda v: pools[v][0])
        counts = _composition([(v, len(ks)) for v, ks in pools.items()], first, zero)
        if counts is False:
            return None
        if counts is None:     # nothing cancels it: it stays
            pools[first].pop(0)
        else:
            chosen = [k for v, c in counts.items() for k in pools[v][:c]]
            for v, c in counts.items():
                del pools[v][:c]
            units.append(sorted(i for k in chosen for i in classes[k]))
        pools = {v: ks for v, ks in pools.items() if ks}
    return sorted(units, key=min)


def _composition(types, first, zero):
    """The fewest vectors (at most the count of each type), one of them ``first``, summing to
    zero, as ``{vector: count}``: a search by size (one more vector per round, the first type
    first on a tie); ``None`` if there are none, ``False`` past the state limit."""
    counts0 = tuple(1 if v == first else 0 for v, _ in types)
    level: Dict[Tuple[int, ...], Tuple[int, ...]] = {tuple(first): counts0}
    seen = 1
    for _ in range(sum(have for _, have in types)):
        if zero in level:
            return {v: c for (v, _), c in zip(types, level[zero]) if c}
        grown: Dict[Tuple[int, ...], Tuple[int, ...]] = {}
        for s, counts in level.items():
            for t, (v, have) in enumerate(types):
                if counts[t] < have:
                    acc = tuple(a + b for a, b in zip(s, v))
                    if acc not in grown:
                        grown[acc] = counts[:t] + (counts[t] + 1,) + counts[t + 1:]
        seen += len(grown)
        if seen > BALANCE_STATES:
            return False
        if not grown:
            return None
        level = grown
    return {v: c for (v, _), c in zip(types, level[zero]) if c} if zero in level else None


# ------------------------------------------------------------------------------- groups
def _classes(flows: Flows) -> Tuple[_Union, Dict[int, List[int]]]:
    """Ids that must go together (element-wise meetings, aligned view parts), by class root."""
    uf = _Union()
    for pair in flows.ties:
        for a, b in pair.t().tolist():
            uf.join(a, b)
    for ids, width in flows.aligned:
        for j in range(width):
            column = ids[j::width].tolist()
            for other in column[1:]:
                uf.join(column[0], other)
    classes: Dict[int, List[int]] = {}
    for first, n in flows.sources.values():
        for i in range(first, first + n):
            classes.setdefault(uf.find(i), []).append(i)
    return uf, classes


def flow_groups(graph, flows: Flows, ignored: Set[nn.Module],
                example_inputs: Any = None) -> List[Tuple[Optional[CoupledGroup], List[str], str]]:
    """Per set of channels that meet in a channel split: ``(group, layers, reason)``, the
    unverified group (``None`` when it cannot be made, with the ``reason`` where the splits'
    balance is why, else ``""``) and the layers whose output channels it holds (the refusals it
    may replace). Where no balanced units exist and ``example_inputs`` are given, the group is
    the stage's widths with its channels re-arranged (:mod:`.arrange`)."""
    modules = dict(graph.model.named_modules())
    uf, classes = _classes(flows)
    # classes that meet in one split are one group
    link = _Union()
    for split in flows.parts:
        roots = [uf.find(int(i)) for part in split for i in part.tolist() if i >= 0]
        for r in roots[1:]:
            link.join(roots[0], r)
    in_splits = {uf.find(int(i)) for split in flows.parts for part in split for i in part.tolist() if i >= 0}
    found: Dict[int, List[int]] = {}
    for r in classes:
        if r in in_splits:
            found.setdefault(link.find(r), []).append(r)
    return [_build(graph, flows, uf, classes, members, modules, ignored, example_inputs) for members in found.values()]


def _cut_layers(flows: Flows, uf: _Union, members: Set[int], modules) -> List[str]:
    order = {n: k for k, n in enumerate(modules)}
    return sorted((name for name, (first, n) in flows.sources.items()
                   if any(uf.find(i) in members for i in range(first, first + n))),
                  key=lambda n: order.get(n, len(order)))


def _build(graph, flows: Flows, uf: _Union, classes, members: List[int], modules, ignored, example_inputs=None):
    member_set = set(members)
    cut = _cut_layers(flows, uf, member_set, modules)
    if any(uf.find(i) in member_set for i in flows.blocked):
        return None, cut, ""      # the refusals already say why
    splits = [s for s in flows.parts if any(uf.find(int(i)) in member_set for p in s for i in p.tolist() if i >= 0)]
    ordered = sorted((classes[r] for r in members), key=min)
    dims = [(k, j) for k, s in enumerate(splits) for j in range(1, len(s))]
    index_of = {uf.find(c[0]): n for n, c in enumerate(ordered)}
    counts = [[0] * len(dims) for _ in ordered]
    for col, (k, j) in enumerate(dims):
        for sign, part in ((1, splits[k][j]), (-1, splits[k][0])):
            for i in part.tolist():
                if i >= 0 and uf.find(i) in index_of:
                    counts[index_of[uf.find(i)]][col] += sign
    units = balanced(ordered, [tuple(c) for c in counts])
    if units is None or len(units) < 2:
        why = (f"balancing the parts of the {len(splits)} channel splits its channels meet needs more "
               f"than {BALANCE_STATES:,} partial sums" if units is None else
               f"its channels meet {len(splits)} channel splits (chunk/split) whose parts must "
               "stay equal, with shuffles between them; no proper subset of them keeps every "
               "split's parts equal (the split-shuffle chain is too deep for its width)")
        if example_inputs is None:
            return None, cut, why
        ids = {i for c in ordered for i in c}
        group, also = arranged_group(graph, flows, example_inputs, cut, ids,
                                     lambda unit_of: flow_items(flows, modules, ignored, cut, unit_of), flow_run)
        return (group, cut, "") if group is not None else \
            (None, cut, why + (f", and re-arranging them does not help ({also})" if also else ""))
    made = flow_items(flows, modules, ignored, cut, {i: u for u, ids in enumerate(units) for i in ids})
    if made is None:
        return None, cut, ""
    items, exact = made
    return CoupledGroup(graph, 0, cut[0], len(units), items, exact, ["Concat", "Reshape", "Split"]), cut, ""


def flow_items(flows: Flows, modules, ignored, cut: Sequence[str],
               unit_of: Dict[int, int]) -> Optional[Tuple[List[SliceItem], bool]]:
    """The slices of every layer holding an id of ``unit_of`` (id → unit): the out-channels of
    the layers in ``cut`` and of the per-channel layers they pass, the in-channels of the layers
    reading them; with whether the group is exact. ``None`` where a layer cannot be cut so."""
    items: List[SliceItem] = []
    exact = True

    def add(name: str, role: str, ids: torch.Tensor) -> bool:
        nonlocal exact
        m = modules[name]
        h = get_handler(m)
        local = [k for k, i in enumerate(ids.tolist()) if i in unit_of]
        if not local:
            return True
        if (role == "out" and m in ignored) or h.unsupported(m, role):
            return False
        exact &= h.exact_when_masked
        pos = torch.tensor(local, dtype=torch.long)
        unit = torch.tensor([unit_of[int(ids[k])] for k in local], dtype=torch.long)
        for s in h.slices(m, role):
            at, index = s.index(pos)
            owner, _, attr = s.attr.rpartition(".")
            owner = f"{name}.{owner}" if owner else name
            items.append(SliceItem(owner, attr, s.dim, unit[at], index, name, role, pos[at]))
        return True

    for name in cut:
        first, n = flows.sources[name]
        if not add(name, "out", torch.arange(first, first + n)):
            return None
    for name, ids in list(flows.passes.items()) + [(n, i) for n, i in flows.reads.items() if n not in flows.passes]:
        if not add(name, "out" if name in flows.passes else "in", ids):
            return None
    return items, exact


def width_with_heads(graph, flows: Flows, ignored: Set[nn.Module], attentions: Sequence[Any]):
    """Attentions whose forward reshapes the heads' output to the width of their input (MaxViT's
    ``reshape(B, G, P, D)`` with ``D = x.shape[-1]``) can lose a head only with as many channels
    of that width. Per width (a class of ids read by the attentions' projections) and the
    attentions reading it, all with ``H`` heads over a width of ``H · d``: the joined groups to
    try, one per bookkeeping attempt, whose unit ``k`` is head ``k`` of every attention and width
    channels ``[k·d, (k+1)·d)``; with the layers whose output channels they cut."""
    modules = dict(graph.model.named_modules())
    uf, classes = _classes(flows)
    by_width: Dict[frozenset, List[Any]] = {}
    for att in attentions:
        readers = {it.module for g in att.attempts[:1] for it in g.items if it.role == "out"}
        roots = frozenset(uf.find(int(i)) for name in readers for i in flows.reads.get(name, torch.tensor([])).tolist()
                          if i >= 0)
        if roots:
            by_width.setdefault(roots, []).append(att)
    out = []
    for roots, atts in by_width.items():
        heads = {att.attempts[0].size for att in atts}
        width = sorted((classes[r] for r in roots), key=min)
        if len(heads) != 1 or any(len(c) == 0 for c in width) or any(uf.find(i) in roots for i in flows.blocked):
            continue
        (h,) = heads
        if h < 2 or len(width) % h:
            continue
        d = len(width) // h
        unit_of = {i: k // d for k, cls in enumerate(width) for i in cls}
        cut = _cut_layers(flows, uf, set(roots), modules)
        made = flow_items(flows, modules, ignored, cut, unit_of)
        if made is None:
            continue
        items, exact = made
        tries = []
        for k in range(max(len(att.attempts) for att in atts)):
            parts = [att.attempts[min(k, len(att.attempts) - 1)] for att in atts]
            tries.append(CoupledGroup(graph, 0, parts[0].root, h,
                                      [dataclasses.replace(i, pairs=None) for p in parts for i in p.items] + items,
                                      exact and all(p.exact for p in parts), ["attention"],
                                      [c for p in parts for c in p.counters],
                                      {n: v for p in parts for n, v in p.heads.items()}))
        out.append((tries, cut, atts))
    return out


def with_counts(graph, flows: Flows, group: CoupledGroup, host: str) -> List[CoupledGroup]:
    """``group`` (refused: its cut broke the forward in module ``host``) with one int attribute
    that ``host`` or a module around it reads and that counts the group's units (torchvision's
    ViT reshapes its patches with ``self.hidden_dim``): the copies to try, each updating one such
    attribute by its share per unit, one unit per count first."""
    hosts = [host] + [host.rsplit(".", k)[0] for k in range(1, host.count(".") + 1)] + ([""] if host else [])
    found = []
    for h in hosts:
        for attr, value in sorted(flows.attrs.get(h, {}).items()):
            if value and value % group.size == 0:
                found.append((value // group.size, h, attr))
    return [CoupledGroup(graph, group.id, group.root, group.size, group.items, group.exact, group.ops,
                         tuple(group.counters) + (Counter(h, attr, per),), group.heads)
            for per, h, attr in sorted(found, key=lambda f: (f[0], -len(f[1]), f[2]))[:MAX_COUNTS]]


def with_tables(graph, flows: Flows, group: CoupledGroup) -> Optional[CoupledGroup]:
    """``group`` with the fixed tables its channels meet element-wise (a sinusoidal position
    table added to a time series' embedding, a buffer no handler owns), each cut along the
    dimension that holds one entry per channel; ``None`` when it meets none so."""
    if group.root not in flows.sources:
        return None
    uf, _ = _classes(flows)
    first, _ = flows.sources[group.root]
    unit_of: Dict[int, int] = {}
    for it in group.items:
        if it.module == group.root and it.role == "out":
            for c, u in zip(it.channel.tolist(), it.unit.tolist()):
                unit_of[uf.find(first + c)] = u
    met = {int(i) for pair in flows.ties for i in pair.flatten().tolist() if i >= TABLE_BASE}
    items = []
    for key, (base, shape) in flows.tables.items():
        found = [(e - base, unit_of[uf.find(e)]) for e in sorted(met) if base <= e < base + math.prod(shape)
                 and uf.find(e) in unit_of]
        if not found:
            continue
        for d in range(len(shape)):
            stride = math.prod(shape[d + 1:])
            coord_unit: Dict[int, int] = {}
            if all(coord_unit.setdefault((e // stride) % shape[d], u) == u for e, u in found) and \
                    len(set(coord_unit.values())) == len(coord_unit):
                owner, _, attr = key.rpartition(".")
                index = torch.tensor(sorted(coord_unit), dtype=torch.long)
                unit = torch.tensor([coord_unit[i] for i in index.tolist()], dtype=torch.long)
                items.append(SliceItem(owner, attr, d, unit, index, None, "out", index.clone()))
                break
        else:
            return None    # met, but not one entry per channel along any dimension
    if not items:
        return None
    return CoupledGroup(graph, group.id, group.root, group.size, list(group.items) + items, group.exact, group.ops,
                        group.counters, group.heads)
