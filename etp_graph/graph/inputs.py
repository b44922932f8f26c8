"""How ``example_inputs`` are read, and eval mode for a measurement: written once.

``example_inputs`` is a Tensor (one positional argument), a tuple or list (positional
arguments) or a dict (keyword arguments), everywhere in the library.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import torch
from torch import nn

__all__ = ["check_example_inputs", "as_call", "forward", "flat_tensors", "eval_mode", "Outputs", "OutputsError"]


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
    """Call ``model`` the way ``example_inputs`` says: Tensor, positional tuple/list, or kwargs dict."""
    args, kwargs = as_call(example_inputs)
    out = model(*args, **kwargs)
    return example_inputs.select(out) if isinstance(example_inputs, Outputs) else out


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
