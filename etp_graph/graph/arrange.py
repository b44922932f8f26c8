"""Split–shuffle stages that no balanced set of units can cut, cut with their channels re-arranged.

A ShuffleNet v2 stage splits its channels in halves, passes one half on, sends the other through
a branch and shuffles the two together, block after block: where a channel is read again is set
by its position alone. A cut that keeps every channel's position (:func:`.flow.balanced`) does
not exist in a deep, narrow stage (torchvision's ``shufflenet_v2_x0_5`` stage 3: eight blocks of
48 channels a half). A narrower stage of the same structure can still compute what the wider one
computed without the channels cut, if every channel keeps its *fate*: the layer that writes it and
the layers that read it (or pass it on). At a width ``w`` every row a writing layer fills has a
fate, set by the structure; the stage can go to width ``w`` when, for every fate, the wider stage
has at least as many channels as the narrower one has rows (per fate, the extra ones are cut).
The survivors are then re-arranged: each writing layer puts them in the rows of their fate, each
layer that reads or passes them takes its columns in the new order.

The fates at a width are read from the structure itself, not computed from a formula: the stage is
cut naively to that width in a copy (every writing layer keeps its first rows) and one flow run
(:func:`.flow.flow_run`) of that copy says where each row goes. Widths are tried from the widest
down; a width is taken when its fates fit in the last one taken, so the cuts nest. The group's
unit ``k`` (``k ≥ 1``) is the channels one step of that chain removes (the last step is unit 1,
the first unit ``size - 1``); unit 0 is what the narrowest width keeps. Only the last units can
go (:attr:`.group.CoupledGroup.ordered`); each removal has its arrangement.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Dict, FrozenSet, List, Optional, Sequence, Set, Tuple

import torch

from ..handlers import get_handler
from .budget import check_time
from .group import CoupledGroup, SliceItem, cut_groups
from .verify import twin

__all__ = ["arranged_group", "MAX_WIDTHS"]

#: widths a stage tries (one flow run of a narrowed copy each)
MAX_WIDTHS = 256

Fate = Tuple[str, FrozenSet[str]]


def _slots(flows, births: Sequence[str]) -> Dict[Tuple[str, str], torch.Tensor]:
    """``(layer, role) → id per channel`` of every layer that writes, passes or reads ids."""
    out = {(b, "out"): torch.arange(flows.sources[b][0], flows.sources[b][0] + flows.sources[b][1]) for b in births}
    out.update({(n, "out"): ids for n, ids in flows.passes.items()})
    out.update({(n, "in"): ids for n, ids in flows.reads.items() if n not in flows.passes})
    return out


def _fates(flows, births: Sequence[str]) -> Dict[int, Fate]:
    readers: Dict[int, Set[str]] = {}
    for (name, _), ids in _slots(flows, births).items():
        if name in births:
            continue
        for i in ids.tolist():
            if i >= 0:
                readers.setdefault(i, set()).add(name)
    return {i: (b, frozenset(readers.get(i, ()))) for b in births
            for i in range(flows.sources[b][0], flows.sources[b][0] + flows.sources[b][1])}


def _last(modules, cut: Dict[Tuple[str, str], int]) -> List[SliceItem]:
    """Slices removing the last ``cut[(layer, role)]`` channels of each layer (as unit 1)."""
    items = []
    for (name, role), k in cut.items():
        m = modules[name]
        n = get_handler(m).num_channels(m, role)
        pos = torch.arange(n - k, n)
        for s in get_handler(m).slices(m, role):
            at, index = s.index(pos)
            owner, _, attr = s.attr.rpartition(".")
            items.append(SliceItem(f"{name}.{owner}" if owner else name, attr, s.dim, torch.ones(len(at), dtype=torch.long),
                                   index, name, role, pos[at]))
    return items


def arranged_group(graph, flows, example_inputs, births: List[str], ids: Set[int], build_items,
                   flow_run) -> Tuple[Optional[CoupledGroup], str]:
    """The ordered group of a split–shuffle stage whose layers ``births`` write the channels
    ``ids`` (see the module docstring), or ``(None, reason)``. ``build_items(unit_of)`` makes the
    slices of ``unit_of`` (id → unit), as :func:`.flow.flow_items`."""
    model = graph.model
    slots = {key: got for key, got in _slots(flows, births).items() if any(int(i) in ids for i in got.tolist())}
    # every layer the stage touches must hold its channels only (nothing else to keep in place),
    # and no channel may meet another element-wise (it would need the same place as that one)
    for (name, role), got in slots.items():
        held = [int(i) in ids for i in got.tolist()]
        if any(held) and not all(held):
            return None, f"'{name}' holds the stage's channels beside others"
    if any(int(i) in ids for pair in flows.ties for i in pair.flatten().tolist()):
        return None, "its channels meet others element-wise"
    modules = dict(model.named_modules())
    sizes = {b: flows.sources[b][1] for b in births}
    step = math.gcd(*sizes.values())
    if any(len(got) % step for got in slots.values()):
        return None, f"its layers' widths are not multiples of {step}"
    fate = _fates(flows, births)
    have = Counter(fate.values())
    chain: List[Tuple[Counter, object]] = []
    for w in range(step - 1, 0, -1):
        if step - w > MAX_WIDTHS:
            break
        check_time("the channel flows")
        # the structure at width w: every layer keeps its first w / step of its channels
        probe = CoupledGroup(graph, -1, births[0], 2, _last(modules, {
            key: len(got) - len(got) // step * w for key, got in slots.items()}), True)
        copy = twin(model)
        try:
            cut_groups(copy, [(probe, [1])])
            narrowed = flow_run(copy, example_inputs, {m: n for n, m in copy.named_modules()})
        except Exception:      # this width does not run: try the next
            continue
        if any(b not in narrowed.sources for b in births):
            continue
        got = Counter(_fates(narrowed, births).values())
        if all(have[f] >= c for f, c in got.items()):
            chain.append((got, narrowed))
            have = got
    if not chain:
        return None, "no narrower width of the stage keeps every channel's layers"
    # units: the channels each step removes, per fate the last ones (highest rows) of their layer
    size = len(chain) + 1
    alive = {f: sorted((i for i in fate if fate[i] == f), key=lambda i: -i) for f in set(fate.values())}
    unit_of = {i: 0 for i in fate}
    before = Counter(fate.values())
    survivors: List[Dict[Fate, List[int]]] = []
    for r, (got, _) in enumerate(chain, start=1):
        for f in alive:
            gone = before[f] - got[f]
            for i in alive[f][:gone]:
                unit_of[i] = size - r
            alive[f] = alive[f][gone:]
        before = got
        survivors.append({f: sorted(v) for f, v in alive.items()})
    made = build_items(unit_of)
    if made is None:
        return None, ""
    items, exact = made
    group = CoupledGroup(graph, 0, births[0], size, items, exact, ["Concat", "Reshape", "Split"])
    pos_of = {key: {int(i): k for k, i in enumerate(got.tolist())} for key, got in slots.items()}
    arrangements = []
    for (_, narrowed), alive_r in zip(chain, survivors):
        # each narrowed row gets a survivor of its fate (in the order of both)
        new_fate = _fates(narrowed, births)
        old_of: Dict[int, int] = {}
        rows: Dict[Fate, List[int]] = {}
        for i in sorted(new_fate):
            rows.setdefault(new_fate[i], []).append(i)
        for f, new_ids in rows.items():
            if len(alive_r.get(f, [])) != len(new_ids):
                return None, "the widths' fates do not match"
            old_of.update(zip(new_ids, alive_r[f]))
        orders: Dict[Tuple[str, str, int], torch.Tensor] = {}
        channels: Dict[Tuple[str, str], torch.Tensor] = {}
        narrowed_slots = _slots(narrowed, births)
        for key in slots:
            new_ids = narrowed_slots.get(key)
            if new_ids is None:
                return None, f"'{key[0]}' does not run at the narrower width"
            try:
                order = torch.tensor([pos_of[key][old_of[int(i)]] for i in new_ids.tolist()], dtype=torch.long)
            except KeyError:
                return None, f"'{key[0]}' reads other channels at the narrower width"
            name, role = key
            m = modules[name]
            for s in get_handler(m).slices(m, role):
                at, index = s.index(order)
                if not torch.equal(at, torch.arange(len(order))):
                    return None, f"'{name}' holds several entries per channel"
                owner, _, attr = s.attr.rpartition(".")
                orders[(f"{name}.{owner}" if owner else name, attr, s.dim)] = index
            channels[key] = order
        arrangements.append((orders, channels))
    group.arrangements = arrangements
    return group, ""
