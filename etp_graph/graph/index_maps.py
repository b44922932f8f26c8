"""Index maps the tracer owns: which channel of one tensor is which channel of the next, through
pads, reshapes, concats and splits, from the recorded shapes (the backend infers them and can be
wrong). The passes run in the order of :data:`PASSES`; see :func:`map_indices`.

A map rewrites the two slots of a backend edge; a node whose channel map is unknown gets a
``refuse`` reason in its :class:`NodeFacts`, so no group passes through it unnoticed.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Optional, Sequence, Set, Tuple

from torch import nn
from torch_pruning import _helpers as tp_helpers
from torch_pruning import ops as tp_ops
from torch_pruning.dependency.index_mapping import _ConcatIndexMapping, _FlattenIndexMapping

from ..handlers import get_handler
from .backend import Backend
from .ops import COPIES, DIM_MOVES, PAD, op_name, saved_dim

__all__ = ["PASSES", "map_indices", "channel_dim"]


class _PermuteIndexMapping:
    """Channel ``i`` goes to position ``perm[i]`` (a channel shuffle)."""

    def __init__(self, perm: Sequence[int]):
        self.perm = list(perm)

    def __call__(self, idxs):
        return [tp_helpers._HybridIndex(idx=self.perm[i.idx], root_idx=i.root_idx) for i in idxs]


class _SpanIndexMapping:
    """A consumer of the split parts at ``spans`` (``[start, end)`` of the split input's channels).

    A consumer of several parts (``a * b`` of a GLU's halves) maps its channel ``j`` to ``j`` in
    every part it reads, so channels that meet there are coupled."""

    def __init__(self, spans: Sequence[Tuple[int, int]], to_input: bool):
        self.spans, self.to_input = list(spans), to_input

    def __call__(self, idxs):
        H = tp_helpers._HybridIndex
        if self.to_input:
            out = {H(idx=i.idx + s, root_idx=i.root_idx) for i in idxs for s, e in self.spans if i.idx + s < e}
        else:
            out = {H(idx=i.idx - s, root_idx=i.root_idx) for i in idxs for s, e in self.spans if s <= i.idx < e}
        # sorted and unique: the backend stops walking a cycle only when a list repeats exactly
        return sorted(out, key=lambda h: (h.idx, -1 if h.root_idx is None else h.root_idx))


def _set_maps(node, inp, to_input, from_input) -> None:
    """Replace both of the backend's map slots on the edges between ``node`` and ``inp``."""
    for dep in node.dependencies:
        if dep.target is inp:
            dep.index_mapping[:] = [to_input, None]
    for dep in inp.dependencies:
        if dep.target is node:
            dep.index_mapping[:] = [from_input, None]


def channel_dim(node, rank: int) -> Optional[int]:
    """The channel dimension of ``node``'s output: 1, except for 3-D token tensors ``(B, L, C)``.

    For a 3-D tensor it is decided by the nearest layer upstream (a Conv1d/BatchNorm1d writes
    ``(B, C, L)``, a Linear/LayerNorm ``(B, L, C)``); ``None`` when a dimension move or a reshape
    the backend still maps comes first and the answer is unknown."""
    if rank != 3:
        return 1 if rank >= 2 else None
    for h in _layers_upstream(node, lambda n: n is node or not (n.type == tp_ops.OPTYPE.RESHAPE or (
            n.grad_fn is not None and op_name(n.grad_fn) in DIM_MOVES))):
        return None if h is None else (2 if h.channel_last else 1)
    return None


def _channel_dim(bk: Backend, node, rank: int) -> Optional[int]:
    """:func:`channel_dim`, and the last dim of a channel-last map ``(B, H, W, C)`` (Swin's
    windows and patch merging, :func:`_channel_last`)."""
    if rank >= 4 and _channel_last(bk, node):
        return rank - 1
    return channel_dim(node, rank)


def _layers_upstream(node, passes: Callable[[Any], bool]) -> Iterator[Any]:
    """The handlers of the nearest layers upstream of ``node`` (depth first, each walk stopping
    at a layer), and ``None`` for each node on the way that ``passes`` does not let through."""
    seen, stack = {node}, [node]
    while stack:
        n = stack.pop()
        m = n.module
        h = get_handler(m) if isinstance(m, nn.Module) else None
        if h is not None or not passes(n):
            yield h
            continue
        for p in n.inputs:
            if p not in seen:
                seen.add(p)
                stack.append(p)


# ---------------------------------------------------------------------------------- pads
def _padded(pad: Sequence[int], ndim: int, dim: int) -> Tuple[int, int]:
    """(front, back) padding of ``dim`` for an ``F.pad`` spec (pairs from the last dim back)."""
    k = ndim - 1 - dim
    return (pad[2 * k], pad[2 * k + 1]) if 0 <= k < len(pad) // 2 else (0, 0)


def map_channel_pads(bk: Backend) -> None:
    """Give each ``F.pad`` on the channel dimension the offset map of a concat with zeros.

    The channel dimension is the tensor's own (:func:`_channel_dim`: 1, or the last of a 3-D
    token tensor or of a channel-last map), so a pad along a sequence (MobileBERT's trigram shift) leaves channels where
    they are; where that dimension is unknown and the pad could be on it, the node is refused."""
    for node in bk.dg.module2node.values():
        if node.type != tp_ops.OPTYPE.ELEMENTWISE or node.grad_fn is None or op_name(node.grad_fn) != PAD:
            continue
        pad = tuple(node.grad_fn._saved_pad)
        if len(node.inputs) != 1:
            continue
        inp = node.inputs[0]
        shape = bk.shape(node)
        ndim = len(shape or ())
        if ndim < 2:
            continue
        cdim = _channel_dim(bk, node, ndim)
        if cdim is None:
            if any(_padded(pad, ndim, d) != (0, 0) for d in (1, 2)):
                bk.facts(node).refuse = (f"F.pad {list(pad)} of a {ndim}-D tensor whose channel dimension "
                                         "is unknown (a dimension move or reshape comes first): which "
                                         "dimension it pads, and so the channel map, is unknown")
            continue
        front, back = _padded(pad, ndim, cdim)
        if (front, back) == (0, 0):
            continue
        width = shape[cdim] - front - back   # from the recorded output shape, never inferred
        bk.facts(node).pad_span = (front, front + width)
        for dep in node.dependencies:
            if dep.target is inp:
                dep.index_mapping[0] = _ConcatIndexMapping([front, front + width], reverse=True)
        for dep in inp.dependencies:
            if dep.target is node:
                dep.index_mapping[0] = _ConcatIndexMapping([front, front + width], reverse=False)


def _slice_input_rank(bk: Backend, node) -> int:
    fn = node.grad_fn
    if hasattr(fn, "_saved_self_sym_sizes"):
        return len(fn._saved_self_sym_sizes)
    return len(bk.shape(node.inputs[0]) or ()) if node.inputs else 0


def map_slices(bk: Backend) -> None:
    """A slice along any dimension but the channels leaves them where they are.

    The backend takes dim 1 of a 4-D tensor (dim 2 of a 3-D one) for the channels and maps any
    slice of a 2-D tensor as a channel slice; a channel-last map's ``x[:, 0::2]`` (Swin's patch
    merging) slices its height, and a ``(B, C, L)`` sequence's ``x[:, :, :-k]`` (a causal
    convolution's trim) its time. Where the input's channel dimension is unknown, the backend's
    map stays (and the groups through it are verified like any other)."""
    for node in list(bk.dg.module2node.values()):
        if node.type != tp_ops.OPTYPE.SLICE or node.grad_fn is None or len(node.inputs) != 1:
            continue
        fn = node.grad_fn
        rank = _slice_input_rank(bk, node)
        if rank < 2 or not hasattr(fn, "_saved_dim"):
            continue
        cdim = _channel_dim(bk, node.inputs[0], rank)
        if cdim is None or saved_dim(fn._saved_dim, rank) == cdim:
            continue
        bk.own(node)
        _set_maps(node, node.inputs[0], None, None)


# ------------------------------------------------------------------------------ reshapes
def _moves(grad_fn) -> Optional[Tuple[Any, ...]]:
    """``("swap", a, b)`` for a transpose, the dims of a permute, or ``None`` for other ops."""
    name = op_name(grad_fn)
    if name == "Transpose":
        return ("swap", int(grad_fn._saved_dim0), int(grad_fn._saved_dim1))
    if name == "Permute":
        return tuple(int(d) for d in grad_fn._saved_dims)
    return None


def _shuffle_source(bk: Backend, node):
    """For a reshape merging dims 1 and 2 back into channels: the channel-splitting view it undoes
    and whether the two dims were swapped in between (``None`` when there is no such view)."""
    swapped, n = False, node.inputs[0] if len(node.inputs) == 1 else None
    while n is not None:
        if bk.get(n).split_view is not None:
            return n, swapped
        if n.grad_fn is None or len(n.inputs) != 1:
            return None
        mv = _moves(n.grad_fn)
        if mv is not None:
            rank = len(bk.shape(n) or ())
            if not rank:
                return None
            if mv[0] == "swap":
                if {saved_dim(mv[1], rank), saved_dim(mv[2], rank)} != {1, 2}:
                    return None
            elif [saved_dim(d, rank) for d in mv] != [0, 2, 1] + list(range(3, rank)):
                return None
            swapped = not swapped
        elif op_name(n.grad_fn) not in COPIES:
            return None
        n = n.inputs[0]
    return None


def _channel_last(bk: Backend, node) -> bool:
    """Are ``node``'s channels its last dimension? The nearest layer upstream writes them last
    (a Linear, a LayerNorm: ``(B, H, W, C)`` maps, ``(B, L, C)`` tokens) and nothing in between
    moves the last dimension: permutes and transposes that keep it, reshapes that keep its size
    (row-major order keeps element ``[…, c]`` at channel ``c`` through any such reshape)."""
    def keeps_last(n) -> bool:
        rank = len(bk.shape(n) or ())
        fn = n.grad_fn
        if not rank and fn is not None and op_name(fn) == "Slice" and hasattr(fn, "_saved_self_sym_sizes"):
            rank = len(fn._saved_self_sym_sizes)   # an unrecorded slice (Swin's x[:, 0::2, 0::2, :])
            return saved_dim(fn._saved_dim, rank) != rank - 1
        if not rank:
            return False
        if n.grad_fn is not None and op_name(n.grad_fn) in DIM_MOVES:
            mv = _moves(n.grad_fn)
            return mv is not None and (
                rank - 1 not in {saved_dim(mv[1], rank), saved_dim(mv[2], rank)} if mv[0] == "swap"
                else saved_dim(mv[-1], rank) == rank - 1)
        if n.type == tp_ops.OPTYPE.RESHAPE:
            return bool(n.inputs) and (bk.shape(n.inputs[0]) or (None,))[-1] == bk.shape(n)[-1]
        return True

    found = False
    for h in _layers_upstream(node, keeps_last):
        if h is None or not h.channel_last:
            return False
        found = True
    return found


def _reshape_shapes(bk: Backend):
    """``{node: (in_shape, out_shape)}`` of the reshapes on channel-first tensors; the
    channel-splitting views among them are owned and marked on the way (the merges need them)."""
    nodes = [n for n in bk.dg.module2node.values() if n.type == tp_ops.OPTYPE.RESHAPE and len(n.inputs) == 1]
    shapes = {}
    for node in nodes:
        out, inp = bk.shape(node), bk.shape(node.inputs[0])
        if inp is None and hasattr(node.grad_fn, "_saved_self_sym_sizes"):
            inp = tuple(int(v) for v in node.grad_fn._saved_self_sym_sizes)
        if out is None or inp is None or len(inp) < 2 or len(out) < 2:
            continue
        if len(inp) >= 3 and inp[-1] == out[-1] and _channel_last(bk, node.inputs[0]):
            bk.own(node)   # channels last, and the reshape keeps them (window partitions): identity
            _set_maps(node, node.inputs[0], None, None)
            continue
        if inp[0] != out[0]:
            continue
        if len(inp) == 3 and channel_dim(node.inputs[0], 3) != 1:
            continue  # 3-D (B, L, C) token tensors keep the backend's map
        shapes[node] = (inp, out)
        if len(out) == len(inp) + 1 and out[1] * out[2] == inp[1] and out[3:] == inp[2:]:
            f = bk.facts(node)
            f.split_view = (out[1], out[2])      # (B, C, …) -> (B, g, C/g, …)
            f.period = out[2]   # every one of the g parts must keep the same positions
            bk.own(node)
            _set_maps(node, node.inputs[0], None, None)
    return shapes


def _map_merge(bk: Backend, node, inp, out) -> None:
    """A reshape merging dims 1 and 2 into channels: identity, a shuffle, or refused."""
    found = _shuffle_source(bk, node)
    if found is None:
        bk.facts(node).refuse = (f"reshape {tuple(inp)} -> {tuple(out)} merges dims that no "
                                 "channel-splitting view produced; its channel map is unknown")
        return
    g, per = bk.get(found[0]).split_view
    if not found[1]:
        _set_maps(node, node.inputs[0], None, None)
        return
    fwd = [(c % per) * g + c // per for c in range(g * per)]
    inv = [0] * len(fwd)
    for c, o in enumerate(fwd):
        inv[o] = c
    _set_maps(node, node.inputs[0], _PermuteIndexMapping(inv), _PermuteIndexMapping(fwd))


def map_reshapes(bk: Backend) -> None:
    """Flatten/view maps from the recorded shapes: channel ``c`` (dim 1) of the input covers
    indices ``[c·s, (c+1)·s)`` of the output's dim 1, ``s = prod(in[2:]) / prod(out[2:])``.

    A channel shuffle (``view(B, g, C/g, …)`` → swap dims 1 and 2 → ``reshape(B, C, …)``) maps
    channel ``a·C/g + b`` to ``b·g + a``. Any other reshape that merges channels is marked so
    the groups through it are refused instead of being mapped wrongly."""
    for node, (inp, out) in _reshape_shapes(bk).items():
        if bk.get(node).split_view:
            continue
        bk.own(node)
        if len(out) == len(inp) - 1 and out[1] == inp[1] * inp[2] and out[2:] == inp[3:]:
            _map_merge(bk, node, inp, out)
            continue
        p_in, p_out = math.prod(inp[2:]), math.prod(out[2:])
        if p_in % p_out:
            bk.facts(node).refuse = (f"reshape {tuple(inp)} -> {tuple(out)} merges channels with other "
                                     "dimensions; its channel map is not supported")
            continue
        stride = p_in // p_out
        if stride == 1:
            _set_maps(node, node.inputs[0], None, None)
        else:
            _set_maps(node, node.inputs[0], _FlattenIndexMapping(stride=stride, reverse=True),
                      _FlattenIndexMapping(stride=stride, reverse=False))


# ------------------------------------------------------------------------------- concats
def map_concats(bk: Backend) -> None:
    """Concat offsets from the recorded input shapes (the backend infers them and can fail)."""
    for node in list(bk.dg.module2node.values()):
        if node.type != tp_ops.OPTYPE.CONCAT:
            continue
        shapes = [bk.shape(n) for n in node.inputs]
        dim = getattr(node.grad_fn, "_saved_dim", None)
        if dim is None or any(s is None for s in shapes):
            continue
        rank = len(shapes[0])
        dim = saved_dim(dim, rank)
        cdim = _channel_dim(bk, node, rank)
        if cdim is None:
            continue
        bk.own(node)
        if dim != cdim:   # concat along batch/space/time: channels stay where they are
            for n in node.inputs:
                _set_maps(node, n, None, None)
            continue
        offsets = [0]
        for s in shapes:
            offsets.append(offsets[-1] + s[dim])
        for k, n in enumerate(node.inputs):
            span = offsets[k:k + 2]
            _set_maps(node, n, _ConcatIndexMapping(span, reverse=True), _ConcatIndexMapping(span, reverse=False))


# -------------------------------------------------------------------------------- splits
def _parts_read(consumer, split_fn, node_fns) -> Set[int]:
    """Which outputs of the split op ``split_fn`` reach ``consumer`` (through its module's ops)."""
    found, seen, stack = set(), set(), [consumer.grad_fn]
    while stack:
        fn = stack.pop()
        for nxt, nr in getattr(fn, "next_functions", ()):
            if nxt is None:
                continue
            if nxt is split_fn:
                found.add(nr)
            elif nxt not in node_fns and nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return found


def _split_parts(fn, size, dim) -> Tuple[Optional[list], Optional[str]]:
    """The part widths of a split/chunk on the channel dim, or the reason they cannot be pruned."""
    if hasattr(fn, "_saved_split_sizes"):
        parts = [int(v) for v in fn._saved_split_sizes]
        if len(set(parts)) > 1:
            return None, (f"torch.split into fixed sizes {parts} on the channel dimension: "
                          "the forward hard-codes the part widths, so removing channels "
                          "breaks it (use chunk, or add the producing layer to ignored_layers)")
    else:
        step = int(fn._saved_split_size)
        parts = [min(step, size[dim] - k) for k in range(0, size[dim], step)]
    if len(set(parts)) > 1:
        return None, (f"chunk into unequal parts {parts} on the channel dimension; "
                      "pruning would move the part boundaries")
    return parts, None


def map_splits(bk: Backend) -> None:
    """Split/chunk maps from the recorded sizes, on the tensor's channel dim (dim 1, or the last
    dim of a ``(B, L, C)`` token tensor); each consumer gets the parts it actually reads."""
    node_fns = {n.grad_fn for n in bk.dg.module2node.values() if n.grad_fn is not None}
    for node in list(bk.dg.module2node.values()):
        if node.type != tp_ops.OPTYPE.SPLIT or len(node.inputs) != 1 or node.grad_fn is None:
            continue
        fn = node.grad_fn
        size = tuple(int(v) for v in getattr(fn, "_saved_self_sym_sizes", ()))
        dim = getattr(fn, "_saved_dim", None)
        if not size or dim is None:
            continue
        dim = saved_dim(dim, len(size))
        cdim = channel_dim(node, len(size))
        bk.own(node)
        f = bk.facts(node)
        if cdim is None:
            f.refuse = (f"split of a {len(size)}-D tensor whose channel dimension is unknown "
                        "(a permute or reshape comes before it)")
            continue
        if dim != cdim:
            for out in node.outputs:
                _set_maps(out, node, None, None)
            continue
        parts, why = _split_parts(fn, size, dim)
        if why:
            f.refuse = why
            continue
        f.period = parts[0]  # chunk(k) keeps k equal parts: a unit is one position in each
        offsets = [0]
        for p in parts:
            offsets.append(offsets[-1] + p)
        for out in node.outputs:
            nrs = _parts_read(out, fn, node_fns - {out.grad_fn})
            if not nrs:
                f.refuse = "a consumer of this split could not be matched to its parts"
                continue
            spans = [(offsets[k], offsets[k + 1]) for k in sorted(nrs)]
            _set_maps(out, node, _SpanIndexMapping(spans, to_input=True), _SpanIndexMapping(spans, to_input=False))


#: The passes in their order. Splits come after reshapes: a reshape mapped here is retyped for
#: the backend (``Backend.own``), so :func:`channel_dim` then looks through it to the layer that
#: wrote the tensor; the other passes do not depend on each other.
PASSES = (map_channel_pads, map_slices, map_reshapes, map_concats, map_splits)


def map_indices(bk: Backend) -> None:
    """Run every pass of :data:`PASSES` on the backend's graph, in order."""
    for p in PASSES:
        p(bk)
