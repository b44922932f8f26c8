"""How ``example_inputs`` are read, and eval mode for a measurement: written once.

``example_inputs`` is a Tensor (one positional argument), a tuple or list (positional
arguments) or a dict (keyword arguments), everywhere in the library.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Dict, FrozenSet, Iterator, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..handlers import get_handler

__all__ = ["check_example_inputs", "as_call", "forward", "flat_tensors", "eval_mode", "Outputs", "OutputsError",
           "LayerCalls", "layer_calls"]


def check_example_inputs(example_inputs: Any) -> None:
    if not isinstance(example_inputs, (torch.Tensor, tuple, list, dict, Outputs)):
        raise TypeError("example_inputs must be a Tensor, a tuple of positional arguments or a dict of "
                        f"keyword arguments, got {type(example_inputs).__name__}")


class OutputsError(KeyError):
    """``outputs`` names an output the model does not return."""

    def __str__(self) -> str:
        return str(self.args[0])


class Outputs:
    """``inputs`` (a Tensor, tuple or dict) whose forward keeps only the outputs ``keys`` (names
    of a dict-like output such as a Hugging Face ``ModelOutput``, or positions): the outputs a
    cut must leave as they are. ``trace(outputs=...)`` wraps its inputs in it."""

    def __init__(self, inputs: Any, keys: Sequence[Any]):
        check_example_inputs(inputs)
        if isinstance(keys, (str, int)) or not keys:
            raise ValueError(f"outputs must be a non-empty list of output names or positions, got {keys!r}")
        self.inputs, self.keys = inputs, list(keys)

    def select(self, out: Any) -> List[Any]:
        picked = []
        for k in self.keys:
            try:
                picked.append(out[k])
            except (KeyError, IndexError, TypeError) as e:
                have = list(out.keys()) if hasattr(out, "keys") else f"{len(out)} positions" \
                    if isinstance(out, (tuple, list)) else type(out).__name__
                raise OutputsError(f"outputs: the model's output has no {k!r} (it has {have}); pass names "
                                   "or positions of what it returns") from e
        return picked


def as_call(example_inputs: Any) -> Tuple[tuple, Dict[str, Any]]:
    """``(args, kwargs)`` of the call ``model(*args, **kwargs)`` that ``example_inputs`` stands for."""
    if isinstance(example_inputs, Outputs):
        return as_call(example_inputs.inputs)
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def forward(model: nn.Module, example_inputs: Any) -> Any:
    """Call ``model`` the way ``example_inputs`` says: Tensor, positional tuple/list, or kwargs dict.

    Inside :func:`layer_calls` (a trace), the layers the model calls through their parameters
    run as calls of the layer (:class:`LayerCalls`)."""
    args, kwargs = as_call(example_inputs)
    names = _LAYER_CALLS.get()
    with LayerCalls(model, names) if names else contextlib.nullcontext():
        out = model(*args, **kwargs)
    return example_inputs.select(out) if isinstance(example_inputs, Outputs) else out


#: the layers a traced model calls through their parameters (by name), while its trace runs
_LAYER_CALLS: contextvars.ContextVar[FrozenSet[str]] = contextvars.ContextVar("etp_graph_layer_calls",
                                                                             default=frozenset())


@contextlib.contextmanager
def layer_calls(names: FrozenSet[str]) -> Iterator[None]:
    """Every :func:`forward` inside runs the layers ``names`` as :class:`LayerCalls` does."""
    token = _LAYER_CALLS.set(frozenset(names))
    try:
        yield
    finally:
        _LAYER_CALLS.reset(token)


#: argument names of the functional products a layer may be called through
_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


class LayerCalls(TorchFunctionMode):
    """``F.linear(x, m.weight, m.bias)`` of an ``nn.Linear`` ``m`` called where no layer runs
    (torchvision's Swin attention applies ``self.qkv.weight`` so: the Linear's forward never runs),
    or ``F.conv2d`` (1d, 3d) with a convolution's own weight, bias, stride, padding, dilation and
    groups, runs as ``m(x)``: the same values, and every hook on ``m`` (the backend's graph, the
    shadow and flow runs) sees a call of the layer, so its channels are followed like any other's.

    Which call is a layer's own is its handler's to say (:meth:`LayerHandler.own_call`).
    ``names``: the layers to redirect (``None``: every layer without hooks of its own, as
    the backend's trace looks for them); :attr:`called` holds those that were. Enter it last (the
    innermost mode): the modes entered before see the redirected call's own ops."""

    def __init__(self, model: nn.Module, names: Optional[FrozenSet[str]] = None):
        super().__init__()
        self._owners: Dict[int, Tuple[str, nn.Module]] = {
            id(m.weight): (n, m) for n, m in model.named_modules()
            if isinstance(getattr(m, "weight", None), torch.Tensor) and get_handler(m) is not None and (
                n in names if names is not None else not (m._forward_hooks or m._forward_pre_hooks))}
        self._layers = [m for m in model.modules() if _has_handler(m)]
        self._running = 0
        self._hooks: List[Any] = []
        self.called: Set[str] = set()

    def __enter__(self):
        if self._owners:   # a layer's own forward (or a handled module's) calls F.linear itself
            for m in self._layers:
                self._hooks.append(m.register_forward_pre_hook(self._enter))
                self._hooks.append(m.register_forward_hook(self._leave, always_call=True))
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        return super().__exit__(*exc)

    def _enter(self, *_):
        self._running += 1

    def _leave(self, *_):
        self._running -= 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._running and self._owners:
            weight = kwargs.get("weight", args[1] if len(args) > 1 else None)
            hit = self._owners.get(id(weight)) if isinstance(weight, torch.Tensor) else None
            if hit is not None:
                given = dict(zip(_ARGS, args), **kwargs)
                if isinstance(given.get("input"), torch.Tensor) and get_handler(hit[1]).own_call(hit[1], func, given):
                    self.called.add(hit[0])
                    return hit[1](given["input"])
        return func(*args, **kwargs)


def _has_handler(m: nn.Module) -> bool:
    return get_handler(m) is not None


def flat_tensors(out: Any) -> List[torch.Tensor]:
    """Every tensor of a model output (tensor, tuple/list, dict, dataclass-like ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flat_tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flat_tensors(v)]
    if hasattr(out, "to_tuple"):
        return flat_tensors(out.to_tuple())
    return []


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` inside, its training mode (of every submodule) restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, was in modes:
            m.training = was
