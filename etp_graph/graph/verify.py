"""Mask-then-prune verification, shared by ``trace(validate=True)`` and ``etp_graph.testing``."""
from __future__ import annotations

import collections
import contextlib
import copy
import itertools
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.utils._pytree as pytree
from torch import nn

from .group import cut_groups
from .inputs import Outputs, flat_tensors, forward
from .scope import Scopes, host_model


def sample_units(size: int, fraction: float, seed: int) -> List[int]:
    """A reproducible subset of ``max(1, round(fraction·size))`` units, never all of them."""
    k = min(size - 1, max(1, round(fraction * size)))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(size, generator=g)[:k].tolist())


class Mismatch(str):
    """Why masked and pruned outputs differ; ``kind`` is ``"count"``, ``"shape"`` or ``"value"``."""

    def __new__(cls, kind: str, text: str):
        obj = super().__new__(cls, text)
        obj.kind = kind
        return obj


def compare(masked: Any, pruned: Any, exact: bool, rtol: float = 1e-4, atol: float = 1e-5,
            relative: bool = False, what: str = "output") -> Optional[Mismatch]:
    """``None`` when the outputs agree (values when ``exact``, else shapes and finiteness).

    The absolute tolerance is ``atol`` times the largest magnitude of the masked output, at
    least 1 (``relative=True``: the largest magnitude itself, for activations far below 1)."""
    a, b = flat_tensors(masked), flat_tensors(pruned)
    if len(a) != len(b):
        return Mismatch("count", f"the pruned model returns {len(b)} tensors, the masked one {len(a)}")
    for k, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape:
            return Mismatch("shape", f"{what} {k} has shape {tuple(y.shape)} after pruning, "
                                     f"{tuple(x.shape)} after masking")
        if not y.is_floating_point():
            if not torch.equal(x, y):
                return Mismatch("value", f"{what} {k} differs after pruning")
            continue
        if not torch.isfinite(y).all():
            return Mismatch("value", f"{what} {k} is not finite after pruning")
        if exact:
            top = x.abs().max().item() if x.numel() else 1.0
            scale = max(top, 1e-30) if relative else max(1.0, top)
            err = (x - y).abs().max().item() if x.numel() else 0.0
            if not torch.allclose(x, y, rtol=rtol, atol=atol * scale):
                return Mismatch("value", f"{what} {k} differs between masking and pruning (max abs error {err:.3g})")
    return None


class MaskedBroke(RuntimeError):
    """The masked copy's forward raised: the cut is not to blame (the check must move out)."""


def _tensors(model: nn.Module):
    return itertools.chain(model.parameters(), model.buffers())


_PLAIN = (dict, list, set, collections.OrderedDict)


def _copy_module(m: nn.Module, memo: Dict[int, nn.Module]) -> nn.Module:
    if id(m) in memo:
        return memo[id(m)]
    new = m.__class__.__new__(m.__class__)
    memo[id(m)] = new
    for k, v in m.__dict__.items():
        if k == "_modules":
            v = {n: None if c is None else _copy_module(c, memo) for n, c in v.items()}
        elif isinstance(v, (dict, list, set)):   # hooks, parameter dicts, flat-weight lists
            # (a plain container's own copy: copy.copy of an OrderedDict goes through __reduce_ex__)
            v = v.copy() if type(v) in _PLAIN else copy.copy(v)
        new.__dict__[k] = v
    return new


def twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) whose modules are new (their dicts and lists too) but whose
    parameters, buffers and other attributes are ``model``'s own: a cut replaces tensors and
    attributes of the copy, it never writes into a tensor, so a pruned twin costs what its new
    tensors cost. (A scripted module is deep-copied.)"""
    if any(isinstance(m, torch.jit.ScriptModule) for m in model.modules()):
        return copy.deepcopy(model).eval()
    return _copy_module(model, {}).eval()


def _as_masked(model: nn.Module) -> nn.Module:
    """What the masked run of :func:`mask_and_prune` runs: ``model`` itself where it is in eval
    mode (masking writes into its tensors and puts every value back, the watch hooks are removed
    after), else a :func:`twin`."""
    if any(m.training or isinstance(m, torch.jit.ScriptModule) for m in model.modules()):
        return twin(model)
    return model


@contextlib.contextmanager
def masked_in_place(cuts: Sequence[Tuple[Any, Sequence[int]]], model: nn.Module) -> Iterator[None]:
    """Inside, the slices of ``cuts`` are zero in ``model``'s own tensors; on leaving (also on
    error) every value is put back exactly."""
    saved = []
    try:
        for group, units in cuts:
            for t, dim, index in group.slices_of(units, model):
                saved.append((t, dim, index, t.index_select(dim, index)))
                with torch.no_grad():
                    t.index_fill_(dim, index, 0)
        yield
    finally:
        with torch.no_grad():
            for t, dim, index, old in reversed(saved):
                t.index_copy_(dim, index, old)


def mask_and_prune(model: nn.Module, example_inputs: Any, cuts: Sequence[Tuple[Any, Sequence[int]]],
                   inside: Optional[List[Tuple[str, str]]] = None,
                   dtype: Optional[torch.dtype] = None,
                   watch: Optional[Dict[str, Tuple[list, list]]] = None,
                   mask: bool = True, reference: Any = None) -> Tuple[Any, Any, nn.Module]:
    """The mask-versus-prune experiment, written once: on two copies of ``model`` (eval mode,
    see :func:`twin`), zero the ``(group, units)`` of ``cuts`` in one (in the shared tensors,
    put back right after its forward, see :func:`masked_in_place`) and remove them from the
    other, run both on ``example_inputs``. Returns ``(masked output, pruned output, pruned copy)``;
    ``model`` is left as it was. ``inside``: a list that holds, while the pruned copy runs,
    ``(name, class)`` of the modules whose forward is in progress (to say where a forward broke).
    ``dtype``: run the experiment with both copies (then full copies) and the floating inputs in
    this precision. ``watch``: module name → two lists that receive that module's outputs in the
    masked and the pruned copy. ``mask=False``: the first copy runs unmasked (a shape check
    compares shapes only), or does not run at all where ``reference`` (the model's outputs, as
    shape-only stand-ins) is given. Raises :class:`MaskedBroke` when the masked copy cannot run."""
    if reference is not None and not mask and dtype is None and not watch:
        pruned = twin(model)
        cut_groups(pruned, cuts)
        with torch.no_grad(), _inside(pruned, inside):
            return reference, forward(pruned, example_inputs), pruned
    if dtype is not None:   # ``Module.to`` converts parameters in place: nothing may be shared
        masked, pruned = copy.deepcopy(model).eval().to(dtype), copy.deepcopy(model).eval().to(dtype)
        convert = lambda x: pytree.tree_map(  # noqa: E731
            lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, x)
        example_inputs = Outputs(convert(example_inputs.inputs), example_inputs.keys) \
            if isinstance(example_inputs, Outputs) else convert(example_inputs)
        for group, units in cuts if mask else []:
            group.zero_(units, model=masked)
    else:   # the masked run zeroes the shared tensors in place and puts them back after
        masked, pruned = _as_masked(model), twin(model)
    cut_groups(pruned, cuts)
    hooks = []
    for name, (got_m, got_p) in (watch or {}).items():
        for copy_, got in ((masked, got_m), (pruned, got_p)):
            hooks.append(copy_.get_submodule(name).register_forward_hook(
                lambda _m, _a, out, got=got: got.extend(t.detach() for t in flat_tensors(out))))
    try:
        with torch.no_grad():
            try:
                with masked_in_place(cuts if dtype is None and mask else [], masked):
                    a = forward(masked, example_inputs)
            except Exception as e:
                raise MaskedBroke(f"{type(e).__name__}: {e}") from e
            with _inside(pruned, inside):
                return a, forward(pruned, example_inputs), pruned
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def _inside(model: nn.Module, inside: Optional[List[Tuple[str, str]]]) -> Iterator[None]:
    """While active, ``inside`` holds ``(name, class)`` of the modules of ``model`` whose forward
    is in progress (``None``: nothing recorded)."""
    if inside is None:
        yield
        return

    def leave(*_):
        if inside:
            inside.pop()
    hooks = []
    for name, m in model.named_modules():
        hooks.append(m.register_forward_pre_hook(lambda _m, _a, n=name: inside.append((n, type(_m).__name__))))
        hooks.append(m.register_forward_hook(leave))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def _low_precision(model: nn.Module) -> bool:
    return any(p.is_floating_point() and p.dtype != torch.float64
               for p in itertools.chain(model.parameters(), model.buffers()))


def experiment(model: nn.Module, example_inputs: Any, cuts, exact: bool,
               inside: Optional[List[Tuple[str, str]]] = None,
               scopes: Optional[Scopes] = None, reference: Any = None) -> Tuple[Optional[Mismatch], nn.Module]:
    """``(why masked and pruned outputs differ or None, the pruned copy)``.

    With ``scopes`` (:func:`.scope.capture`), the experiment runs on the innermost module that
    holds every use of what the cuts change, replaying the inputs it received, and moves out
    (at last to the whole model) while that module's outputs differ; a forward that breaks on
    the cut there breaks in the whole model too. The pruned copy returned is then that module's
    stand-in (:func:`.scope.host_model`).

    A value mismatch in float32 (or lower) is measured again in float64 copies: removing units
    changes the order of the sums in every layer downstream, and the rest of a network can
    amplify that round-off past any fixed tolerance (large weights, re-estimated BatchNorm
    statistics); a wrong channel map differs at any precision, round-off does not.

    For an exact group the outputs of the layers that read its channels (its ``"in"`` layers)
    are compared too, relative to their own magnitude: a wrong map there can be invisible at the
    model's output (a small randomly initialised transformer's attention barely moves its
    logits).

    ``reference``: the whole model's outputs on ``example_inputs`` (shape-only stand-ins), which a
    shape check compares with instead of running an unmasked copy."""
    for host in scopes.hosts(model, [g for g, _ in cuts]) if scopes is not None else []:
        try:
            why, pruned = _experiment(host_model(model, host, scopes), (), cuts, exact, inside)
        except MaskedBroke:
            continue
        if why is None:
            return None, pruned
        # an output of the host that changes (per-head attention weights) may be one its caller drops
    return _experiment(model, example_inputs, cuts, exact, inside, reference)


def _experiment(model: nn.Module, example_inputs: Any, cuts, exact: bool,
                inside: Optional[List[Tuple[str, str]]], reference: Any = None) -> Tuple[Optional[Mismatch], nn.Module]:
    outs = {i.module for g, _ in cuts for i in g.items if i.role != "in"}
    removed = removed_outputs(cuts)
    consumers = sorted({i.module for g, _ in cuts for i in g.items if i.role == "in" and i.module is not None
                        and (i.module not in outs or removed.get(i.module) is not None)}) if exact else []

    def run(dtype=None, inside=None) -> Tuple[Optional[Mismatch], nn.Module]:
        watch = {n: ([], []) for n in consumers}
        a, b, pruned = mask_and_prune(model, example_inputs, cuts, inside, dtype, watch, mask=exact,
                                      reference=reference)
        why = compare(a, b, exact)
        for n, (got_m, got_p) in watch.items():
            if why is None and n in removed:   # a layer whose outputs are cut too: its kept ones
                got_m, why = _kept(got_m, got_p, removed[n], n)
            if why is None:
                why = compare(got_m, got_p, True, relative=True, what=f"the output of {n!r}, tensor")
        return why, pruned

    why, pruned = run(inside=inside)
    if why is not None and why.kind == "value" and exact and _low_precision(model):
        try:
            again, _ = run(torch.float64)
        except Exception:   # an op without float64 support: the float32 answer stands
            return why, pruned
        if again is None:
            return None, pruned
    return why, pruned


def removed_outputs(cuts) -> Dict[str, Optional[torch.Tensor]]:
    """Layer name → the indices of its output channels that ``cuts`` remove, for every layer
    whose outputs they cut: read from the layer's own tensors (a Linear's weight rows and bias, a
    Conv1D's weight columns), ``None`` where those disagree or the cut reaches the layer through
    other tensors only (its outputs cannot be compared by index)."""
    seen: Dict[str, Dict[Tuple[str, int], torch.Tensor]] = {}
    unclear = set()
    for g, units in cuts:
        units = torch.as_tensor(list(units), dtype=torch.long)
        for it in g.items:
            if it.role == "in" or it.module is None:
                continue
            if it.owner != it.module:
                unclear.add(it.module)
                continue
            sel = torch.isin(it.unit, units)
            if sel.any():
                key = (it.attr, it.dim)
                got = seen.setdefault(it.module, {})
                got[key] = torch.cat([got[key], it.index[sel]]) if key in got else it.index[sel]
    out: Dict[str, Optional[torch.Tensor]] = {}
    for m in unclear | set(seen):
        sets = [torch.unique(v) for v in seen.get(m, {}).values()]
        out[m] = sets[0] if m not in unclear and sets and all(torch.equal(sets[0], v) for v in sets[1:]) else None
    return out


def _kept(masked: List[torch.Tensor], pruned: List[torch.Tensor], gone: torch.Tensor,
          name: str) -> Tuple[List[torch.Tensor], Optional[Mismatch]]:
    """The masked outputs of layer ``name`` at the channels the pruned one keeps: along the one
    dimension where their shapes differ by the ``gone`` channels (else a mismatch: the check moves
    to smaller sets of groups)."""
    kept = []
    for x, y in zip(masked, pruned):
        diff = [d for d in range(x.dim()) if x.dim() == y.dim() and x.shape[d] != y.shape[d]]
        if not diff:
            kept.append(x)
            continue
        d = diff[0]
        if len(diff) > 1 or x.shape[d] - y.shape[d] != len(gone) or int(gone.max()) >= x.shape[d]:
            return masked, Mismatch("shape", f"the output of {name!r} has shape {tuple(y.shape)} after pruning, "
                                             f"{tuple(x.shape)} after masking")
        keep = torch.ones(x.shape[d], dtype=torch.bool)
        keep[gone] = False
        kept.append(x.index_select(d, keep.nonzero().flatten().to(x.device)))
    return kept, None


#: the share of a group's units a check removes (at least one, never all)
FRACTION = 0.25
#: ... in a shape check: nothing is masked there, and the pruned copy costs what it keeps
SHAPE_FRACTION = 0.75


def check_units(group) -> List[int]:
    """The units a check of ``group`` removes (reproducible, seeded by its id)."""
    return group.sample(FRACTION if group.exact else SHAPE_FRACTION, seed=group.id)


def check_group(model: nn.Module, example_inputs: Any, group, fraction: Optional[float] = None,
                scopes: Optional[Scopes] = None, units: Optional[List[int]] = None) -> Optional[str]:
    """Mask a copy, prune another copy, compare outputs; ``None`` when they agree, else the reason
    (``fraction``: of the units removed, default :func:`check_units`'s; ``units``: exactly these;
    ``scopes``: check on the innermost module that can, see :func:`experiment`)."""
    if units is None:
        units = check_units(group) if fraction is None else group.sample(fraction, seed=group.id)
    inside: List[Tuple[str, str]] = []   # modules whose forward is running in the pruned copy
    try:
        why, _ = experiment(model, example_inputs, [(group, units)], group.exact, inside, scopes)
    except Exception as e:  # a cut that breaks the forward is a refused group, not a crash
        where = ""
        if inside and inside[-1][0]:
            where = " in '{}' ({})".format(*inside[-1])
        return (f"pruning units {units[:8]} breaks the forward{where}: {type(e).__name__}: {e}; the "
                "forward there combines the pruned width with a fixed-size tensor (a buffer, a "
                "parameter or a hard-coded shape)")
    if why is None:
        return None
    if why.kind == "shape":
        return (f"its channels reach a model output ({why}); add the layer producing that output "
                "to ignored_layers, or, where that output is not needed (a hidden state returned "
                "beside the logits), name the outputs a cut must keep: trace(..., outputs=['logits'])")
    return f"verification failed ({why}); the backend's channel map is wrong here"
