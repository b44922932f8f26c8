"""Group assembly: a backend group (every coupled tensor slice of one root layer's channels),
read through our handlers, becomes a :class:`CoupledGroup` of units, or is refused with a reason.

A *unit* is a set of root channels that can only go together: channels that reach the same
local channel somewhere, that a grouped layer ties by a period or block, or that meet after a
split (a GLU's halves).
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn
from torch_pruning import ops as tp_ops

from ..handlers import get_handler
from ..handlers.base import TensorSlice
from .backend import Backend
from .graph import ChannelGraph, SkippedGroup
from .group import CoupledGroup, SliceItem
from .index_maps import channel_dim
from .ops import PRODUCT_OPS, REDUCTIONS, op_name, reduced_dims, saved_dim

__all__ = ["Refused", "make_group", "internal_groups", "merge_overlapping", "merge_tied",
           "shared_channel_merges"]

#: backend op types that only route channels (their maps are the backend's or ours)
_ROUTING = (tp_ops.OPTYPE.CONCAT, tp_ops.OPTYPE.SPLIT, tp_ops.OPTYPE.RESHAPE,
            tp_ops.OPTYPE.UNBIND, tp_ops.OPTYPE.EXPAND, tp_ops.OPTYPE.SLICE)


class Refused(Exception):
    """A group that will not be returned; the message is the reason shown to the user."""


class Tied(Refused):
    """A group refused only because a tensor it cuts is tied to a layer it does not cut; ``group``
    is the group as built, which :func:`merge_tied` may join with the groups on the other side."""

    def __init__(self, reason: str, group: CoupledGroup):
        super().__init__(reason)
        self.group = group


@dataclasses.dataclass
class _Entry:
    """One backend dependency seen through our handler: a layer's channels in one role."""

    module: Optional[str]        # layer refreshed after a cut (None for a free parameter)
    owner: str                   # module owning the tensors
    role: str                    # "out" | "in"
    idxs: List[int]              # layer-local channel numbers
    root_idxs: List[int]         # the root channel each one is coupled to
    slices: List[TensorSlice]
    period: Optional[int]        # channels equal modulo this go together
    block: Optional[int] = None  # channels with equal c // block go together


@dataclasses.dataclass
class _Reading:
    """What the items of one backend group amount to, before units are formed."""

    entries: List[_Entry] = dataclasses.field(default_factory=list)
    ops: List[str] = dataclasses.field(default_factory=list)
    pinned: Set[int] = dataclasses.field(default_factory=set)   # root channels no tensor owns
    exact: bool = True


def shared_channel_merges(bk: Backend, module: nn.Module, tpg) -> List[Tuple[int, int]]:
    """Root channels that meet in one channel after a split (a GLU's two halves multiplied).

    The backend merges the indices of a group by position and keeps one root per index, so this
    is found by following each root channel alone, only for groups that pass a split."""
    kinds = (tp_ops.OPTYPE.SPLIT, tp_ops.OPTYPE.UNBIND, tp_ops.OPTYPE.SLICE)
    if not any(bk.kind(it.dep.target) in kinds and not _spatial_slice(bk, it.dep.target) for it in tpg):
        return []
    dg, fn = bk.dg, tpg[0].dep.handler
    owner: Dict[Tuple[int, bool, int], int] = {}
    merges = []
    for r in sorted(set(tpg[0].root_idxs)):
        for it in dg.get_pruning_group(module, fn, [r]):
            target = it.dep.target.module
            if not isinstance(target, nn.Parameter) and get_handler(target) is None:
                continue  # only channels that a tensor owns (op nodes may map spatial slices)
            for i in it.idxs:
                key = (id(it.dep.target), dg.is_out_channel_pruning_fn(it.dep.handler), i)
                first = owner.setdefault(key, r)
                if first != r:
                    merges.append((first, r))
    return merges


def _spatial_slice(bk: Backend, node) -> bool:
    """A slice along a dimension other than the channels (the option-A shortcut's ``x[:, :, ::2]``):
    it cannot bring two channels together."""
    fn = node.grad_fn
    shape = bk.shape(node.inputs[0]) if node.inputs else None
    if shape is None and fn is not None:   # a slice of a slice (``x[:, :, ::2, ::2]``): autograd saved it
        shape = getattr(fn, "_saved_self_sym_sizes", None)
    if fn is None or op_name(fn) != "Slice" or shape is None or not hasattr(fn, "_saved_dim"):
        return False
    ch = channel_dim(node.inputs[0], len(shape))
    return ch is not None and saved_dim(fn._saved_dim, len(shape)) != ch


def _read_op(bk: Backend, node, idxs, root_idxs, out: _Reading) -> None:
    """A non-parametric node of the group: routing, owned by us, or element-wise."""
    mod, facts = node.module, bk.get(node)
    if node.type in _ROUTING:
        out.ops.append(type(mod).__name__.strip("_").replace("Op", ""))
        return
    if facts.refuse:
        raise Refused(facts.refuse)
    if facts.backend_error:
        raise Refused(facts.backend_error)
    if facts.owned:
        if facts.period:   # a view/chunk into equal parts
            out.entries.append(_Entry(None, "", "out", idxs, root_idxs, [], facts.period))
        out.ops.append(type(mod).__name__.strip("_").split("Op")[0].split("_")[0])
        return
    if _layer_product(node):   # the layer's own matrix product (a Linear on 3-D inputs folds them)
        return
    out.ops.append(op_name(node.grad_fn) if node.grad_fn is not None else "Unknown")
    if out.ops[-1] in REDUCTIONS and _reduces_channels(node):
        out.exact = False
    span = facts.pad_span
    if span is not None:  # padded channels belong to no tensor: not prunable here
        out.pinned.update(r for i, r in zip(idxs, root_idxs) if not span[0] <= i < span[1])


def _layer_product(node) -> bool:
    """Is this matrix product the inside of the one layer it feeds? ``F.linear`` on a 3-D input
    runs as view → ``addmm`` (or ``mm``) with the weight → view, and the backend sees the layer
    at the last view: the product is the layer's own when its parameter operand (through a
    transpose) is that layer's weight. A product with any other parameter is not (a functional
    linear inside a module the backend does not know as a layer)."""
    fn = node.grad_fn
    if fn is None or op_name(fn) not in ("Addmm", "Mm") or len(node.outputs) != 1:
        return False
    layer = node.outputs[0].module
    if not isinstance(layer, nn.Module):
        return False
    owned = {id(p) for p in layer.parameters(recurse=False)}
    todo = [f for f, _ in fn.next_functions if f is not None]
    while todo:
        f = todo.pop()
        if hasattr(f, "variable"):
            if id(f.variable) in owned:
                return True
        elif op_name(f) in ("T", "Transpose", "Alias"):
            todo += [g for g, _ in f.next_functions if g is not None]
    return False


def _reduces_channels(node) -> bool:
    """Does this reduction combine the channel dimension (a hand-written RMSNorm's mean of
    squares)? An unknown dimension counts as yes: the group is then checked by shape."""
    found = reduced_dims(node.grad_fn)
    if found is None or not node.inputs:
        return True
    dims, rank = found
    ch = channel_dim(node.inputs[0], rank)
    return ch is None or ch in dims


def _read_layer(bk: Backend, item, ignored: Set[nn.Module], units: str, out: _Reading) -> None:
    """A layer of the group, through its handler."""
    dep, mod = item.dep, item.dep.target.module
    name = bk.dg._module2name.get(mod, type(mod).__name__)
    handler = get_handler(mod)
    if handler is None:
        raise Refused(f"no handler for {name!r} ({type(mod).__name__}); register one with "
                      "@etp_graph.handlers.register_handler or pass ignored_layers=[...]")
    role = "out" if bk.dg.is_out_channel_pruning_fn(dep.handler) else "in"
    if role == "out" and mod in ignored:
        raise Refused(f"it couples the output channels of ignored layer {name!r}")
    why = handler.unsupported(mod, role, units)
    if why:
        raise Refused(f"{name!r}: {why}")
    out.exact &= handler.exact_when_masked
    out.entries.append(_Entry(name, name, role, list(item.idxs), list(item.root_idxs), handler.slices(mod, role, units),
                              handler.period(mod, role, units), handler.block(mod, role, units)))


def _read(bk: Backend, tpg, ignored: Set[nn.Module], units: str) -> _Reading:
    param_names = {id(p): n for p, n in bk.dg._param_to_name.items()}
    out = _Reading()
    for item in tpg:
        node, mod = item.dep.target, item.dep.target.module
        idxs, root_idxs = list(item.idxs), list(item.root_idxs)
        if isinstance(mod, nn.Parameter):
            owner, _, attr = param_names[id(mod)].rpartition(".")
            dim = node.pruning_dim % mod.dim()
            out.entries.append(_Entry(None, owner, "out", idxs, root_idxs, [TensorSlice(attr, dim)], None))
        elif node.type == tp_ops.OPTYPE.OUTPUT:
            raise Refused("its channels are a model output; pruning would change the output's shape "
                          "(add the producing layer to ignored_layers)")
        elif node.type in _ROUTING or isinstance(mod, tp_ops._ElementWiseOp) or bk.get(node).owned \
                or bk.get(node).refuse or bk.get(node).backend_error:
            _read_op(bk, node, idxs, root_idxs, out)
        else:
            _read_layer(bk, item, ignored, units, out)
    return out


def make_group(bk: Backend, tpg, root_name: str, ignored: Set[nn.Module], gid: int, graph: ChannelGraph,
               merges: Sequence[Tuple[int, int]] = (), units: str = "heads") -> CoupledGroup:
    """The :class:`CoupledGroup` of backend group ``tpg`` rooted at ``root_name``; raises
    :class:`Refused` with the reason when it cannot be pruned exactly. ``units``: the unit kind
    of head-structured layers (``"heads"`` or ``"head_dims"``), passed to their handlers."""
    r = _read(bk, tpg, ignored, units)
    products = sorted(set(r.ops) & PRODUCT_OPS)
    if products:
        parent = root_name.rpartition(".")[0]
        where = (f"{parent!r} ({type(bk.dg.model.get_submodule(parent)).__name__})" if parent
                 else "the model's forward")
        raise Refused(f"no handler for {where}: the channels of {root_name!r} meet other channels in a "
                      f"matrix product ({', '.join(products)}), as in an attention the engine does not "
                      "know; register a handler for it (see etp_graph.handlers.attention) or pass "
                      "ignored_layers=[...]")
    return _assemble(r, root_name, gid, graph, merges)


def _units(entries: List[_Entry], roots: List[int], merges) -> List[List[int]]:
    """Root channels partitioned into units (union-find), ordered by their smallest channel."""
    parent = {r: r for r in roots}

    def find(r):
        while parent[r] != r:
            parent[r] = parent[parent[r]]
            r = parent[r]
        return r
    for a, b in merges:
        if a in parent and b in parent:
            parent[find(a)] = find(b)
    for e in entries:  # root channels that reach the same local channel can only go together
        if not e.period and not e.block and len(set(e.idxs)) == len(e.idxs):
            continue   # every local channel from one root channel: nothing to join
        owner_of: Dict[int, int] = {}
        for i, r in zip(e.idxs, e.root_idxs):
            if r in parent:
                parent[find(r)] = find(owner_of.setdefault(i, r))
        for key in ([lambda i, p=e.period: i % p] if e.period else []) + (
                [lambda i, b=e.block: i // b] if e.block else []):
            first: Dict[int, int] = {}
            for i, r in zip(e.idxs, e.root_idxs):
                if r in parent:
                    j = first.setdefault(key(i), r)
                    parent[find(r)] = find(j)
    classes: Dict[int, List[int]] = {}
    for r in roots:
        classes.setdefault(find(r), []).append(r)
    return sorted(classes.values(), key=min)


def _collapse(r: _Reading, roots: List[int], merges) -> str:
    """Why the root channels of ``r`` form a single unit: the first layer role that joins them."""
    if len(roots) < 2:
        return "one root channel is owned by a tensor"
    if len(_units([], roots, merges)) < 2:
        return "the layers that share its channels join them all"
    for k, e in enumerate(r.entries):
        if len(_units(r.entries[: k + 1], roots, merges)) < 2:
            if e.module is None and not e.slices and e.period:
                how = (f"a reshape or chunk on the way splits the channels into parts of {e.period} and a "
                       "unit is one position in every part" + (", so every channel goes with every other"
                                                               if e.period == 1 else ""))
            elif e.period:
                how = f"in {e.owner!r} ({e.role}) channels equal modulo {e.period} go together"
            elif e.block:
                how = f"in {e.owner!r} ({e.role}) channels go in blocks of {e.block}"
            else:
                how = f"its {len(roots)} channels reach {len(set(e.idxs))} channel(s) of {e.owner!r} ({e.role})"
            return f"{how} (the ops on the way: {', '.join(dict.fromkeys(r.ops)) or 'none'})"
    return "its channels go together"


def _assemble(r: _Reading, root_name: str, gid: int, graph: ChannelGraph, merges) -> CoupledGroup:
    roots = sorted({x for e in r.entries for x in e.root_idxs} - r.pinned)
    if not roots:
        raise Refused("no unit of the group is owned by a tensor")
    ordered = _units(r.entries, roots, merges)
    unit_of = {x: u for u, cls in enumerate(ordered) for x in cls}
    if len(ordered) < 2:
        raise Refused(f"fewer than two prunable units: {_collapse(r, roots, merges)}")
    items: List[SliceItem] = []
    for e in r.entries:
        keep = [k for k, x in enumerate(e.root_idxs) if x in unit_of]
        if not keep:
            continue
        local = torch.tensor([e.idxs[k] for k in keep], dtype=torch.long)
        units = torch.tensor([unit_of[e.root_idxs[k]] for k in keep], dtype=torch.long)
        for s in e.slices:
            pos, index = s.index(local)
            owner, attr = owner_attr(e.owner, s.attr)
            items.append(SliceItem(owner, attr, s.dim, units[pos], index, e.module, e.role, local[pos]))
    if getattr(graph, "_ties", None) is None:
        graph._ties = tie_index(graph.model)
    items += mirrored_ties(items, graph._ties, getattr(graph, "_called", None))
    group = CoupledGroup(graph, gid, root_name, len(ordered), items, r.exact, sorted(set(r.ops)))
    untied = tied_outside(graph.model, items, graph._ties)
    if untied:
        raise Tied(untied, group)
    return group


def merge_tied(groups: Sequence[CoupledGroup], graph: ChannelGraph) -> Tuple[Optional[CoupledGroup], str]:
    """One group of ``groups`` (each refused for a tie) joined where they cut one tensor: the
    widths an encoder and a decoder share through tied embeddings are one width. Units of
    different groups that own the same index of a tied tensor along the same dimension are one
    unit. Returns ``(group, "")``, or ``(None, reason)`` when the join still leaves a tie outside."""
    return _merge(groups, graph, tied_only=True)


def merge_overlapping(groups: Sequence[CoupledGroup], graph: ChannelGraph) -> Tuple[Optional[CoupledGroup], str]:
    """One group of ``groups``, which cut the same index of one tensor dimension: a grouped layer
    reading a concat gives each input slot of its filters one channel of every branch, so those
    channels (of different groups) go together. Units owning the same index of any tensor along
    the same dimension are one unit; items of one tensor dimension become one item."""
    return _merge(groups, graph, tied_only=False)


def _merge(groups: Sequence[CoupledGroup], graph: ChannelGraph, tied_only: bool) -> Tuple[Optional[CoupledGroup], str]:
    if getattr(graph, "_ties", None) is None:
        graph._ties = tie_index(graph.model)
    names, tensor_of, _ = graph._ties
    parent: Dict[Tuple[int, int], Tuple[int, int]] = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x
    owner_of: Dict[Tuple[Any, int, int], Tuple[int, int]] = {}   # (tensor, dim, index) → (group, unit)
    for k, g in enumerate(groups):
        for u in range(g.size):
            find((k, u))
        for it in g.items:
            t = tensor_of.get(item_name(it))
            if tied_only and (t is None or len(names[id(t)]) < 2):
                continue
            key = tensor_key(it, tensor_of)
            for u, i in zip(it.unit.tolist(), it.index.tolist()):
                other = owner_of.setdefault((key, it.dim, i), (k, u))
                a, b = find(other), find((k, u))
                if a != b:
                    parent[max(a, b)] = min(a, b)
    classes: Dict[Tuple[int, int], List[Tuple[int, int]]] = {}
    for x in list(parent):
        classes.setdefault(find(x), []).append(x)
    ordered = sorted(classes.values(), key=min)
    if len(ordered) < 2:
        return None, "fewer than two prunable units after joining the groups"
    unit_of = {x: n for n, cls in enumerate(ordered) for x in cls}
    items: List[SliceItem] = []
    for k, g in enumerate(groups):
        remap = torch.tensor([unit_of[(k, u)] for u in range(g.size)], dtype=torch.long)
        items += [dataclasses.replace(it, unit=remap[it.unit], pairs=None) for it in g.items]
    if not tied_only:   # one item per tensor dimension and layer role (its pairs from every group)
        joined: Dict[Tuple[str, str, int, Optional[str], str], SliceItem] = {}
        for it in items:
            key = (it.owner, it.attr, it.dim, it.module, it.role)
            if key in joined:
                was = joined[key]
                both = torch.unique(torch.stack([torch.cat([was.unit, it.unit]), torch.cat([was.index, it.index]),
                                                 torch.cat([was.channel, it.channel])]), dim=1)
                joined[key] = dataclasses.replace(was, unit=both[0], index=both[1], channel=both[2], pairs=None)
            else:
                joined[key] = it
        items = list(joined.values())
    items += mirrored_ties(items, graph._ties, getattr(graph, "_called", None))
    first = groups[0]
    merged = CoupledGroup(graph, first.id, first.root, len(ordered), items, all(g.exact for g in groups),
                          sorted(set().union(*(g.ops for g in groups))))
    untied = tied_outside(graph.model, items, graph._ties)
    if untied:
        return None, untied
    return merged, ""


def item_name(it: SliceItem) -> str:
    """The dotted name of the tensor an item cuts (``"layer.weight"``)."""
    return f"{it.owner}.{it.attr}" if it.owner else it.attr


def tensor_key(it: SliceItem, tensor_of: Dict[str, Any]) -> Any:
    """One key per tensor an item cuts, whatever name it is reached under (tied tensors are one)."""
    t = tensor_of.get(item_name(it))
    return id(t) if t is not None else item_name(it)


def mirrored_ties(items: Sequence[SliceItem], index, called: Optional[Set[str]]) -> List[SliceItem]:
    """Items for the other places of a tied tensor the group cuts, where that place is a layer
    of the same kind as the one the group reaches that the forward never calls (``called``:
    the names of the modules it calls; T5's ``shared`` embedding, the alias of
    ``encoder.embed_tokens``): cut like the place the group has, so the tie holds and that
    layer's bookkeeping follows."""
    if called is None:
        return []
    names, tensor_of, module_of = index
    have = {item_name(i) for i in items}
    extra = []
    for it in items:
        key = item_name(it)
        t = tensor_of.get(key)
        if t is None or len(names[id(t)]) < 2 or it.module != it.owner:
            continue
        for other in names[id(t)]:
            owner, _, attr = other.rpartition(".")
            if other in have or attr != it.attr or owner in called or \
                    type(module_of.get(owner)) is not type(module_of.get(it.owner)):
                continue
            extra.append(dataclasses.replace(it, owner=owner, module=owner, pairs=None))
    uniq: Dict[Tuple[str, str, int, str], SliceItem] = {}
    for e in extra:
        uniq.setdefault((e.owner, e.attr, e.dim, e.role), e)
    return list(uniq.values())


def tied_outside(model: nn.Module, items: Sequence[SliceItem], index=None) -> Optional[str]:
    """A reason when a tensor the group cuts is shared (tied) with a module the group does not
    cut: cutting it would untie them or leave the other module at the old width. ``index``:
    :func:`tie_index` of the model, when the caller keeps one."""
    names, tensor_of, module_of = index if index is not None else tie_index(model)

    def place(name: str) -> Tuple[int, str]:   # one module reached under two names is one place
        owner, _, attr = name.rpartition(".")
        return id(module_of[owner]), attr
    cut = {f"{i.owner}.{i.attr}" if i.owner else i.attr for i in items}
    cut_places = {place(n) for n in cut if n in tensor_of}
    for n in sorted(cut):
        if n not in tensor_of or len(names[id(tensor_of[n])]) < 2:
            continue
        outside = [m for m in names[id(tensor_of[n])] if place(m) not in cut_places]
        if outside:
            return (f"{n!r} is tied to {', '.join(map(repr, outside))}, which the group does not cut "
                    "(the tie couples widths the trace sees as separate); untie them or prune the other side first")
    return None


def tie_index(model: nn.Module):
    """``(tensor id → every name of it, name → tensor, module name → module)``."""
    names: Dict[int, List[str]] = {}
    tensor_of: Dict[str, Any] = {}
    for n, t in itertools.chain(model.named_parameters(remove_duplicate=False),
                                model.named_buffers(remove_duplicate=False)):
        names.setdefault(id(t), []).append(n)
        tensor_of[n] = t
    return names, tensor_of, dict(model.named_modules(remove_duplicate=False))


def owner_attr(owner: str, attr: str) -> Tuple[str, str]:
    """``("att", "out_proj.weight")`` → ``("att.out_proj", "weight")``."""
    prefix, _, attr = attr.rpartition(".")
    if prefix:
        owner = f"{owner}.{prefix}" if owner else prefix
    return owner, attr


def internal_groups(name: str, m: nn.Module, gid: int, graph: ChannelGraph, units: str = "heads") -> List[Any]:
    """Groups wholly inside ``m`` (attention heads), or ``SkippedGroup``s with the handler's reason;
    the caller renumbers ``id`` as it keeps them."""
    out: List[Any] = []
    for spec in get_handler(m).internal_groups(m, units):
        if spec.reason:
            out.append(SkippedGroup(name, f"{spec.label} of {name!r}: {spec.reason}"))
            continue
        if spec.size < 2:
            out.append(SkippedGroup(name, f"{spec.label} of {name!r}: fewer than two prunable units"))
            continue
        units = torch.arange(spec.size)
        items = []
        for s in spec.slices:
            pos, index = s.index(units)
            owner, attr = owner_attr(name, s.attr)
            items.append(SliceItem(owner, attr, s.dim, units[pos], index, name, spec.label, units[pos]))
        out.append(CoupledGroup(graph, gid, name, spec.size, items, True, ["attention"]))
    return out
