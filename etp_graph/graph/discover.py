"""Attention found from the trace: head-structured groups built from the shadow run.

The channels that matrix products bring together (:mod:`.shadow`) fall into connected
components: one per head (q, k and v channels of one batch slice of the products), or per
key/value head with the query heads that share it (grouped-query attention), together with
what the scores were mixed with (T5's per-head relative position bias). The components that
share layers are one attention; a unit is a component (``attention_units="heads"``) or one
coordinate inside every head (``"head_dims"``: dimension ``j`` of q, k, v and of the output
projection's columns, where q/k and v heads are equally wide and no rotary embedding pairs
dimensions). Where key/value heads are shared, ``"query_heads"`` makes unit ``s`` the ``s``-th
query head of every key/value head (keys and values stay; each key/value head keeps as many
query heads); with one key/value head (multi-query attention) ``"heads"`` does the same, as the
component alone could not be cut. A free table every head reads alike at its place inside the
head (a rotary embedding's frequencies) joins no heads.

The cut must also update what the forward of the attention module reads to shape its tensors
(``split_size``, ``all_head_size``, ``num_heads`` …). Candidates are the int attributes that
the host module (the one whose forward runs the products) read during the shadow run and whose
value is one of the attention's counts (heads of a layer, its width, its head size). The engine
tries the smallest sets of updates first and keeps the first with which the pruned model agrees
with the masked one (mask-then-prune, by value): an attribute is changed only when the cut model
needs it, so an unrelated one with an equal value (``layer_idx``) stays as it is. Query-head units
change the number of query heads per key/value head, which a forward may read on a path the
check does not run (Hugging Face's decoding step packs the query heads by it): there, the counts
that hold the same value in every module of the host's class are tried first.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Dict, List, Optional, Set, Tuple

import torch
from torch import nn

from ..handlers import get_handler
from .group import Counter, CoupledGroup, SliceItem
from .shadow import Shadows

__all__ = ["Attention", "find_attention"]

#: attempts at the bookkeeping (sets of attribute updates) verified per attention
MAX_ATTEMPTS = 12


@dataclasses.dataclass
class Attention:
    """One attention found in the trace, as groups to verify (one per bookkeeping attempt) or a
    refusal."""

    root: str                       # its first projection (where the group is reported)
    layers: List[str]               # every layer with a slice in it
    attempts: List[CoupledGroup]
    reason: Optional[str] = None


class _Union:
    def __init__(self):
        self.parent: Dict[int, int] = {}

    def find(self, x: int) -> int:
        root = x
        while self.parent.setdefault(root, root) != root:
            root = self.parent[root]
        while x != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def join(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


class _Flat(_Union):
    """A union whose every element points at its root already (no path to follow)."""

    def find(self, x: int) -> int:
        return self.parent.get(x, x)


def _isin_sorted(x: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """``torch.isin(x, known)`` for a sorted ``known`` (a binary search, cheaper than isin's sort)."""
    if not len(known):
        return torch.zeros_like(x, dtype=torch.bool)
    at = torch.searchsorted(known, x).clamp_(max=len(known) - 1)
    return known[at] == x


def _per_dimension_tables(sh: Shadows) -> torch.Tensor:
    """The (sorted) ids of free-tensor entries that meet some head at several but not all of its
    dimensions: a table indexed by the place inside a head (a rotary embedding's frequencies:
    entry ``j`` meets dimensions ``j`` and ``j + d/2``), which every head reads alike. Such an
    entry joins no heads; an entry of a per-head table meets one id of its head (a score) or all
    of its dimensions (a per-head scale)."""
    free = [(src.base, src.base + src.size) for src in sh.sources if src.module is None]
    if not free or not sh.mixed:
        return torch.zeros(0, dtype=torch.long)
    coords: Dict[int, int] = {}
    for p in sh.products:
        for g, j in p.coords.items():
            coords.setdefault(g, j)
    if not coords:
        return torch.zeros(0, dtype=torch.long)
    ids = torch.tensor(sorted(coords), dtype=torch.long)
    places = torch.tensor([coords[g] for g in ids.tolist()], dtype=torch.long)
    starts = torch.tensor(sorted(src.base for src in sh.sources if src.module is not None), dtype=torch.long)
    size_at = {src.base: src.size for src in sh.sources if src.module is not None}
    lo, hi = (torch.tensor(v, dtype=torch.long) for v in zip(*free))

    def is_free(x):
        return ((x[:, None] >= lo) & (x[:, None] < hi)).any(1)
    met: Dict[Tuple[int, int], Set[int]] = {}   # (free entry, layer) → the head places it meets
    for pairs in sh.mixed:
        for f, c in ((pairs[0], pairs[1]), (pairs[1], pairs[0])):
            sel = _isin_sorted(c, ids) & is_free(f) & ~is_free(c)
            if not sel.any() or not len(starts):
                continue
            f, c = f[sel], c[sel]
            at = starts[(torch.searchsorted(starts, c, right=True) - 1).clamp_(min=0)]
            place = places[torch.searchsorted(ids, c)]
            for fi, ai, pi in torch.unique(torch.stack([f, at, place]), dim=1).t().tolist():
                met.setdefault((fi, ai), set()).add(pi)

    def width(at: int) -> int:   # the places inside a head that the layer at ``at`` holds
        a, b = torch.searchsorted(ids, torch.tensor([at, at + size_at.get(at, 0)])).tolist()
        return len(places[a:b].unique())
    widths: Dict[int, int] = {}
    out = sorted({f for (f, at), pl in met.items()
                  if 1 < len(pl) < widths.setdefault(at, width(at))})
    return torch.tensor(out, dtype=torch.long)


def _components(sh: Shadows) -> Tuple[_Union, Set[int]]:
    """The heads: ids joined by a batch slice of a product, or by a mix with such an id. Every
    id points to the smallest id of its component (connected components by label propagation,
    vectorised: a model has tens of thousands of channel ids)."""
    in_products: Set[int] = set()
    edges = []
    for p in sh.products:
        in_products |= p.ids
        for ids in p.slices:
            edges.append(torch.stack([ids[:1].expand(len(ids)), ids]))
    known = torch.tensor(sorted(in_products), dtype=torch.long)
    shared = _per_dimension_tables(sh)
    for pairs in sh.mixed:
        keep = _isin_sorted(pairs[0], known) | _isin_sorted(pairs[1], known)
        if len(shared):
            keep &= ~(_isin_sorted(pairs[0], shared) | _isin_sorted(pairs[1], shared))
        edges.append(pairs[:, keep])
    uf = _Flat()
    if not edges:
        return uf, in_products
    e = torch.cat(edges, dim=1)
    nodes = e.flatten().unique()
    a, b = torch.searchsorted(nodes, e[0]), torch.searchsorted(nodes, e[1])
    label = torch.arange(len(nodes))
    while True:
        low = torch.minimum(label[a], label[b])
        new = label.scatter_reduce(0, a, low, "amin").scatter_reduce(0, b, low, "amin")
        new = new[new]    # pointer jumping: a label points to its own label's label
        if torch.equal(new, label):
            break
        label = new
    uf.parent = dict(zip(nodes.tolist(), nodes[label].tolist()))
    return uf, in_products


def find_attention(sh: Shadows, model: nn.Module, graph, units: str, ignored: Set[nn.Module]) -> List[Attention]:
    """Every attention the shadow run saw, as :class:`Attention` records."""
    uf, in_products = _components(sh)
    heads: Dict[int, Set[int]] = {}
    for g in in_products:
        heads.setdefault(uf.find(g), set()).add(g)
    joined = torch.tensor(sorted(uf.parent), dtype=torch.long)
    # the layers and tables with an id in a head, and the readers' columns
    touched: Dict[int, Set[str]] = {}
    for s in sh.sources:
        ids = joined[(joined >= s.base) & (joined < s.base + s.size)].tolist()
        for r in {uf.find(g) for g in ids} & set(heads):
            touched.setdefault(r, set()).add(s.name)
    readers: Dict[int, Set[str]] = {}
    for name, ids in sh.inputs.items():
        for r in {uf.find(int(g)) for g in ids.tolist() if g >= 0} & set(heads):
            readers.setdefault(r, set()).add(name)
    # heads sharing a layer or a table form one attention
    link, layer_key = _Union(), {}
    for r in heads:
        for n in touched.get(r, set()) | readers.get(r, set()):
            link.join(r, layer_key.setdefault(n, -1 - len(layer_key)))
    attentions: Dict[int, List[int]] = {}
    for r in heads:
        attentions.setdefault(link.find(r), []).append(r)
    coords: Dict[int, int] = {}   # an id's place in its head (the first product's that places it)
    for p in sh.products:
        for g, j in p.coords.items():
            coords.setdefault(g, j)
    out = []
    for comps in attentions.values():
        comps = sorted(comps, key=lambda r: min(heads[r]))
        found = _one(sh, model, graph, units, ignored, uf, comps, touched, readers, coords)
        if found is not None:
            out.append(found)
    return out


def _one(sh, model, graph, units, ignored, uf, comps, touched, readers, coords) -> Optional[Attention]:
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    names = set().union(*(touched.get(r, set()) for r in comps))
    srcs = [s for s in sh.sources if s.name in names and s.module is not None]
    tables = [s for s in sh.sources if s.name in names and s.module is None]
    layer_names = sorted((s.name for s in srcs), key=order.__getitem__)
    reader_names = sorted(set().union(*(readers.get(r, set()) for r in comps)), key=order.__getitem__)
    if not layer_names:
        return None
    root = layer_names[0]
    mods = {n: model.get_submodule(n) for n in layer_names + reader_names}
    if any(m in ignored for m in mods.values()):
        return None
    layers = layer_names + [n for n in reader_names if n not in layer_names]

    def refuse(why):
        return Attention(root, layers, [], why)
    comp_index = {r: u for u, r in enumerate(comps)}
    for s in srcs:   # all of a layer's channels must be in this attention's heads
        outside = [c for c in range(s.size) if uf.find(s.base + c) not in comp_index]
        if outside:
            return refuse(f"channels {outside[:6]} of {s.name!r} reach the attention's matrix products only "
                          "partly (they are also used outside it)")
    if not reader_names:
        return refuse("the attention's output could not be followed to a layer (an op the shadow run does "
                      "not know sits between them)")
    for n in reader_names:
        bad = [c for c, g in enumerate(sh.inputs[n].tolist()) if g < 0 or uf.find(g) not in comp_index]
        if bad:
            return refuse(f"input columns {bad[:6]} of {n!r} do not come from the attention's heads")
    head_of = {s.name: _per_head(s, uf, comp_index) for s in tables}
    head_of = {n: v for n, v in head_of.items() if v is not None}   # tables shared by the heads stay
    mine = [p for p in sh.products if p.ids and uf.find(next(iter(p.ids))) in comp_index]
    slots = _query_slots(mine, uf, comps) if units == "query_heads" or (units == "heads" and len(comps) < 2) else None
    if isinstance(slots, str):
        return refuse(f"query heads: {slots}")
    if slots is not None:
        return _slot_attention(sh, model, graph, root, layers, srcs, reader_names, mods, slots, head_of, mine,
                               refuse)
    units = "heads" if units == "query_heads" else units   # not grouped: its query heads are its heads
    if units == "heads":
        def unit_of(g):
            return comp_index[uf.find(g)]
        size = len(comps)
    else:
        why = _no_head_dims(sh, srcs, coords) or (
            "scaled_dot_product_attention runs with its default scale 1/sqrt(head size), which a cut of "
            "head dimensions would change (pass scale= explicitly)" if any(p.default_scale for p in mine) else None) or (
            f"{next(iter(head_of))!r} holds one value per head, not head dimensions" if head_of else None)
        if why:
            return refuse(f"head_dims: {why}; use attention_units='heads'")
        unit_of = coords.__getitem__
        size = len({coords[g] for s in srcs for g in range(s.base, s.base + s.size)})
    if size < 2:
        return refuse("fewer than two prunable units")
    items = []
    for s in srcs:
        local = torch.arange(s.size)
        items += _items(s.name, s.module, "out", local, torch.tensor([unit_of(s.base + c) for c in range(s.size)]))
    for n in reader_names:
        cols = sh.inputs[n]
        items += _items(n, mods[n], "in", torch.arange(len(cols)), torch.tensor([unit_of(int(g)) for g in cols]))
    for name, found in head_of.items():
        if isinstance(found, str):
            return refuse(found)
        dim, unit = found
        owner, _, attr = name.rpartition(".")
        n = torch.arange(len(unit))
        items.append(SliceItem(owner, attr, dim, unit, n, None, "out", n))
    options = _bookkeeping(sh, mine, _counts(mine, coords, size, units))
    heads = {}
    for s in srcs:   # heads of the layer per unit, where its channels are head dimensions
        width = len({coords[g] for g in range(s.base, s.base + s.size) if g in coords})
        if width and s.size % width == 0 and (s.size // width) % len(comps) == 0:
            heads[s.name] = s.size // width // len(comps)
    attempts = [CoupledGroup(graph, 0, root, size, [dataclasses.replace(i) for i in items], True, ["attention"],
                             counters=list(c), heads=heads if units == "heads" else None) for c in options]
    return Attention(root, layers, attempts)


def _query_slots(mine, uf, comps):
    """Grouped-query attention by query heads: ``slots[u][s]``, the ids of the ``s``-th query
    head of component ``u`` (a key/value head and the query heads sharing it), where every
    component has the same number ``G ≥ 2`` of query heads; a unit ``s`` is then the ``s``-th
    query head of every key/value head, so each keeps ``G - 1`` and the ratio stays whole. The
    query heads are the distinct disjoint id sets on one side of a score product (rows of
    ``q``), the key head the one set on its other side (columns of ``kᵀ``), per component.
    ``None`` where the heads are not shared (one query head per key head); a reason where the
    sharing is uneven."""
    comp_index = {r: u for u, r in enumerate(comps)}
    found: Dict[int, List[torch.Tensor]] = {}
    for p in mine:
        for one, other in ((p.rows, p.cols), (p.cols, p.rows)):
            for u in range(len(comps)):
                if u in found:
                    continue
                here = [t for t in one if len(t) > 1 and comp_index.get(uf.find(int(t[0]))) == u]
                there = {tuple(t.tolist()) for t in other if len(t) > 1 and comp_index.get(uf.find(int(t[0]))) == u}
                ids = torch.cat(here) if here else torch.zeros(0, dtype=torch.long)
                if len(here) >= 2 and len(there) == 1 and len(ids.unique()) == len(ids):
                    found[u] = here
    if len(found) < len(comps):
        return None
    sizes = {len(v) for v in found.values()}
    if len(sizes) > 1:
        return f"the key/value heads are shared by different numbers of query heads ({sorted(sizes)})"
    return [found[u] for u in range(len(comps))]


def _slot_attention(sh, model, graph, root, layers, srcs, reader_names, mods, slots, head_of, mine, refuse):
    """The attention with query-head units (:func:`_query_slots`): unit ``s`` is the ``s``-th query
    head of every key/value head, its q channels and the output projection's columns that its
    weighted values reach (the ``s``-th of the key/value head's copies, in column order). Key
    and value channels stay."""
    if head_of:
        return refuse(f"query heads: {next(iter(head_of))!r} holds one value per head; use attention_units='heads'")
    G, K = len(slots[0]), len(slots)
    slot_of = {int(g): s for heads in slots for s, ids in enumerate(heads) for g in ids.tolist()}
    items, heads = [], {}
    for s in srcs:
        local = [c for c in range(s.size) if s.base + c in slot_of]
        if local:
            items += _items(s.name, s.module, "out", torch.tensor(local),
                            torch.tensor([slot_of[s.base + c] for c in local]))
            heads[s.name] = K
    for n in reader_names:
        cols = sh.inputs[n].tolist()
        seen: Dict[int, int] = {}
        unit = []
        for g in cols:   # the k-th copy of a value channel comes from the k-th query head sharing it
            unit.append(seen.get(g, 0))
            seen[g] = unit[-1] + 1
        if set(seen.values()) != {G}:
            return refuse(f"query heads: the columns of {n!r} do not hold each value channel once per query head")
        items += _items(n, mods[n], "in", torch.arange(len(cols)), torch.tensor(unit))
    width = len(slots[0][0])
    counts = {G: {1}}
    for value, per_unit in ((G * K, K), (G * K * width, K * width)):
        counts.setdefault(value, set()).add(per_unit)
    options = _bookkeeping(sh, mine, counts)
    first = _layer_counts(sh, model, mine, counts)
    if first:   # tried first: a ratio the forward may read on another path (decoding) goes stale otherwise
        options = [first] + [o for o in options if o != first]
    attempts = [CoupledGroup(graph, 0, root, G, [dataclasses.replace(i) for i in items], True, ["attention"],
                             counters=list(c), heads=heads) for c in options]
    return Attention(root, layers, attempts)


def _layer_counts(sh, model, products, counts) -> Tuple[Counter, ...]:
    """The updates of the attributes the hosts read that hold one of ``counts`` (with one
    per-unit decrement) and the same value in every module of the host's class: a count of the
    architecture (Hugging Face's ``num_key_value_groups``), not a layer's own number
    (``layer_idx`` differs between layers). Empty where the model has one such module."""
    out = []
    for h in sorted({p.host for p in products if p.host is not None}):
        cls = type(model.get_submodule(h))
        peers = [n for n in sh.reads if n != h and type(model.get_submodule(n)) is cls]
        for attr, value in sorted(sh.reads.get(h, {}).items()):
            per = counts.get(value, set())
            if len(per) == 1 and peers and all(sh.reads[n].get(attr) == value for n in peers):
                out.append(Counter(h, attr, next(iter(per))))
    return tuple(out)


def _per_head(s, uf, comp_index):
    """``(dim, unit per index)`` of a free tensor whose entries belong to the heads along one
    dimension (a relative position bias table ``[buckets, heads]``, a per-head scale); ``None``
    when it is not split between heads (a mask or table they all share); a reason otherwise."""
    ids = torch.arange(s.base, s.base + s.size)
    unit = torch.tensor([comp_index.get(uf.find(g), -1) if g in uf.parent else -1 for g in ids.tolist()])
    unit = unit.view(s.shape)
    if len(unit[unit >= 0].unique()) < 2:
        return None
    for dim in range(unit.dim()):
        rows = unit.movedim(dim, 0).reshape(unit.shape[dim], -1)
        if (rows == rows[:, :1]).all() and (rows[:, 0] >= 0).all():
            return dim, rows[:, 0].clone()
    return (f"{s.name!r} is a per-head table whose entries are not split between the heads along one "
            "dimension; it cannot be cut with them")


def _items(name, module, role, local, unit) -> List[SliceItem]:
    out = []
    for s in get_handler(module).slices(module, role):
        pos, index = s.index(local)
        owner, _, attr = s.attr.rpartition(".")
        owner = f"{name}.{owner}" if owner else name
        out.append(SliceItem(owner, attr, s.dim, unit[pos], index, name, role, local[pos]))
    return out


def _no_head_dims(sh, srcs, coords) -> Optional[str]:
    missing = [s.name for s in srcs if any(s.base + c not in coords for c in range(s.size))]
    if missing:
        return f"{missing[0]!r} holds one value per head (a table of one entry per head), not head dimensions"
    widths = {s.name: len({coords[s.base + c] for c in range(s.size)}) for s in srcs}
    if len(set(widths.values())) > 1:
        return f"the heads of {', '.join(f'{n!r} ({w})' for n, w in widths.items())} differ in size"
    ours = {g for s in srcs for g in range(s.base, s.base + s.size)}
    for pairs in sh.mixed:
        for a, b in pairs.t().tolist():
            if a in ours and b in ours and coords.get(a) != coords.get(b):
                return (f"dimensions {coords.get(a)} and {coords.get(b)} of a head are mixed (a rotary "
                        "embedding pairs them), so only whole heads can go")
    return None


def _counts(products, coords, size, units) -> Dict[int, Set[int]]:
    """value → per-unit decrements it could stand for, read from the products' operands: their
    channels (``H·d``) and heads (``H``) per layer."""
    counts: Dict[int, Set[int]] = {}
    for p in products:
        for ids in (p.left, p.right):
            ids = {g for g in ids if g in coords}
            width = len({coords[g] for g in ids})
            if not ids or not width:
                continue
            nheads = len(ids) // width
            if units == "heads":
                for value in (nheads, len(ids)):
                    if value % size == 0:
                        counts.setdefault(value, set()).add(value // size)
            else:
                counts.setdefault(width, set()).add(1)
                counts.setdefault(len(ids), set()).add(nheads)
    return counts


def _bookkeeping(sh, products, counts) -> List[Tuple[Counter, ...]]:
    """Sets of attribute updates to try, smallest first: each attribute the hosts read whose
    value is one of ``counts`` (value → per-unit decrements it could stand for)."""
    hosts = sorted({p.host for p in products if p.host is not None})
    candidates: List[Tuple[Counter, ...]] = []   # one update of an attribute, in every host reading it
    for attr in sorted({a for h in hosts for a in sh.reads.get(h, {})}):
        values = {sh.reads[h][attr] for h in hosts if attr in sh.reads.get(h, {})}
        if len(values) != 1:
            continue
        for per_unit in sorted(counts.get(values.pop(), ())):
            candidates.append(tuple(Counter(h, attr, per_unit) for h in hosts if attr in sh.reads.get(h, {})))
    options: List[Tuple[Counter, ...]] = []
    for k in range(len(candidates) + 1):
        for combo in itertools.combinations(candidates, k):
            keys = [c[0].attr for c in combo]
            if len(set(keys)) == len(keys):
                options.append(tuple(c for cs in combo for c in cs))
            if len(options) >= MAX_ATTEMPTS:
                return options
    return options
