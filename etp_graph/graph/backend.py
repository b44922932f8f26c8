"""Torch-Pruning's ``DependencyGraph`` as the tracer's backend: building it, its adapters, and the
facts the later phases record about its nodes.

The backend finds which channels are coupled by autograd tracing. Here it is built with

* layers whose handler asks for it (an RNN, a circular-padded conv) traced as one opaque node
  from inputs to outputs, so the backend neither couples channels through their internal ops nor
  walks a pad's copy-slice graph forever;
* adapters for the layer families the backend lacks, with our handlers' channel counts;
* the shape of every tensor recorded, so index maps come from shapes, never inferred;
* its own index-map updates made tolerant *during our trace only* (a contextvar, so other
  threads and other users of Torch-Pruning see its usual behaviour): an update that raises
  marks the node instead of aborting the trace.

What the phases learn about a node lives in one :class:`NodeFacts` per node, kept by
:class:`Backend`, not in attributes set on the backend's objects.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.utils._pytree as pytree
import torch_pruning as tp
from torch import nn
from torch.overrides import TorchFunctionMode
from torch_pruning import ops as tp_ops
from torch_pruning.dependency import index_mapping as tp_index_mapping
from torch_pruning.pruner import function as tp_function

from ..handlers import get_handler, registered_handlers
from ..handlers.base import LayerHandler
from .inputs import LayerCalls, Outputs, flat_tensors

__all__ = ["Backend", "NodeFacts", "build_backend"]


@dataclasses.dataclass
class NodeFacts:
    """What the tracer knows about one backend node beyond the backend itself."""

    shape: Optional[Tuple[int, ...]] = None        #: recorded output shape
    pad_span: Optional[Tuple[int, int]] = None     #: channel pad: ``[start, end)`` of the input's channels
    split_view: Optional[Tuple[int, int]] = None   #: ``(g, C/g)`` of a ``(B, C, …) → (B, g, C/g, …)`` view
    period: Optional[int] = None                   #: channels equal modulo this go together
    refuse: Optional[str] = None                   #: why no group may pass through this node
    backend_error: Optional[str] = None            #: the backend's own index map failed here
    owned: bool = False                            #: its index maps are ours (index_maps.py)
    backend_type: Any = None                       #: the backend's op type before we owned it


class Backend:
    """The backend's graph (``dg``) and our :class:`NodeFacts` about its nodes."""

    def __init__(self, dg: Any):
        self.dg = dg
        self._facts: Dict[Any, NodeFacts] = {}
        #: the model's outputs at the trace (floating ones as shape-only stand-ins): what a shape
        #: check compares a pruned copy's outputs with
        self.outputs: Optional[List[torch.Tensor]] = None
        #: the Linears the model calls through their parameters (``F.linear(x, m.weight, m.bias)``)
        self.layer_calls: frozenset = frozenset()

    def facts(self, node) -> NodeFacts:
        return self._facts.setdefault(node, NodeFacts())

    def get(self, node) -> NodeFacts:
        """The node's facts without recording an empty entry."""
        return self._facts.get(node) or NodeFacts()

    def shape(self, node) -> Optional[Tuple[int, ...]]:
        return self.get(node).shape

    def kind(self, node):
        """The backend's op type of ``node``, as it was before we took its maps over."""
        t = self.get(node).backend_type
        return node.type if t is None else t

    def own(self, node) -> None:
        """Take an op's index maps over from the backend. The backend recomputes the maps of its
        structural op types on every query, so the node is retyped element-wise for it."""
        f = self.facts(node)
        if f.backend_type is None:
            f.backend_type = node.type
        node.type = tp_ops.OPTYPE.ELEMENTWISE
        f.owned = True
        f.backend_error = None   # our map replaces the backend's

    @contextlib.contextmanager
    def tolerant(self):
        """While active (this context only), a backend index-map update that raises is recorded
        as the node's ``backend_error`` instead of aborting."""
        _install_tolerant_maps()
        token = _TOLERANT.set(self)
        try:
            yield self
        finally:
            _TOLERANT.reset(token)


# ------------------------------------------------------------------ tolerant index-map updates
_TOLERANT: contextvars.ContextVar[Optional[Backend]] = contextvars.ContextVar("etp_graph_tolerant", default=None)
_BACKEND_MAPS = ("update_concat_index_mapping", "update_expand_index_mapping", "update_reshape_index_mapping",
                 "update_slice_index_mapping", "update_split_index_mapping", "update_unbind_index_mapping")


#: the backend's own update functions, by name (the wrappers call these)
ORIGINAL_MAPS: Dict[str, Any] = {}


def _install_tolerant_maps() -> None:
    """Wrap the backend's map updates once; the wrappers only differ inside :meth:`Backend.tolerant`."""
    for name in _BACKEND_MAPS:
        fn = getattr(tp_index_mapping, name)
        if getattr(fn, "_etp_graph_wrapped", False):
            continue
        ORIGINAL_MAPS[name] = fn

        def update(graph, node, _name=name):
            original, backend = ORIGINAL_MAPS[_name], _TOLERANT.get()
            if backend is None:
                return original(graph, node)
            try:
                return original(graph, node)
            except Exception as e:  # noqa: BLE001 - reported on the groups through this node
                backend.facts(node).backend_error = (
                    f"the tracer backend could not map {type(getattr(node, 'module', node)).__name__}: {e}")
        update._etp_graph_wrapped = True
        setattr(tp_index_mapping, name, update)


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
    """While tracing, layers whose handler asks for it appear as one node from inputs to outputs."""
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


def _traced_outputs(out: Any) -> List[torch.Tensor]:
    # Every output tensor autograd reaches; caches and other objects (a Hugging Face
    # ``DynamicCache``) are not outputs whose channels the cut must keep.
    return [t for t in flat_tensors(out) if t.grad_fn is not None]


@contextlib.contextmanager
def _all_trainable(model: nn.Module):
    """Every floating parameter requires grad while the backend traces (restored after): the
    backend follows autograd, and a frozen first layer on inputs without grad would be missing
    from its graph, its channels silently never a group."""
    frozen = [p for p in model.parameters() if p.is_floating_point() and not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


def _shape_only(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, device="meta")


def _as_is(t: torch.Tensor) -> torch.Tensor:
    return t


def build_backend(model: nn.Module, example_inputs: Any, backend: Optional[Backend] = None) -> Backend:
    """Trace ``model`` with Torch-Pruning (inside ``backend.tolerant()``); record every node's shape."""
    backend = backend if backend is not None else Backend(tp.DependencyGraph())
    recorder = _ShapeRecorder()
    # made before any hook of ours (the leaves' below): a layer with hooks of the user's is not redirected
    calls = LayerCalls(model)
    # autograd keeps what a backward would need; nothing runs backward here, and the graph is
    # read for its ops, dims and shapes only: saved tensors become shape-only (meta) stand-ins,
    # so the graph holds no activation
    with warnings.catch_warnings(), _opaque_leaves(model), _all_trainable(model), torch.enable_grad(), \
            torch.autograd.graph.saved_tensors_hooks(_shape_only, _as_is):
        warnings.simplefilter("ignore")
        with recorder:
            if isinstance(example_inputs, Outputs):   # only these outputs must keep their channels
                inputs, select = example_inputs.inputs, example_inputs.select
            else:
                inputs, select = example_inputs, lambda out: out

            def transform(out):
                out = select(out)
                backend.outputs = [_shape_only(t) if t.is_floating_point() else t.detach().clone()
                                   for t in flat_tensors(out)]
                return _traced_outputs(out)
            with calls:
                backend.dg.build_dependency(model, inputs, customized_pruners=_leaf_pruners(model),
                                            output_transform=transform, verbose=False)
            backend.layer_calls = frozenset(calls.called)
    for node in backend.dg.module2node.values():
        if node.grad_fn in recorder.shapes:
            backend.facts(node).shape = recorder.shapes[node.grad_fn]
    return backend
