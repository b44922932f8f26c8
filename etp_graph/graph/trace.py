"""``trace()``: model → :class:`ChannelGraph`. The phases, each in its own module:

1. arguments (here) and :mod:`.inputs`: what the model and ``example_inputs`` must be;
2. :mod:`.backend`: Torch-Pruning's ``DependencyGraph`` built over the model, with adapters for
   the layer families it lacks and the shape of every tensor recorded;
3. :mod:`.index_maps`: the channel maps of pads, reshapes, concats and splits, from the shapes;
4. :mod:`.assemble`: each root layer's backend group read through our handlers into a
   :class:`CoupledGroup` of units (or refused with the reason), plus the groups wholly inside a
   layer (attention heads);
5. :mod:`.verify`: every group checked by masking one copy of the model and pruning another;
   a group whose outputs differ goes to ``graph.skipped`` with the reason, never to ``groups``.

Every op the channels pass through is mapped, declared harmless (:mod:`.ops`), or reported in
``graph.unknown_ops``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import re
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch
import torch_pruning as tp
from torch import nn

from ..handlers import get_handler
from ..handlers.base import UNIT_KINDS
from .assemble import (Refused, Tied, internal_groups, item_name, make_group, merge_overlapping, merge_tied,
                       shared_channel_merges, tensor_key, tie_index)
from .backend import Backend, build_backend
from .budget import TIME_LIMIT, Budget, Exhausted, bounded, check_time, one_walk, out_of_time, step_limit
from .discover import _Union, find_attention
from .flow import flow_groups, flow_run, width_with_heads, with_counts, with_tables
from .graph import ChannelGraph, SkippedGroup, layer_graph
from .group import CoupledGroup
from ..log import log, phase, progress
from .index_maps import map_indices
from .inputs import (Outputs, OutputsError, as_call, check_example_inputs, eval_mode, flat_tensors, forward,
                     layer_calls)
from .ops import HARMLESS_OPS, MAPPED_OPS, PRODUCT_OPS, REDUCTIONS, op_name
from .scope import common_prefix, capture, touched
from .shadow import shadow_run
from .verify import check_group, check_units, experiment

__all__ = ["trace", "TraceError"]

#: ``attention_units`` a trace takes: the handlers' kinds, and query heads of grouped-query attention
ATTENTION_UNITS = UNIT_KINDS + ("query_heads",)


class TraceError(ValueError):
    """The model cannot be traced as given; the message names the module and the fix."""


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


def trace(model: nn.Module, example_inputs: Any, ignored_layers: Optional[Iterable[nn.Module]] = None,
          validate: bool = True, attention_units: str = "heads",
          outputs: Optional[Sequence[Any]] = None, time_limit: Optional[float] = TIME_LIMIT) -> ChannelGraph:
    """Trace ``model`` into coupled groups of units.

    Args:
        model: any ``nn.Module``; its training mode is restored afterwards, its weights untouched.
        example_inputs: a Tensor, a tuple of positional arguments, or a dict of keyword arguments.
        ignored_layers: modules whose outputs are never pruned (the task head); their input
            columns still belong to the group that feeds them.
        validate: verify every group by masking a copy and pruning another on ``example_inputs``
            (all groups in one pair first, then apart where that pair disagrees; see
            :mod:`.verify` and :mod:`.scope`); a failing group goes to ``skipped``.
        attention_units: the unit of head-structured groups: ``"heads"`` (a whole head; in
            grouped-query attention a key/value head with the query heads sharing it, or, where
            there is one key/value head (multi-query attention), a query head),
            ``"query_heads"`` (in grouped-query attention the ``s``-th query head of every
            key/value head; else as ``"heads"``) or ``"head_dims"`` (one dimension in every
            head).
        outputs: the model outputs a cut must leave as they are (names of a dict-like output
            such as a Hugging Face ``ModelOutput``, or positions), e.g. ``["logits"]`` for a T5
            whose ``encoder_last_hidden_state`` may narrow with the hidden width; default every
            output.
        time_limit: seconds the trace may take (default 300; ``None``: no limit). What is not
            examined or verified when it runs out is refused with the reason; independently,
            a group whose backend walk does not close is refused (:mod:`.budget`).

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
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_example_inputs(example_inputs)
    _check_model(model, example_inputs)
    if outputs is not None:   # from here on, a forward returns those outputs only
        example_inputs = Outputs(example_inputs, outputs)
    ignored = _ignored_modules(model, ignored_layers)
    if attention_units not in ATTENTION_UNITS:
        raise ValueError(f"attention_units must be one of {ATTENTION_UNITS}, got {attention_units!r}")
    bk = Backend(tp.DependencyGraph())
    with eval_mode(model), bk.tolerant(), contextlib.ExitStack() as stack:
        try:
            with phase(f"trace {type(model).__name__}: backend graph"):
                build_backend(model, example_inputs, bk)
        except Exception:
            _run(model, example_inputs)   # a model that cannot run at all gets the clear error
            raise
        map_indices(bk)
        graph = ChannelGraph(model)
        stack.enter_context(layer_calls(bk.layer_calls))   # every later forward of the trace
        budget = Budget(time_limit, step_limit(len(bk.dg.module2node)), _widest(model, bk))
        try:
            with phase(f"trace {type(model).__name__}: groups"), bounded(budget):
                _collect(bk, graph, example_inputs, ignored, validate, attention_units)
            log.info("trace %s: %d groups, %d skipped", type(model).__name__, len(graph.groups), len(graph.skipped))
        finally:
            graph.__dict__.pop("_ties", None)   # the tie index of this trace (it holds the tensors)
            graph.__dict__.pop("_called", None)
    graph.nodes, graph.edges = layer_graph(bk.dg, _op_label)
    return graph


def _widest(model: nn.Module, bk: Backend) -> int:
    """The largest size of any dimension of the traced tensors and parameters."""
    sizes = [max(f.shape) for f in bk._facts.values() if f.shape]
    sizes += [max(p.shape) for p in model.parameters() if p.dim()]
    return max(sizes + [1])


def _check_model(model: nn.Module, example_inputs: Any) -> None:
    """What a trace cannot work with, each refused with what to pass instead."""
    if isinstance(model, torch.jit.ScriptModule):
        raise TraceError(f"{type(model).__name__} is a TorchScript module: its forward is compiled, so the "
                         "channels cannot be followed; trace the nn.Module before torch.jit.script and "
                         "script the pruned one")
    if type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
        raise TraceError("the model is wrapped by torch.compile: trace and prune model._orig_mod (the module "
                         "before torch.compile), then compile the pruned model")
    tensors = dict(itertools.chain(model.named_parameters(), model.named_buffers()))
    devices = {t.device for t in tensors.values()}
    given = {t.device for t in flat_tensors(as_call(example_inputs))}
    if len(devices) == 1 and given and given != devices:
        raise TraceError(f"example_inputs are on {', '.join(sorted(map(str, given)))} and the model on "
                         f"{next(iter(devices))}; move them to the model's device")
    # parameters only: a buffer may hold -inf on purpose (an attention mask)
    bad = [n for n, t in model.named_parameters() if t.is_floating_point() and not _finite(t)]
    if bad:
        raise TraceError(f"non-finite values (NaN or inf) in {', '.join(map(repr, bad[:3]))}"
                         f"{' and more' if len(bad) > 3 else ''}: masking and pruning cannot be compared; "
                         "fix or re-initialise those tensors first")


def _finite(t: torch.Tensor) -> bool:
    """No NaN or inf in ``t``: its least and largest value (one pass, no copy; NaN propagates)."""
    if not t.numel():
        return True
    try:
        lo, hi = torch.aminmax(t.detach())
    except RuntimeError:   # a dtype without aminmax on this device
        return bool(torch.isfinite(t).all())
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _run(model: nn.Module, example_inputs: Any) -> None:
    try:
        with torch.no_grad():
            forward(model, example_inputs)
    except OutputsError:
        raise
    except Exception as e:
        raise TraceError(f"the model cannot run on example_inputs ({type(e).__name__}: {e}); pass a "
                         "Tensor, a tuple of positional arguments or a dict of keyword arguments "
                         "that model(...) accepts") from e


def _op_label(node) -> str:
    return f"{op_name(node.grad_fn) if node.grad_fn is not None else type(node.module).__name__}#{getattr(node.module, 'id', 0)}"


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


def _keep_attention(graph: ChannelGraph, att, example_inputs, scopes) -> Optional[SkippedGroup]:
    """An attention found from the trace: the first bookkeeping attempt that verifies (always
    verified: the attempts differ only in what the forward reads; on the attention module alone
    where it holds every use of the heads, see :mod:`.scope`). Returns the refusal, not yet
    recorded (:func:`_join_layers` may still keep it)."""
    if att.reason:
        return SkippedGroup(att.root, att.reason)
    problems = []
    for group in att.attempts:
        group._graph, group.id = graph, len(graph.groups)
        problem = check_group(graph.model, example_inputs, group, scopes=scopes)
        if problem is None:
            graph.groups.append(group)
            return None
        problems.append(problem)
    # the attempt that ran to the end says more than one whose forward broke on a stale count
    ran = [p for p in problems if p.startswith("verification failed")]
    return SkippedGroup(att.root, f"attention heads: {(ran or problems)[0]} (tried "
                                  f"{len(att.attempts)} sets of attribute updates)")


def _reorder(graph: ChannelGraph) -> None:
    """Groups in the order of their root layer in ``named_modules()``, ids renumbered to match."""
    order = {n: k for k, (n, _) in enumerate(graph.model.named_modules())}
    old = {id(g): g.id for g in graph.groups}
    graph.groups.sort(key=lambda g: order.get(g.root, len(order)))
    new = {old[id(g)]: k for k, g in enumerate(graph.groups)}
    for k, g in enumerate(graph.groups):
        g.id = k
    graph.unknown_ops = {op: [new[i] for i in ids] for op, ids in graph.unknown_ops.items()}


def _join_layers(graph: ChannelGraph, failed: List[Tuple[Any, SkippedGroup]], example_inputs) -> None:
    """Attentions that fail alone, joined across layers: where a layer hands a tensor shaped by
    its head count to the next (T5's cross-attention makes a zero bias of ``n_heads`` once and
    passes it on), the same heads must go in every such layer. Attentions of one kind (the
    same module class, as many units) become one group whose unit ``k`` is unit ``k`` of each,
    tried with the ``k``-th bookkeeping attempt of each (or its last) and verified like any
    other; what still fails keeps its own reason."""
    kinds: Dict[Tuple[str, int], List[Tuple[Any, SkippedGroup]]] = {}
    for att, why in failed:
        if att.reason or not att.attempts:
            graph.skipped.append(why)
            continue
        host = common_prefix(touched(att.attempts[0]))
        key = (type(graph.model.get_submodule(host)).__name__ if host else "", att.attempts[0].size)
        kinds.setdefault(key, []).append((att, why))
    for members in kinds.values():
        if len(members) > 1:
            for k in range(max(len(att.attempts) for att, _ in members)):
                parts = [att.attempts[min(k, len(att.attempts) - 1)] for att, _ in members]
                heads = {n: h for p in parts for n, h in p.heads.items()}
                joined = CoupledGroup(graph, len(graph.groups), parts[0].root, parts[0].size,
                                      [dataclasses.replace(i, pairs=None) for p in parts for i in p.items], True,
                                      ["attention"], [c for p in parts for c in p.counters], heads)
                if check_group(graph.model, example_inputs, joined) is None:
                    graph.groups.append(joined)
                    break
            else:
                graph.skipped.extend(why for _, why in members)
            continue
        graph.skipped.extend(why for _, why in members)


def _rooted(bk: Backend, graph: ChannelGraph, name: str, m: nn.Module, ignored: Set[nn.Module],
            visited: Set[nn.Module], units: str) -> Any:
    """The group rooted at ``m``'s output channels (not yet verified), a ``SkippedGroup`` with the
    reason, or ``None`` when ``m`` has no output channels."""
    try:
        with one_walk(name):
            tpg = _all_units(bk.dg, m)
    except Exhausted as e:
        visited.add(m)
        return SkippedGroup(name, str(e))
    except Exception as e:  # the backend's index maps broke on this group
        visited.add(m)
        return SkippedGroup(name, f"the tracer backend failed on it: {type(e).__name__}: {e}")
    if tpg is None:
        return None
    for item in tpg:
        if bk.dg.is_out_channel_pruning_fn(item.dep.handler) and isinstance(item.dep.target.module, nn.Module):
            visited.add(item.dep.target.module)
    try:
        with one_walk(name):
            merges = shared_channel_merges(bk, m, tpg)
        return make_group(bk, tpg, name, ignored, 0, graph, merges, units)
    except Exhausted as e:
        return SkippedGroup(name, str(e))
    except Tied as r:   # kept for merge_tied: the other side of the tie may be another group
        return _TiedEntry(name, str(r), r.group)
    except Refused as r:
        return SkippedGroup(name, str(r))


def _check_all(model: nn.Module, example_inputs, groups: List[CoupledGroup], scopes,
               verdicts: Dict[int, Optional[str]], reference: Optional[List[torch.Tensor]] = None) -> None:
    """Record in ``verdicts`` ``id(group)`` → the reason it fails its mask-then-prune check, or
    ``None`` when it holds; a group is recorded as soon as its verdict is known (a time limit
    then refuses only the groups not recorded).

    First all groups together (their sampled units cut at once, in one masked and one pruned
    twin): a model whose groups all hold costs two forwards (a shape check given ``reference``:
    one). Where that disagrees, a group whose cut stays inside one module is checked on that
    module alone (:mod:`.scope`), and the others are halved until each failing one stands alone. Exact and shape-checked groups are never
    mixed; a group alone gets :func:`check_group`'s reason. ``reference``: the model's outputs
    (shapes), standing in for the unmasked copy of a shape check."""
    if not groups:
        return
    if _all_hold(model, example_inputs, groups, reference):
        verdicts.update((id(g), None) for g in groups)
        return
    local = [g for g in groups if scopes.hosts(model, [g])]
    for g in progress(local, "etp_graph: checks"):
        check_time("the verification of every group")
        verdicts[id(g)] = check_group(model, example_inputs, g, scopes=scopes)
    _check_together(model, example_inputs, [g for g in groups if g not in local], verdicts, reference)


def _all_hold(model: nn.Module, example_inputs, groups: List[CoupledGroup],
              reference: Optional[List[torch.Tensor]] = None) -> bool:
    """Masked/pruned pairs for all ``groups`` (their sampled units cut at once) agree: one pair,
    or one per :func:`_compatible` set of exact groups."""
    for part in (_compatible(groups) if groups[0].exact else [groups]):
        cuts = [(g, check_units(g)) for g in part]
        try:
            why, _ = experiment(model, example_inputs, cuts, part[0].exact, reference=reference)
        except Exception:
            return False
        if why is not None:
            return False
    return True


def _compatible(groups: List[CoupledGroup]) -> List[List[CoupledGroup]]:
    """``groups`` in sets where no group reads its channels in a layer whose outputs another
    group of the set cuts in a way a check cannot follow by index. An exact check compares the
    outputs of the layers that read a group's channels (a wrong map there can be invisible at the
    model's output); where another group cuts that layer's outputs, its kept outputs are compared
    (:func:`.verify.removed_outputs`), and where those cannot be told by index, the check would
    be lost in one pair with such a group (MobileBERT's embedding width, read by the layer whose
    outputs are the hidden width)."""
    parts: List[Tuple[List[CoupledGroup], Set[Any], Set[Any]]] = []
    for g in groups:
        ins = {i.module for i in g.items if i.role == "in" and i.module is not None}
        # the layers whose cut outputs cannot be told by index: cut through tensors not their own
        outs = {i.module for i in g.items if i.role != "in" and i.owner != i.module}
        for members, read, cut in parts:
            if not ins & cut and not outs & read:
                members.append(g)
                read.update(ins)
                cut.update(outs)
                break
        else:
            parts.append(([g], set(ins), set(outs)))
    return [members for members, _, _ in parts]


def _check_together(model: nn.Module, example_inputs, groups: List[CoupledGroup],
                    verdicts: Dict[int, Optional[str]], reference: Optional[List[torch.Tensor]] = None) -> None:
    if not groups:
        return
    check_time("the verification of every group")
    if len(groups) == 1:
        verdicts[id(groups[0])] = check_group(model, example_inputs, groups[0])
    elif _all_hold(model, example_inputs, groups, reference):
        verdicts.update((id(g), None) for g in groups)
    else:
        half = len(groups) // 2
        _check_together(model, example_inputs, groups[:half], verdicts, reference)
        _check_together(model, example_inputs, groups[half:], verdicts, reference)


def _collect(bk: Backend, graph: ChannelGraph, example_inputs, ignored: Set[nn.Module], validate: bool,
             units: str) -> None:
    """Every group of the model, in the order of ``named_modules()``: a layer's internal groups,
    an attention found from the trace at its first layer, then the group rooted at the layer's
    output channels (unless an earlier group already covers them); verified, then kept or
    skipped with the reason."""
    model, dg = graph.model, bk.dg
    found_units, units = units, ("heads" if units == "query_heads" else units)   # the handlers' kinds
    graph._called = {n for n, m in model.named_modules(remove_duplicate=False) if m in dg.module2node}
    visited: Set[nn.Module] = set()
    roots = {id(m) for _, m in _root_modules(model, dg, ignored)}
    names = {m: n for n, m in model.named_modules()}
    found = {}
    if any(n.grad_fn is not None and op_name(n.grad_fn) in PRODUCT_OPS for n in dg.module2node.values()):
        # products between activations: attention to find (a model without them needs no shadow run)
        with phase("attention from the shadow run"):
            found = {a.root: a for a in find_attention(shadow_run(model, example_inputs, names), model, graph,
                                                       found_units, ignored)}
    for a in found.values():   # the attention's layers are rooted in its head group, not alone
        visited.update(model.get_submodule(n) for n in a.layers)
    entries: List[Tuple[str, Any]] = []
    for name, m in progress(list(model.named_modules()), "etp_graph: groups"):
        if m in dg.module2node and m not in ignored and get_handler(m) is not None:
            entries += [(name, g) for g in internal_groups(name, m, 0, graph, units)]
        if name in found:
            entries.append((name, found[name]))
        if id(m) in roots and m not in visited:
            late = out_of_time()
            entries.append((name, _rooted(bk, graph, name, m, ignored, visited, units) if late is None
                            else SkippedGroup(name, late.time_left_reason(f"the group rooted at {name!r}"))))
    entries = _join_overlapping(_join_tied(entries, graph), graph)
    pending = [g for _, g in entries if isinstance(g, CoupledGroup)]
    for k, g in enumerate(pending):
        g.id = k   # seeds the units each check samples
    problems: Dict[int, str] = {}
    attempts = [g for a in found.values() if not a.reason for g in a.attempts]
    # the hosts' inputs are recorded only if a check needs them (not when every group holds at once)
    scopes = _Lazy(lambda: capture(model, example_inputs, (pending if validate else []) + attempts))
    firsts = [a.attempts[0] for a in found.values() if not a.reason and a.attempts]
    for k, g in enumerate(firsts):
        g.id = len(pending) + k
    # the attentions' first attempts are settled when they hold together (a pair of their own, or
    # one pair with the exact groups: a model whose groups all hold costs one pair per kind)
    together = len(firsts) > 1 and all(g.exact for g in firsts)
    settled = False
    if validate:
        with phase(f"verification of {len(pending)} groups"):
            verdicts: Dict[int, Optional[str]] = {}
            exact = [g for g in pending if g.exact]
            if together and exact and _all_hold(model, example_inputs, exact + firsts):
                settled = True
                verdicts.update((id(g), None) for g in exact)
            try:
                _check_all(model, example_inputs, [g for g in exact if id(g) not in verdicts], scopes, verdicts)
                _check_all(model, example_inputs, [g for g in pending if not g.exact], scopes, verdicts,
                           bk.outputs)
            except Exhausted as e:   # what is not verified is not returned
                verdicts.update((id(g), str(e)) for g in pending if id(g) not in verdicts)
            problems.update((k, why) for k, why in verdicts.items() if why)
    settled = settled or together and _all_hold(model, example_inputs, firsts)
    failed: List[Tuple[Any, SkippedGroup]] = []
    broke: List[Tuple[CoupledGroup, str]] = []     # refused because their cut broke the forward
    for name, g in entries:
        if g is None:
            continue
        if isinstance(g, SkippedGroup):
            graph.skipped.append(g)
        elif not isinstance(g, CoupledGroup):
            if settled and not g.reason and g.attempts:   # every first attempt held, checked together
                g.attempts[0]._graph, g.attempts[0].id = graph, len(graph.groups)
                graph.groups.append(g.attempts[0])
            else:
                why = _keep_attention(graph, g, example_inputs, scopes)
                if why is not None:
                    failed.append((g, why))
        elif id(g) in problems:
            graph.skipped.append(SkippedGroup(name, problems[id(g)]))
            if "breaks the forward" in problems[id(g)]:
                broke.append((g, problems[id(g)]))
        else:
            _keep(graph, name, g, validate)
    reorder = bool(failed)
    if failed:
        _join_layers(graph, failed, example_inputs)
    splits = any(bk.get(n).split_view or tp.ops.OPTYPE.SPLIT in (n.type, bk.get(n).backend_type)
                 for n in dg.module2node.values())
    still = [att for att, why in failed if any(s is why for s in graph.skipped) and not att.reason and att.attempts]
    if validate and graph.skipped and (splits or still or broke):
        reorder = True
        try:
            _flows(graph, example_inputs, ignored, splits, still, broke)
        except Exhausted:   # out of time: the refusals stand as they are
            pass
        except Exception as e:   # a forward the flow run cannot follow: the same
            log.debug("channel flows skipped: %s: %s", type(e).__name__, e)
    if reorder:
        _reorder(graph)
    graph.skipped += _unknown_layers(bk, graph, ignored)


def _unknown_layers(bk: Backend, graph: ChannelGraph, ignored: Set[nn.Module]) -> List[SkippedGroup]:
    """Leaf modules without a handler whose own weight (a parameter of two or more dims) the
    forward used, and that no group touches: each a refusal with the reason, never silence (PyG's
    ``Linear`` computes ``F.linear`` with its own weight; nothing says which dim is its channels)."""
    used: Set[int] = set()
    for node in bk.dg.module2node.values():
        for nxt, _ in getattr(node.grad_fn, "next_functions", ()) or ():
            var = getattr(nxt, "variable", None)
            if var is not None:
                used.add(id(var))
    touched = {it.owner for g in graph.groups for it in g.items}
    named = {s.root for s in graph.skipped}
    ignored = {id(sub) for m in ignored for sub in m.modules()}
    out = []
    for name, m in graph.model.named_modules():
        if id(m) in ignored or next(m.children(), None) is not None or get_handler(m) is not None \
                or name in touched or name in named:
            continue
        params = [(k, tuple(p.shape)) for k, p in m.named_parameters(recurse=False) if p.dim() >= 2 and id(p) in used]
        if params:
            out.append(SkippedGroup(name, (
                f"{type(m).__module__}.{type(m).__qualname__} has no layer handler: the forward uses its {params[0][0]} {params[0][1]}, "
                "but which of its dims are channels is not known, so nothing through it is pruned; "
                "register a handler for it (etp_graph.handlers.register_handler) or add it to ignored_layers")))
    return out


def _flows(graph: ChannelGraph, example_inputs, ignored: Set[nn.Module], splits: bool, attentions,
           broke: Sequence[Tuple[CoupledGroup, str]] = ()) -> None:
    """What following every channel at once (:mod:`.flow`) adds where roots were refused:
    attentions joined with the width their forward ties the heads to (MaxViT), groups of the
    layers whose channels meet in a channel split (ShuffleNet v2's split, branch, concat and
    shuffle), and groups whose cut broke the forward, with the fixed tables their channels meet
    (Informer's position table) and/or an int attribute the forward reads their size from updated
    (torchvision's ViT). Kept where they pass the mask-then-prune
    check (and, where a count is updated, again with one unit alone), cut nothing a kept group
    cuts and cover a refused root; they replace those refusals."""
    check_time("the channel flows")
    model = graph.model
    flows = flow_run(model, example_inputs, {m: n for n, m in model.named_modules()})
    taken = {(it.owner, it.attr, it.dim, i) for g in graph.groups for it in g.items for i in it.index.tolist()}

    def free(group) -> bool:
        return not any((it.owner, it.attr, it.dim, i) in taken for it in group.items for i in it.index.tolist())

    def keep(group, roots) -> None:
        graph.groups.append(group)
        graph.skipped[:] = [s for s in graph.skipped if s.root not in roots]
        taken.update((it.owner, it.attr, it.dim, i) for it in group.items for i in it.index.tolist())
    for tries, cut, atts in width_with_heads(graph, flows, ignored, attentions):
        roots = {att.root for att in atts} | set(cut)
        for group in tries:
            check_time("the channel flows")
            group.id = len(graph.groups)
            # also one unit alone: a cut of most heads can leave one head whose table broadcasts
            if free(group) and check_group(model, example_inputs, group) is None and \
                    check_group(model, example_inputs, group, units=[0]) is None:
                keep(group, roots)
                break
    for group, cut, why in (flow_groups(graph, flows, ignored, example_inputs) if splits else []):
        refused = {s.root for s in graph.skipped} & set(cut)
        if not refused:
            continue
        if group is None:   # where the splits' balance is why, that says more than the backend
            if why:
                graph.skipped[:] = [SkippedGroup(s.root, why) if s.root in refused else s for s in graph.skipped]
            continue
        if not group.exact or not free(group):
            continue
        check_time("the channel flows")
        group.id = len(graph.groups)
        if check_group(model, example_inputs, group) is None:
            keep(group, set(cut))
    for group, why in broke:
        if group.root not in {s.root for s in graph.skipped}:
            continue    # a group above took its place
        host = re.search(r"breaks the forward in '([^']*)'", why)
        tabled = with_tables(graph, flows, group)
        for counted in ([tabled] if tabled else []) + with_counts(graph, flows, tabled or group,
                                                                   host.group(1) if host else ""):
            check_time("the channel flows")
            counted.id = len(graph.groups)
            if free(counted) and check_group(model, example_inputs, counted) is None and \
                    check_group(model, example_inputs, counted, units=[0]) is None:
                keep(counted, {group.root})
                break


@dataclasses.dataclass
class _TiedEntry:
    root: str
    reason: str
    group: CoupledGroup


def _join_tied(entries: List[Tuple[str, Any]], graph: ChannelGraph) -> List[Tuple[str, Any]]:
    """Groups refused for a tie to another group's layers, joined (:func:`merge_tied`) where
    the join holds every tie; the rest refused with their reason."""
    tied = [(k, e) for k, (_, e) in enumerate(entries) if isinstance(e, _TiedEntry)]
    names = graph._ties[0] if tied else {}
    tensor_of = graph._ties[1] if tied else {}
    link = _Union()
    by_tensor: Dict[int, int] = {}
    for k, e in tied:
        for it in e.group.items:
            t = tensor_of.get(item_name(it))
            if t is not None and len(names[id(t)]) >= 2:
                link.join(by_tensor.setdefault(id(t), k), k)
    sets: Dict[int, List[int]] = {}
    for k, _ in tied:
        sets.setdefault(link.find(k), []).append(k)
    out = list(entries)
    for ks in sets.values():
        merged, why = merge_tied([entries[k][1].group for k in ks], graph) if len(ks) > 1 else (None, "")
        _joined(out, ks, merged, lambda e: e.reason + (f"; joined with the other side: {why}" if why else ""))
    return out


def _joined(out: List[Tuple[str, Any]], ks: List[int], merged: Optional[CoupledGroup], reason) -> None:
    """Entries ``ks`` of ``out`` replaced by ``merged`` (at the first, the others dropped), or
    each refused with ``reason(entry)`` when the join failed."""
    for n, k in enumerate(ks):
        name, e = out[k]
        out[k] = (name, merged if n == 0 else None) if merged is not None else (name, SkippedGroup(e.root, reason(e)))


def _join_overlapping(entries: List[Tuple[str, Any]], graph: ChannelGraph) -> List[Tuple[str, Any]]:
    """Groups that cut the same index of one tensor dimension, joined (:func:`merge_overlapping`):
    a grouped conv reading a concat gives each input slot of its filters one channel of every
    branch, so cutting one branch's channel alone would leave its filter groups uneven (and a
    check of both groups at once can cut them in balance and miss it). A group with bookkeeping
    of its own (counters, heads, an arrangement) is refused instead, with the other's name."""
    at = [(k, e) for k, (_, e) in enumerate(entries) if isinstance(e, CoupledGroup)]
    if len(at) < 2:
        return entries
    if getattr(graph, "_ties", None) is None:
        graph._ties = tie_index(graph.model)
    tensor_of = graph._ties[1]
    uses: Dict[Tuple[Any, int], List[Tuple[int, torch.Tensor]]] = {}
    for k, g in at:
        for it in g.items:
            uses.setdefault((tensor_key(it, tensor_of), it.dim), []).append((k, it.index))
    link = _Union()
    for shared in uses.values():
        if len({k for k, _ in shared}) < 2:   # most tensor dimensions: one group cuts them
            continue
        owner: Dict[int, int] = {}
        for k, index in shared:
            for i in index.unique().tolist():
                o = owner.setdefault(i, k)
                if o != k:
                    link.join(o, k)
    sets: Dict[int, List[int]] = {}
    for k, _ in at:
        sets.setdefault(link.find(k), []).append(k)
    out = list(entries)
    for ks in (ks for ks in sets.values() if len(ks) > 1):
        groups = [entries[k][1] for k in ks]
        roots = ", ".join(repr(g.root) for g in groups)
        plain = all(not g.counters and not g.heads and not g.ordered for g in groups)
        merged, why = merge_overlapping(groups, graph) if plain else (
            None, "one of them changes attributes its forward reads (heads, counts, an ordered arrangement), "
                  "which a joined group cannot carry; their channels are kept")
        _joined(out, ks, merged, lambda _: f"cuts the same channels as the groups rooted at {roots} "
                                           f"(a grouped layer reads them together) and cannot join them: {why}")
    return out


class _Lazy:
    """Made on first use."""

    def __init__(self, make):
        self._make, self._value = make, None

    def __getattr__(self, name):
        if self._value is None:
            self._value = self._make()
        return getattr(self._value, name)


def _keep(graph: ChannelGraph, name: str, group: CoupledGroup, validate: bool) -> None:
    unknown = [o for o in group.ops if o not in HARMLESS_OPS | MAPPED_OPS | REDUCTIONS]
    if unknown and not validate:
        graph.skipped.append(SkippedGroup(name, f"passes through unverified ops {unknown}; "
                                                "trace with validate=True to verify it"))
        return
    group.id = len(graph.groups)
    for o in unknown:
        graph.unknown_ops.setdefault(o, []).append(group.id)
    graph.groups.append(group)
