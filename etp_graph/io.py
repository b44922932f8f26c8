"""Saving and loading pruned models: the weights plus each layer's new sizes.

A pruned model no longer matches its constructor (``Conv2d(16, 16)`` became ``Conv2d(16, 9)``),
so ``load_state_dict`` on a fresh model fails. :func:`save_pruned` stores, next to the state dict,
every module's tensor shapes and its size attributes (``out_channels``, ``hidden_size``,
``normalized_shape`` …); :func:`load_pruned` builds the architecture, resizes it, then loads.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from typing import Any, Callable, Dict, Union

import torch
from torch import nn

from .graph.atomic import atomic
from .handlers import get_handler

__all__ = ["save_pruned", "load_pruned"]

FORMAT = "etp_graph.pruned/1"
_SIMPLE = (int, float, bool, str, type(None))


def _plain(v: Any) -> bool:
    if isinstance(v, _SIMPLE):
        return True
    return isinstance(v, (tuple, list)) and all(isinstance(x, _SIMPLE) for x in v)


def save_pruned(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Write ``model``'s weights and structure to ``path`` (a ``torch.save`` file)."""
    structure: Dict[str, Dict[str, Any]] = {}
    for name, m in model.named_modules():
        structure[name] = {
            "params": {k: list(p.shape) for k, p in m._parameters.items() if p is not None},
            "buffers": {k: list(b.shape) for k, b in m._buffers.items() if b is not None},
            "attrs": {k: v for k, v in vars(m).items() if not k.startswith("_") and _plain(v)},
        }
    # buffers outside the state dict (``persistent=False``: a position table) a cut may have narrowed
    loose = {f"{name}.{k}" if name else k: b for name, m in model.named_modules() for k, b in m._buffers.items()
             if b is not None and k in m._non_persistent_buffers_set}
    torch.save({"format": FORMAT, "state_dict": model.state_dict(), "structure": structure,
                "non_persistent": loose}, path)


def load_pruned(factory_or_model: Union[nn.Module, Callable[[], nn.Module]],
                path: Union[str, os.PathLike]) -> nn.Module:
    """Rebuild a pruned model saved by :func:`save_pruned`.

    Args:
        factory_or_model: the unpruned architecture: a model instance (resized in place) or a
            callable returning one.
        path: the file written by :func:`save_pruned`.

    Returns the model with the pruned sizes and weights. On any error a passed-in model is left
    unchanged.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):   # what torch.save writes (since torch 1.6)
        raise ValueError(f"{path} is not a torch.save file (corrupt, or another format); write it with "
                         "etp_graph.save_pruned(model, path)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e):
            raise ValueError(f"{path} holds Python objects besides tensors and plain values, and "
                             "torch.load(weights_only=True) (the default since torch 2.6) refuses them; a "
                             "save_pruned file never does. If the file comes from a source you trust, "
                             "torch.load(path, weights_only=False) reads it") from e
        raise ValueError(f"{path} is not a torch.save file (corrupt, or another format): {e}") from e
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"{path} is not a torch.save file (corrupt, or another format): {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not an etp_graph pruned checkpoint (format {FORMAT!r}); "
                         "write it with etp_graph.save_pruned(model, path)")
    model = factory_or_model if isinstance(factory_or_model, nn.Module) else factory_or_model()
    if not isinstance(model, nn.Module):
        raise TypeError(f"factory_or_model must be an nn.Module or return one, got {type(model).__name__}")
    mods = dict(model.named_modules())
    missing = [n for n in ckpt["structure"] if n not in mods]
    if missing:
        raise ValueError(f"the checkpoint has modules {missing[:5]} that the model lacks; pass the "
                         "same architecture the pruned model was made from")
    with atomic(model):
        for name, spec in ckpt["structure"].items():
            m = mods[name]
            for k, shape in spec["params"].items():
                p = m._parameters.get(k)
                if p is None or list(p.shape) != shape:
                    dtype = p.dtype if p is not None else torch.float32
                    grad = p.requires_grad if p is not None else True
                    setattr(m, k, nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=grad))
            for k, shape in spec["buffers"].items():
                b = m._buffers.get(k)
                if b is None or list(b.shape) != shape:
                    m._buffers[k] = torch.empty(shape, dtype=b.dtype if b is not None else torch.float32)
            for k, v in spec["attrs"].items():
                setattr(m, k, tuple(v) if isinstance(v, list) and isinstance(getattr(m, k, None), tuple) else v)
            handler = get_handler(m)
            if handler is not None:      # derived state (an RNN's flat weights)
                handler.restored(m)
            if spec["attrs"].get("etp_surgery"):   # a pruned attention's replaced forward
                from .handlers.attention import apply_surgery
                apply_surgery(m)
        model.load_state_dict(ckpt["state_dict"], strict=True)
        for key, value in ckpt.get("non_persistent", {}).items():
            owner, _, k = key.rpartition(".")
            mods[owner]._buffers[k] = value
    return model
