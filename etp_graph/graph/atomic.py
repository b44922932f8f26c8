"""One home for "the model is unchanged on error": snapshots of module state and their restore.

A snapshot keeps, per module, its parameter and buffer dicts (the tensors themselves, not
copies: a cut replaces tensors, it never writes into them), its class (a pruned attention's
forward is a class swap) and its public attributes (``out_channels``, ``num_heads`` …).
Restoring puts all of that back, drops public attributes added since, and then lets the
module's handler redo what only it knows (:meth:`LayerHandler.restored`, e.g. an RNN's flat
weights).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterable, Iterator, Optional

from torch import nn

from ..handlers import get_handler

__all__ = ["Snapshot", "atomic"]


def _state(mod: nn.Module) -> dict:
    return {"_parameters": dict(mod._parameters), "_buffers": dict(mod._buffers), "class": type(mod),
            "attrs": {k: v for k, v in vars(mod).items() if not k.startswith("_")}}


def _put_back(mod: nn.Module, state: dict) -> None:
    mod._parameters.clear()
    mod._parameters.update(state["_parameters"])
    mod._buffers.clear()
    mod._buffers.update(state["_buffers"])
    mod.__class__ = state["class"]
    for k in [k for k in vars(mod) if not k.startswith("_") and k not in state["attrs"]]:
        delattr(mod, k)
    for k, v in state["attrs"].items():
        setattr(mod, k, v)
    handler = get_handler(mod)
    if handler is not None:
        handler.restored(mod)


class Snapshot:
    """The state of ``model``'s modules named in ``names`` (every module when ``None``)."""

    def __init__(self, model: nn.Module, names: Optional[Iterable[str]] = None):
        self.model = model
        wanted = None if names is None else set(names)
        self._states: Dict[str, dict] = {n: _state(m) for n, m in model.named_modules()
                                         if wanted is None or n in wanted}

    def restore(self) -> None:
        """Put every recorded module back as it was when the snapshot was taken."""
        for name, state in self._states.items():
            _put_back(self.model.get_submodule(name) if name else self.model, state)


@contextlib.contextmanager
def atomic(model: nn.Module, names: Optional[Iterable[str]] = None) -> Iterator[Snapshot]:
    """``with atomic(model):`` any exception inside restores the modules (all, or ``names``)."""
    snap = Snapshot(model, names)
    try:
        yield snap
    except BaseException:
        snap.restore()
        raise
