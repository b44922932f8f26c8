"""How ``example_inputs`` are read, and eval mode for a measurement: written once.

``example_inputs`` is a Tensor (one positional argument), a tuple or list (positional
arguments) or a dict (keyword arguments), everywhere in the library.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Tuple

import torch
from torch import nn

__all__ = ["check_example_inputs", "as_call", "forward", "flat_tensors", "eval_mode"]


def check_example_inputs(example_inputs: Any) -> None:
    if not isinstance(example_inputs, (torch.Tensor, tuple, list, dict)):
        raise TypeError("example_inputs must be a Tensor, a tuple of positional arguments or a dict of "
                        f"keyword arguments, got {type(example_inputs).__name__}")


def as_call(example_inputs: Any) -> Tuple[tuple, Dict[str, Any]]:
    """``(args, kwargs)`` of the call ``model(*args, **kwargs)`` that ``example_inputs`` stands for."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def forward(model: nn.Module, example_inputs: Any) -> Any:
    """Call ``model`` the way ``example_inputs`` says: Tensor, positional tuple/list, or kwargs dict."""
    args, kwargs = as_call(example_inputs)
    return model(*args, **kwargs)


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
