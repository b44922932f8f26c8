"""``trace()``: model → :class:`ChannelGraph`, with Torch-Pruning's ``DependencyGraph`` as backend.

Torch-Pruning finds which channels are coupled (autograd tracing, index maps through concat,
split, flatten, slices). This module turns its groups into :class:`CoupledGroup` slice tables
using our handlers, and owns what the backend gets wrong or lacks:

* a channel pad (``F.pad`` on dim 1, the option-A ResNet shortcut) becomes an offset map, and the
  padded units, which no tensor owns, are left out of the group;
* convolutions with ``padding_mode`` other than ``"zeros"`` are traced through one opaque pad op
  (the backend otherwise walks the pad's copy-slice graph and hangs);
* LSTM and GRU are leaf layers with their own handler;
* every op the channels pass through is handled, declared harmless, or reported, and every group
  is verified by masking one copy of the model and pruning another (``validate=True``): a group
  whose outputs differ is listed in ``graph.skipped`` with the reason, never returned.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import warnings
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn.functional as F
import torch_pruning as tp
import torch.utils._pytree as pytree
from torch import nn
from torch.overrides import TorchFunctionMode
from torch_pruning import _helpers as tp_helpers
from torch_pruning import ops as tp_ops
from torch_pruning.dependency.index_mapping import _ConcatIndexMapping, _FlattenIndexMapping
from torch_pruning.pruner import function as tp_function

from ..handlers import get_handler, registered_handlers
from ..handlers.attention import attention_units as attention_units_ctx
from ..handlers.base import LayerHandler, TensorSlice
from .group import ChannelGraph, CoupledGroup, SkippedGroup, SliceItem
from .verify import check_group, forward

__all__ = ["trace", "TraceError"]


class TraceError(ValueError):
    """The model cannot be traced as given; the message names the module and the fix."""


#: Autograd ops that keep every channel at its position (element-wise maths, activations,
#: spatial pooling/resampling, dimension moves). Anything else is handled below or reported.
HARMLESS_OPS = frozenset("""
Add Sub Mul Div Neg Relu Relu6 Hardtanh LeakyRelu Elu Selu Celu Gelu Silu Sigmoid Tanh Softplus
Hardswish Hardsigmoid Mish Clamp ClampMin ClampMax Threshold Exp Log Pow Sqrt Rsqrt Abs Sin Cos
NativeDropout Dropout MaxPool1DWithIndices MaxPool2DWithIndices MaxPool3DWithIndices AvgPool1D
AvgPool2D AvgPool3D AdaptiveAvgPool1D AdaptiveAvgPool2D AdaptiveAvgPool3D AdaptiveMaxPool1D
AdaptiveMaxPool2D AdaptiveMaxPool3D UpsampleNearest1D UpsampleNearest2D UpsampleNearest3D
UpsampleBilinear2D UpsampleLinear1D UpsampleBicubic2D Permute Transpose T Clone Squeeze Unsqueeze
Alias ToCopy Mean Sum Select Index Addcmul Addcdiv Where MaskedFill
""".split())

_PAD = "ConstantPadNd"


def _saved_dim(value: int, rank: int) -> int:
    """A dim saved by autograd, made non-negative (negative dims come back as unsigned 64-bit)."""
    value = int(value)
    if value >= 2 ** 63:
        value -= 2 ** 64
    return value % rank


def _op_name(grad_fn) -> str:
    name = grad_fn.name() if hasattr(grad_fn, "name") else type(grad_fn).__name__
    name = name.split("::")[-1]
    return re.sub(r"Backward\d*$", "", name)


# ---------------------------------------------------------------------------------- arguments
def _check_args(model: Any, example_inputs: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_inputs, (torch.Tensor, tuple, list, dict)):
        raise TypeError("example_inputs must be a Tensor, a tuple of positional arguments or a dict of "
                        f"keyword arguments, got {type(example_inputs).__name__}")


def _ignored_modules(model: nn.Module, ignored_layers: Optional[Iterable[nn.Module]]) -> Set[nn.Module]:
    if ignored_layers is None:
        return set()
    if isinstance(ignored_layers, nn.Module):
        ignored_layers = [ignored_layers]
    owned = {id(m) for m in model.modules()}
    out: Set[nn.Module] = set()
    for i, m in enumerate(ignored_layers):
        if not isinstance(m, nn.Module):
            raise TypeError(f"ignored_layers[{i}] must be an nn.Module of the model, got {type(m).__name__}")
        if id(m) not in owned:
            raise ValueError(f"ignored_layers[{i}] ({type(m).__name__}) is not a submodule of the model; "
                             "pass modules taken from this model instance, e.g. ignored_layers=[model.fc]")
        out.update(m.modules())
    return out


# ---------------------------------------------------------------------- tracing instruments
class _Opaque(torch.autograd.Function):
    """Re-emits a layer's outputs as one autograd node whose only inputs are the layer's inputs."""

    @staticmethod
    def forward(ctx, n_in, *args):
        return tuple(a.clone() for a in args[n_in:])

    @staticmethod
    def backward(ctx, *grads):  # pragma: no cover - traced, never differentiated
        raise RuntimeError("trace-time op")


@contextlib.contextmanager
def _opaque_leaves(model: nn.Module):
    """While tracing, layers whose handler asks for it appear as one node from inputs to outputs.

    Their internal autograd graph (an RNN's gate ops, a circular pad's copy-slices) is hidden from
    the backend, which would otherwise couple channels through it or never finish walking it.
    """
    def hook(mod, inputs, kwargs, output):
        get_handler(mod).observe(mod, inputs, kwargs, output)
        flat_in = [t for t in pytree.tree_leaves((inputs, kwargs))
                   if isinstance(t, torch.Tensor) and t.requires_grad]
        leaves, spec = pytree.tree_flatten(output)
        pos = [k for k, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if not flat_in or not pos:
            return None
        new = _Opaque.apply(len(flat_in), *flat_in, *[leaves[k].detach() for k in pos])
        for k, t in zip(pos, new):
            leaves[k] = t
        return pytree.tree_unflatten(leaves, spec)

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in model.modules()
               if (h := get_handler(m)) is not None and h.traced_as_leaf(m)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _LeafAdapter(tp_function.BasePruningFunc):
    """Lets the backend treat a layer family it lacks (or gets wrong) as a leaf with our sizes."""

    def __init__(self, handler: LayerHandler):
        super().__init__()
        self.handler = handler

    # Two distinct functions: the backend tells input from output pruning by function identity.
    def prune_out_channels(self, layer, idxs):  # pragma: no cover - we prune through handlers
        raise RuntimeError("etp_graph removes units through its handlers")

    def prune_in_channels(self, layer, idxs):  # pragma: no cover - we prune through handlers
        raise RuntimeError("etp_graph removes units through its handlers")

    def get_out_channels(self, layer):
        return self.handler.num_channels(layer, "out")

    def get_in_channels(self, layer):
        return self.handler.num_channels(layer, "in")


class _CoupledLeafAdapter(_LeafAdapter):
    """A leaf whose input channel ``c`` is its output channel ``c`` (a hidden residual): one
    function for both, so the backend couples them as it does through a BatchNorm."""

    prune_in_channels = _LeafAdapter.prune_out_channels
    get_in_channels = _LeafAdapter.get_out_channels


def _leaf_pruners(model: nn.Module) -> Dict[type, _LeafAdapter]:
    adapters: Dict[int, _LeafAdapter] = {}
    out = {}

    def adapter(h):
        return adapters.setdefault(id(h), (_CoupledLeafAdapter if h.couples_in_out else _LeafAdapter)(h))
    for t, h in registered_handlers().items():
        if h.backend_lacks:
            out[t] = adapter(h)
    for m in model.modules():   # handlers registered by structure: by the types present
        h = get_handler(m)
        if h is not None and h.backend_lacks and type(m) not in out:
            out[type(m)] = adapter(h)
    return out


def _map_channel_pads(dg) -> None:
    """Give each ``F.pad`` on the channel dimension the offset map of a concat with zeros."""
    for node in dg.module2node.values():
        if node.type != tp_ops.OPTYPE.ELEMENTWISE or node.grad_fn is None or _op_name(node.grad_fn) != _PAD:
            continue
        pad = tuple(node.grad_fn._saved_pad)
        if len(node.inputs) != 1:
            continue
        inp = node.inputs[0]
        ndim = len(_shape(node) or ()) or None
        front, back = _channel_pad(pad, ndim)
        if front is None:
            continue
        width = _shape(node)[1] - front - back   # from the recorded output shape, never inferred
        node._etp_pad = (front, front + width)
        for dep in node.dependencies:
            if dep.target is inp:
                dep.index_mapping[0] = _ConcatIndexMapping([front, front + width], reverse=True)
        for dep in inp.dependencies:
            if dep.target is node:
                dep.index_mapping[0] = _ConcatIndexMapping([front, front + width], reverse=False)


def _channel_pad(pad: Sequence[int], ndim: Optional[int]) -> Tuple[Optional[int], Optional[int]]:
    """(front, back) padding of dim 1 for a pad spec, or (None, None) when dim 1 is not padded."""
    pairs = [(pad[i], pad[i + 1]) for i in range(0, len(pad), 2)]  # last dim first
    if ndim is None:
        return (None, None)
    k = ndim - 1 - 1  # position of dim 1 in the pairs list
    if k < 0 or k >= len(pairs) or pairs[k] == (0, 0):
        return (None, None)
    return pairs[k]


class _ShapeRecorder(TorchFunctionMode):
    """Records the shape of every tensor a torch function returns, keyed by its ``grad_fn``."""

    def __init__(self):
        super().__init__()
        self.shapes: Dict[Any, Tuple[int, ...]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                self.shapes.setdefault(t.grad_fn, tuple(t.shape))
        return out


_BACKEND_MAPS = ("update_concat_index_mapping", "update_split_index_mapping", "update_reshape_index_mapping",
                 "update_unbind_index_mapping", "update_expand_index_mapping", "update_slice_index_mapping")


@contextlib.contextmanager
def _tolerant_backend():
    """While we trace, a backend index map that raises (it infers concat sizes by walking the
    graph and can fail) marks its node instead of aborting the whole trace. We own the maps of
    concat/split/reshape from recorded shapes afterwards; a group through a node whose map is
    still broken is refused with the backend's error."""
    from torch_pruning.dependency import index_mapping as im
    originals = {name: getattr(im, name) for name in _BACKEND_MAPS}

    def tolerant(fn):
        def update(graph, node):
            try:
                fn(graph, node)
            except Exception as e:  # noqa: BLE001 - reported on the groups through this node
                node._etp_backend_error = f"the tracer backend could not map {type(node.module).__name__}: {e}"
        return update
    for name, fn in originals.items():
        setattr(im, name, tolerant(fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(im, name, fn)


def _build_backend(model: nn.Module, example_inputs) -> Any:
    dg = tp.DependencyGraph()
    recorder = _ShapeRecorder()
    with warnings.catch_warnings(), _opaque_leaves(model), torch.enable_grad():
        warnings.simplefilter("ignore")
        with recorder:
            dg.build_dependency(model, example_inputs, customized_pruners=_leaf_pruners(model), verbose=False)
    for node in dg.module2node.values():
        if node.grad_fn in recorder.shapes:
            node._etp_shape = recorder.shapes[node.grad_fn]
    _map_channel_pads(dg)
    _map_reshapes(dg)
    _map_concats(dg)
    _map_splits(dg)
    return dg


def _shape(node) -> Optional[Tuple[int, ...]]:
    return getattr(node, "_etp_shape", None)


def _own(node) -> None:
    """Take an op's index maps over from the backend (it recomputes the maps of its own types)."""
    node._etp_type = getattr(node, "_etp_type", node.type)
    node.type = tp_ops.OPTYPE.ELEMENTWISE
    node._etp_owned = True
    node._etp_backend_error = None   # our map replaces the backend's


def _set_maps(node, inp, to_input, from_input) -> None:
    """Replace both of the backend's map slots on the edges between ``node`` and ``inp``."""
    for dep in node.dependencies:
        if dep.target is inp:
            dep.index_mapping[:] = [to_input, None]
    for dep in inp.dependencies:
        if dep.target is node:
            dep.index_mapping[:] = [from_input, None]


def _channel_dim(node, rank: int) -> Optional[int]:
    """The channel dimension of ``node``'s output: 1, except for 3-D token tensors ``(B, L, C)``.

    For a 3-D tensor it is decided by the nearest layer upstream (a Conv1d/BatchNorm1d writes
    ``(B, C, L)``, a Linear/LayerNorm ``(B, L, C)``); ``None`` when a dimension move or reshape
    comes first and the answer is unknown."""
    if rank != 3:
        return 1 if rank >= 2 else None
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        m = n.module
        h = get_handler(m) if isinstance(m, nn.Module) else None
        if h is not None:
            return 2 if h.channel_last else 1
        if n is not node and (n.type == tp_ops.OPTYPE.RESHAPE or (
                n.grad_fn is not None and _op_name(n.grad_fn) in ("Permute", "Transpose", "T"))):
            return None
        for p in n.inputs:
            if p not in seen:
                seen.add(p)
                stack.append(p)
    return None


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


def _moves(grad_fn) -> Optional[Tuple[Any, ...]]:
    """``("swap", a, b)`` for a transpose, the dims of a permute, or ``None`` for other ops."""
    name = _op_name(grad_fn)
    if name == "Transpose":
        a, b = int(grad_fn._saved_dim0), int(grad_fn._saved_dim1)
        return ("swap", a, b)
    if name == "Permute":
        return tuple(int(d) for d in grad_fn._saved_dims)
    return None


def _shuffle_source(node):
    """For a reshape merging dims 1 and 2 back into channels: the channel-splitting view it undoes
    and whether the two dims were swapped in between (``None`` when there is no such view)."""
    swapped, n = False, node.inputs[0] if len(node.inputs) == 1 else None
    while n is not None:
        split = getattr(n, "_etp_split_view", None)
        if split is not None:
            return n, swapped
        if n.grad_fn is None or len(n.inputs) != 1:
            return None
        mv = _moves(n.grad_fn)
        if mv is not None:
            rank = len(_shape(n) or ())
            if not rank:
                return None
            if mv[0] == "swap":
                if {_saved_dim(mv[1], rank), _saved_dim(mv[2], rank)} != {1, 2}:
                    return None
            elif [_saved_dim(d, rank) for d in mv] != [0, 2, 1] + list(range(3, rank)):
                return None
            swapped = not swapped
        elif _op_name(n.grad_fn) not in ("Clone", "Alias", "ToCopy"):
            return None
        n = n.inputs[0]
    return None


def _map_reshapes(dg) -> None:
    """Flatten/view maps from the recorded shapes: channel ``c`` (dim 1) of the input covers
    indices ``[c·s, (c+1)·s)`` of the output's dim 1, ``s = prod(in[2:]) / prod(out[2:])``.

    A channel shuffle (``view(B, g, C/g, …)`` → swap dims 1 and 2 → ``reshape(B, C, …)``) maps
    channel ``a·C/g + b`` to ``b·g + a``. Any other reshape that merges channels is marked so
    the groups through it are refused instead of being mapped wrongly."""
    nodes = [n for n in dg.module2node.values() if n.type == tp_ops.OPTYPE.RESHAPE and len(n.inputs) == 1]
    shapes = {}
    for node in nodes:
        out, inp = _shape(node), _shape(node.inputs[0])
        if inp is None and hasattr(node.grad_fn, "_saved_self_sym_sizes"):
            inp = tuple(int(v) for v in node.grad_fn._saved_self_sym_sizes)
        if out is None or inp is None or len(inp) < 2 or len(out) < 2 or inp[0] != out[0]:
            continue
        if len(inp) == 3 and _channel_dim(node.inputs[0], 3) != 1:
            continue  # 3-D (B, L, C) token tensors keep the backend's map
        shapes[node] = (inp, out)
        if len(out) == len(inp) + 1 and out[1] * out[2] == inp[1] and out[3:] == inp[2:]:
            node._etp_split_view = (out[1], out[2])      # (B, C, …) -> (B, g, C/g, …)
            node._etp_period = out[2]   # every one of the g parts must keep the same positions
            _own(node)
            _set_maps(node, node.inputs[0], None, None)
    for node, (inp, out) in shapes.items():
        if getattr(node, "_etp_split_view", None):
            continue
        _own(node)
        if len(out) == len(inp) - 1 and out[1] == inp[1] * inp[2] and out[2:] == inp[3:]:
            found = _shuffle_source(node)
            if found is None:
                node._etp_refuse = (f"reshape {tuple(inp)} -> {tuple(out)} merges dims that no "
                                    "channel-splitting view produced; its channel map is unknown")
                continue
            g, per = found[0]._etp_split_view
            if not found[1]:
                _set_maps(node, node.inputs[0], None, None)
                continue
            fwd = [(c % per) * g + c // per for c in range(g * per)]
            inv = [0] * len(fwd)
            for c, o in enumerate(fwd):
                inv[o] = c
            _set_maps(node, node.inputs[0], _PermuteIndexMapping(inv), _PermuteIndexMapping(fwd))
            continue
        p_in, p_out = math.prod(inp[2:]), math.prod(out[2:])
        if p_in % p_out:
            node._etp_refuse = (f"reshape {tuple(inp)} -> {tuple(out)} merges channels with other "
                                "dimensions; its channel map is not supported")
            continue
        stride = p_in // p_out
        if stride == 1:
            _set_maps(node, node.inputs[0], None, None)
        else:
            _set_maps(node, node.inputs[0], _FlattenIndexMapping(stride=stride, reverse=True),
                      _FlattenIndexMapping(stride=stride, reverse=False))


def _map_concats(dg) -> None:
    """Concat offsets from the recorded input shapes (the backend infers them and can fail)."""
    for node in list(dg.module2node.values()):
        if node.type != tp_ops.OPTYPE.CONCAT:
            continue
        shapes = [_shape(n) for n in node.inputs]
        dim = getattr(node.grad_fn, "_saved_dim", None)
        if dim is None or any(s is None for s in shapes):
            continue
        rank = len(shapes[0])
        dim = _saved_dim(dim, rank)
        cdim = _channel_dim(node, rank)
        if cdim is None:
            continue
        _own(node)
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


def _map_splits(dg) -> None:
    """Split/chunk maps from the recorded sizes, on the tensor's channel dim (dim 1, or the last
    dim of a ``(B, L, C)`` token tensor); each consumer gets the parts it actually reads."""
    node_fns = {n.grad_fn for n in dg.module2node.values() if n.grad_fn is not None}
    for node in list(dg.module2node.values()):
        if node.type != tp_ops.OPTYPE.SPLIT or len(node.inputs) != 1 or node.grad_fn is None:
            continue
        fn = node.grad_fn
        size = tuple(int(v) for v in getattr(fn, "_saved_self_sym_sizes", ()))
        dim = getattr(fn, "_saved_dim", None)
        if not size or dim is None:
            continue
        dim = _saved_dim(dim, len(size))
        cdim = _channel_dim(node, len(size))
        _own(node)
        if cdim is None:
            node._etp_refuse = (f"split of a {len(size)}-D tensor whose channel dimension is unknown "
                                "(a permute or reshape comes before it)")
            continue
        if dim != cdim:
            for out in node.outputs:
                _set_maps(out, node, None, None)
            continue
        if hasattr(fn, "_saved_split_sizes"):
            parts = [int(v) for v in fn._saved_split_sizes]
            if len(set(parts)) > 1:
                node._etp_refuse = (f"torch.split into fixed sizes {parts} on the channel dimension: "
                                    "the forward hard-codes the part widths, so removing channels "
                                    "breaks it (use chunk, or add the producing layer to ignored_layers)")
                continue
        else:
            step = int(fn._saved_split_size)
            parts = [min(step, size[dim] - k) for k in range(0, size[dim], step)]
        if len(set(parts)) > 1:
            node._etp_refuse = (f"chunk into unequal parts {parts} on the channel dimension; "
                                "pruning would move the part boundaries")
            continue
        node._etp_period = parts[0]  # chunk(k) keeps k equal parts: a unit is one position in each
        offsets = [0]
        for p in parts:
            offsets.append(offsets[-1] + p)
        for out in node.outputs:
            nrs = _parts_read(out, fn, node_fns - {out.grad_fn})
            if not nrs:
                node._etp_refuse = "a consumer of this split could not be matched to its parts"
                continue
            spans = [(offsets[k], offsets[k + 1]) for k in sorted(nrs)]
            _set_maps(out, node, _SpanIndexMapping(spans, to_input=True), _SpanIndexMapping(spans, to_input=False))


# ------------------------------------------------------------------------------ group making
class _Refused(Exception):
    pass


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


def _shared_channel_merges(dg, module: nn.Module, tpg) -> List[Tuple[int, int]]:
    """Root channels that meet in one channel after a split (a GLU's two halves multiplied).

    The backend merges the indices of a group by position and keeps one root per index, so this
    is found by following each root channel alone, only for groups that pass a split."""
    kinds = (tp_ops.OPTYPE.SPLIT, tp_ops.OPTYPE.UNBIND, tp_ops.OPTYPE.SLICE)
    if not any(getattr(it.dep.target, "_etp_type", it.dep.target.type) in kinds for it in tpg):
        return []
    fn = tpg[0].dep.handler
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


def _make_group(dg, tpg, root_name: str, ignored: Set[nn.Module], gid: int, graph,
                merges: Sequence[Tuple[int, int]] = ()) -> CoupledGroup:
    param_names = {id(p): n for p, n in dg._param_to_name.items()}
    entries: List[_Entry] = []
    exact, ops, pinned = True, [], set()
    for item in tpg:
        dep, idxs, root_idxs = item.dep, list(item.idxs), list(item.root_idxs)
        node, mod = dep.target, dep.target.module
        if isinstance(mod, nn.Parameter):
            pname = param_names[id(mod)]
            owner, _, attr = pname.rpartition(".")
            dim = node.pruning_dim % mod.dim()
            entries.append(_Entry(None, owner, "out", idxs, root_idxs, [TensorSlice(attr, dim)], None))
            continue
        if node.type == tp_ops.OPTYPE.OUTPUT:
            raise _Refused("its channels are a model output; pruning would change the output's shape "
                           "(add the producing layer to ignored_layers)")
        if node.type in (tp_ops.OPTYPE.CONCAT, tp_ops.OPTYPE.SPLIT, tp_ops.OPTYPE.RESHAPE,
                         tp_ops.OPTYPE.UNBIND, tp_ops.OPTYPE.EXPAND, tp_ops.OPTYPE.SLICE):
            ops.append(type(mod).__name__.strip("_").replace("Op", ""))
            continue
        if getattr(node, "_etp_refuse", None):
            raise _Refused(node._etp_refuse)
        if getattr(node, "_etp_backend_error", None):
            raise _Refused(node._etp_backend_error)
        if getattr(node, "_etp_owned", False):
            if getattr(node, "_etp_period", None):   # a view/chunk into equal parts
                entries.append(_Entry(None, "", "out", idxs, root_idxs, [], node._etp_period))
            ops.append(type(mod).__name__.strip("_").split("Op")[0].split("_")[0])
            continue
        if isinstance(mod, tp_ops._ElementWiseOp):
            name = _op_name(node.grad_fn) if node.grad_fn is not None else "Unknown"
            ops.append(name)
            span = getattr(node, "_etp_pad", None)
            if span is not None:  # padded channels belong to no tensor: not prunable here
                pinned.update(r for i, r in zip(idxs, root_idxs) if not span[0] <= i < span[1])
            continue
        name = dg._module2name.get(mod, type(mod).__name__)
        handler = get_handler(mod)
        if handler is None:
            raise _Refused(f"no handler for {name!r} ({type(mod).__name__}); register one with "
                           "@etp_graph.handlers.register_handler or pass ignored_layers=[...]")
        role = "out" if dg.is_out_channel_pruning_fn(dep.handler) else "in"
        if role == "out" and mod in ignored:
            raise _Refused(f"it couples the output channels of ignored layer {name!r}")
        why = handler.unsupported(mod, role)
        if why:
            raise _Refused(f"{name!r}: {why}")
        exact &= handler.exact_when_masked
        entries.append(_Entry(name, name, role, idxs, root_idxs, handler.slices(mod, role),
                              handler.period(mod, role), handler.block(mod, role)))
    products = sorted(set(ops) & _PRODUCT_OPS)
    if products:
        parent = root_name.rpartition(".")[0]
        where = (f"{parent!r} ({type(dg.model.get_submodule(parent)).__name__})" if parent
                 else "the model's forward")
        raise _Refused(f"no handler for {where}: the channels of {root_name!r} meet other channels in a "
                       f"matrix product ({', '.join(products)}), as in an attention the engine does not "
                       "know; register a handler for it (see etp_graph.handlers.attention) or pass "
                       "ignored_layers=[...]")
    return _assemble(entries, pinned, root_name, gid, graph, exact, ops, merges)


#: batched matrix products between activations (q·kᵀ, attn·v): channels are contracted, not kept
_PRODUCT_OPS = frozenset({"Bmm", "Baddbmm", "MatMul", "ScaledDotProductAttention",
                          "ScaledDotProductEfficientAttention", "ScaledDotProductFlashAttentionForCpu"})


def _assemble(entries, pinned, root_name, gid, graph, exact, ops, merges) -> CoupledGroup:
    roots = sorted({r for e in entries for r in e.root_idxs} - pinned)
    if not roots:
        raise _Refused("no unit of the group is owned by a tensor")
    # units: root channels that must go together (a period of a grouped layer) are merged
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
    ordered = sorted(classes.values(), key=min)
    unit_of = {r: u for u, cls in enumerate(ordered) for r in cls}
    if len(ordered) < 2:
        raise _Refused("fewer than two prunable units")
    items: List[SliceItem] = []
    for e in entries:
        keep = [k for k, r in enumerate(e.root_idxs) if r in unit_of]
        if not keep:
            continue
        local = torch.tensor([e.idxs[k] for k in keep], dtype=torch.long)
        units = torch.tensor([unit_of[e.root_idxs[k]] for k in keep], dtype=torch.long)
        for s in e.slices:
            pos, index = s.index(local)
            owner, attr = _owner_attr(e.owner, s.attr)
            items.append(SliceItem(owner, attr, s.dim, units[pos], index, e.module, e.role, local[pos]))
    return CoupledGroup(graph, gid, root_name, len(ordered), items, exact, sorted(set(ops)))


def _owner_attr(owner: str, attr: str) -> Tuple[str, str]:
    """``("att", "out_proj.weight")`` → ``("att.out_proj", "weight")``."""
    prefix, _, attr = attr.rpartition(".")
    if prefix:
        owner = f"{owner}.{prefix}" if owner else prefix
    return owner, attr


def _internal_groups(name: str, m: nn.Module, gid: int, graph) -> List[Any]:
    """Groups wholly inside ``m`` (attention heads), or ``SkippedGroup``s with the handler's reason;
    the caller renumbers ``id`` as it keeps them."""
    out: List[Any] = []
    for spec in get_handler(m).internal_groups(m):
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
            owner, attr = _owner_attr(name, s.attr)
            items.append(SliceItem(owner, attr, s.dim, units[pos], index, name, spec.label, units[pos]))
        out.append(CoupledGroup(graph, gid, name, spec.size, items, True, ["attention"]))
    return out


def _root_modules(model: nn.Module, dg, ignored: Set[nn.Module]) -> List[Tuple[str, nn.Module]]:
    out = []
    for name, m in model.named_modules():
        h = get_handler(m)
        if h is None or not h.can_root or m in ignored or m not in dg.module2node:
            continue
        out.append((name, m))
    return out


def _all_units(dg, m) -> Any:
    pruner = dg.get_pruner_of_module(m)
    n = pruner.get_out_channels(m) if pruner is not None else None
    if not n:
        return None
    return dg.get_pruning_group(m, pruner.prune_out_channels, list(range(n)))


# ------------------------------------------------------------------------------------ public
def trace(model: nn.Module, example_inputs: Any, ignored_layers: Optional[Iterable[nn.Module]] = None,
          validate: bool = True, attention_units: str = "heads") -> ChannelGraph:
    """Trace ``model`` into coupled groups of units.

    Args:
        model: any ``nn.Module``; its training mode is restored afterwards, its weights untouched.
        example_inputs: a Tensor, a tuple of positional arguments, or a dict of keyword arguments.
        ignored_layers: modules whose outputs are never pruned (the task head); their input
            columns still belong to the group that feeds them.
        validate: verify every group by masking a copy and pruning another on ``example_inputs``
            (two deep copies and two forwards per group); a failing group goes to ``skipped``.
        attention_units: the unit of head-structured groups: ``"heads"`` (a whole head) or
            ``"head_dims"`` (one dimension in every head).

    Returns:
        :class:`ChannelGraph` with ``groups`` in the order of their root layer in
        ``model.named_modules()``, and ``skipped`` (root, reason) for what will not be pruned.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
        ...                     nn.Flatten(), nn.Linear(16 * 6 * 6, 10))
        >>> g = eg.trace(net, torch.randn(1, 3, 8, 8), ignored_layers=[net[4]])
        >>> [(x.root, x.size) for x in g.groups]
        [('0', 16)]
    """
    _check_args(model, example_inputs)
    ignored = _ignored_modules(model, ignored_layers)
    was_training = model.training
    model.eval()
    try:
        with _tolerant_backend(), attention_units_ctx(attention_units):
            return _trace(model, example_inputs, ignored, validate)
    finally:
        model.train(was_training)


def _trace(model, example_inputs, ignored, validate) -> ChannelGraph:
    try:
        with torch.no_grad():
            forward(model, example_inputs)
    except Exception as e:
        raise TraceError(f"the model cannot run on example_inputs ({type(e).__name__}: {e}); pass a "
                         "Tensor, a tuple of positional arguments or a dict of keyword arguments "
                         "that model(...) accepts") from e
    dg = _build_backend(model, example_inputs)
    graph = ChannelGraph(model, [], [], {}, [], {})
    visited: Set[nn.Module] = set()
    roots = {id(m) for _, m in _root_modules(model, dg, ignored)}
    for name, m in model.named_modules():
        if m in dg.module2node and m not in ignored and get_handler(m) is not None:
            for group in _internal_groups(name, m, len(graph.groups), graph):
                if isinstance(group, SkippedGroup):
                    graph.skipped.append(group)
                    continue
                group.id = len(graph.groups)
                problem = check_group(model, example_inputs, group) if validate else None
                if problem:
                    graph.skipped.append(SkippedGroup(name, problem))
                else:
                    graph.groups.append(group)
        if id(m) not in roots or m in visited:
            continue
        try:
            tpg = _all_units(dg, m)
        except Exception as e:  # the backend's index maps broke on this group
            graph.skipped.append(SkippedGroup(name, f"the tracer backend failed on it: {type(e).__name__}: {e}"))
            visited.add(m)
            continue
        if tpg is None:
            continue
        for item in tpg:
            if dg.is_out_channel_pruning_fn(item.dep.handler) and isinstance(item.dep.target.module, nn.Module):
                visited.add(item.dep.target.module)
        try:
            group = _make_group(dg, tpg, name, ignored, len(graph.groups), graph,
                                _shared_channel_merges(dg, m, tpg))
        except _Refused as r:
            graph.skipped.append(SkippedGroup(name, str(r)))
            continue
        unknown = [o for o in group.ops if o not in HARMLESS_OPS and o not in _HANDLED_OPS]
        if validate:
            problem = check_group(model, example_inputs, group)
            if problem:
                graph.skipped.append(SkippedGroup(name, problem))
                continue
        elif unknown:
            graph.skipped.append(SkippedGroup(name, f"passes through unverified ops {unknown}; "
                                                    "trace with validate=True to verify it"))
            continue
        for o in unknown:
            graph.unknown_ops.setdefault(o, []).append(group.id)
        graph.groups.append(group)
    graph._nodes, graph._edges = _layer_graph(dg)
    return graph


_HANDLED_OPS = frozenset({"Concat", "Split", "Reshape", "Unbind", "Expand", "Slice", _PAD, "_Opaque"})


def _layer_graph(dg) -> Tuple[Dict[str, str], List[Tuple[str, str]]]:
    def label(node) -> str:
        m = node.module
        if isinstance(m, nn.Parameter):
            return dg._param_to_name.get(m, "parameter")
        name = dg._module2name.get(m)
        if name is not None:
            return name or type(m).__name__
        return f"{_op_name(node.grad_fn) if node.grad_fn is not None else type(m).__name__}#{getattr(m, 'id', 0)}"

    nodes, edges = {}, []
    for node in dg.module2node.values():
        nodes[label(node)] = type(node.module).__name__
    for node in dg.module2node.values():
        for out in node.outputs:
            edges.append((label(node), label(out)))
    return nodes, edges
