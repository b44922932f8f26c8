"""Where a cut can be checked: the smallest module that holds every use of what the cut changes.

Mask-then-prune over the whole model costs two copies of it and two forwards, whatever the cut
touches. A cut whose tensors and layers are all used inside one module ``H``'s forward (an
attention's heads inside its attention module, a block's inner channels inside the block)
changes nothing outside ``H``: ``H`` gets the same inputs in the pruned model as in the original,
so when a masked and a pruned copy of ``H`` alone return the same outputs on the inputs ``H``
received, the whole masked and pruned models do too. :func:`capture` runs the model once and
records, for the candidate hosts, their inputs, and for every parameter and buffer, the modules
whose forward was running each time an op read it; :meth:`Scopes.hosts` lists the modules that
can check a set of cuts, innermost first. A host whose outputs change shape (an attention that
returns its per-head weights) is not enough, and the check moves out to the next one.
"""
from __future__ import annotations

import copy
import itertools
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.overrides import TorchFunctionMode

from .inputs import forward

__all__ = ["Scopes", "capture", "common_prefix", "touched"]

#: a module called more often than this in one forward is not a host (a cell in a loop)
MAX_CALLS = 16


def touched(group) -> Set[str]:
    """Names of the modules whose state a cut of ``group`` changes."""
    names = {it.owner for it in group.items} | {it.module for it in group.items if it.module is not None}
    return names | {c.owner for c in group.counters}


def _ancestors(name: str) -> List[str]:
    """``"a.b.c"`` → ``["a.b.c", "a.b", "a"]`` (the model itself, ``""``, is never a host)."""
    parts = name.split(".") if name else []
    return [".".join(parts[:k]) for k in range(len(parts), 0, -1)]


def common_prefix(names: Iterable[str]) -> str:
    split = [n.split(".") if n else [] for n in names]
    if not split:
        return ""
    out = []
    for level in zip(*split):
        if any(p != level[0] for p in level):
            break
        out.append(level[0])
    return ".".join(out)


class _Uses(TorchFunctionMode):
    """Records, per parameter or buffer read by an op, the modules running at every read."""

    def __init__(self, watched: Dict[int, str], stack: List[str], uses: Dict[str, Set[str]]):
        super().__init__()
        self.watched, self.stack, self.uses = watched, stack, uses

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in pytree.tree_leaves((args, kwargs)):
            key = self.watched.get(id(t)) if isinstance(t, torch.Tensor) else None
            if key is not None:
                running = set(self.stack)
                seen = self.uses.get(key)
                self.uses[key] = running if seen is None else seen & running
        return func(*args, **kwargs)


class Scopes:
    """What :func:`capture` saw: the inputs of candidate hosts and where every tensor is read."""

    def __init__(self, calls: Dict[str, Optional[List[Tuple[tuple, dict]]]], uses: Dict[str, Set[str]]):
        self.calls = calls      # host → its calls' (args, kwargs), None when it cannot be replayed
        self.uses = uses        # "owner.attr" → the modules running at every read of that tensor

    def hosts(self, model: nn.Module, groups: Sequence[Any]) -> List[str]:
        """The modules (innermost first) that can check a cut of ``groups`` together."""
        names = set().union(*(touched(g) for g in groups)) if groups else set()
        tensors = set()
        for g in groups:
            for it in g.items:
                tensors.add(f"{it.owner}.{it.attr}" if it.owner else it.attr)
        for name in names:   # every parameter and buffer of a changed module (its cut refreshes them)
            mod = model.get_submodule(name) if name else model
            for attr, _ in itertools.chain(mod.named_parameters(recurse=False), mod.named_buffers(recurse=False)):
                tensors.add(f"{name}.{attr}" if name else attr)
        out = []
        for host in _ancestors(common_prefix(names)):
            if not self.calls.get(host):
                continue
            # a tensor never read (a spare buffer) says nothing; one read outside the host excludes it
            if all(host in self.uses.get(t, {host}) for t in tensors):
                out.append(host)
        return out


def capture(model: nn.Module, example_inputs: Any, groups: Sequence[Any]) -> Scopes:
    """One forward of ``model`` (no grad) recording what :class:`Scopes` holds for ``groups``."""
    names = {n: m for n, m in model.named_modules()}
    wanted = set()
    for g in groups:
        wanted.update(_ancestors(common_prefix(touched(g))))
    watched: Dict[int, str] = {}
    for name, mod in names.items():
        for attr, t in itertools.chain(mod.named_parameters(recurse=False), mod.named_buffers(recurse=False)):
            if t is not None:
                watched.setdefault(id(t), f"{name}.{attr}" if name else attr)
    stack: List[str] = []
    calls: Dict[str, Optional[List[Tuple[tuple, dict]]]] = {}
    uses: Dict[str, Set[str]] = {}
    hooks = []

    def enter(name):
        def pre(_m, args, kwargs):
            stack.append(name)
            if name in wanted and calls.get(name, []) is not None:
                got = calls.setdefault(name, [])
                try:
                    if len(got) >= MAX_CALLS:
                        raise RuntimeError("called too often")
                    got.append(copy.deepcopy((args, kwargs)))
                except Exception:   # an argument that cannot be copied: checked further out
                    calls[name] = None
        return pre

    def leave(*_):
        stack.pop()

    for name, mod in names.items():
        if not name:
            continue
        hooks.append(mod.register_forward_pre_hook(enter(name), with_kwargs=True))
        hooks.append(mod.register_forward_hook(leave, always_call=True))
    try:
        with torch.no_grad(), _Uses(watched, stack, uses):
            forward(model, example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return Scopes(calls, uses)


class _Host(nn.Module):
    """A model of one module: ``host`` at its own name (so groups resolve their names in it),
    whose forward replays that module's recorded calls."""

    def __init__(self, name: str, module: nn.Module, calls: List[Tuple[tuple, dict]]):
        super().__init__()
        parent: nn.Module = self
        parts = name.split(".")
        for p in parts[:-1]:
            child = nn.Module()
            parent.add_module(p, child)
            parent = child
        parent.add_module(parts[-1], module)
        self._name = name
        self._calls = _Shared(calls)

    def forward(self) -> List[Any]:
        mod = self.get_submodule(self._name)
        ref = next(itertools.chain(mod.parameters(), mod.buffers()), None)
        out = []
        for args, kwargs in self._calls.value:
            args, kwargs = copy.deepcopy((args, kwargs))   # a call may update a cache it is given
            if ref is not None and ref.dtype == torch.float64:   # the float64 re-check
                args, kwargs = pytree.tree_map(
                    lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
                    (args, kwargs))
            out.append(mod(*args, **kwargs))
        return out


class _Shared:
    """Not copied with the module that holds it (the recorded calls, shared by every copy)."""

    def __init__(self, value):
        self.value = value

    def __deepcopy__(self, memo):
        return self


def host_model(model: nn.Module, name: str, scopes: Scopes) -> nn.Module:
    """A stand-in for ``model`` holding only module ``name`` (shared, not copied: the experiment
    copies it), whose forward (no arguments) replays that module's calls."""
    return _Host(name, model.get_submodule(name), scopes.calls[name])
