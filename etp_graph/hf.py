"""Pruned Hugging Face models that stay Hugging Face models: ``model.config`` made to describe
the pruned model, so ``save_pretrained`` → ``from_pretrained`` round-trips.

Nothing here knows a config field by name. The counts a cut changed are read from the graph:
every kind of group (the same root up to layer numbers) that kept the same number of units in
every layer gives ``(units before, units after)``, and an attention group also gives its heads
per layer (query heads and key/value heads). Each int field of the config whose value is one of
the old counts is a candidate for the new one; fields left ``None`` (GPT-2's ``n_inner``) are
tried with the new counts too. A candidate config is accepted only when a model built from it
(on the meta device: shapes only, no memory) has exactly the pruned model's parameter and
buffer shapes; else the config is left as it was and the reason is returned (use
:func:`etp_graph.save_pruned` for such a model).
"""
from __future__ import annotations

import itertools
import re
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn

from .graph import CoupledGroup

__all__ = ["is_hf_model", "sync_config"]

#: configurations tried at most
MAX_TRIES = 64


def is_hf_model(model: nn.Module) -> bool:
    """A ``transformers.PreTrainedModel`` (checked by its interface: a config with
    ``to_dict``, ``save_pretrained`` and ``from_pretrained``)."""
    cfg = getattr(model, "config", None)
    return hasattr(cfg, "to_dict") and hasattr(model, "save_pretrained") and hasattr(type(model), "from_pretrained")


def _changes(cuts) -> Tuple[Dict[int, Set[int]], List[str]]:
    """old count → new counts it became, and the kinds pruned unevenly across layers."""
    kinds: Dict[Tuple[str, str], List[Tuple[int, int]]] = {}
    for g, before, after in cuts:
        key = re.sub(r"\d+", "*", g.root)
        kinds.setdefault((key, ""), []).append((before, after))
        for layer, per_unit in g.heads.items():
            kinds.setdefault((key, re.sub(r"\d+", "*", layer)), []).append((before * per_unit, after * per_unit))
    out: Dict[int, Set[int]] = {}
    uneven = []
    for (kind, part), pairs in kinds.items():
        if len(set(pairs)) > 1:
            uneven.append(f"{kind}{' (' + part + ' heads)' if part else ''}: {sorted({b for _, b in pairs})}")
            continue
        old, new = pairs[0]
        if old != new:
            out.setdefault(old, set()).add(new)
    return out, uneven


def _shapes(model: nn.Module) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in itertools.chain(model.named_parameters(), model.named_buffers())}


def sync_config(model: nn.Module, cuts: Sequence[Tuple[CoupledGroup, int, int]]) -> Optional[str]:
    """Update ``model.config`` to describe ``model`` after ``cuts``: ``(group, units before,
    units after)`` for every group of the graph. Returns ``None`` when done (or nothing changed),
    else the reason it cannot (the config is then unchanged)."""
    if not is_hf_model(model):
        return "not a Hugging Face model"
    changes, uneven = _changes(cuts)
    if not changes and not uneven:
        return None
    target = _shapes(model)
    base = model.config.to_dict()
    fields = [(f, sorted(changes[v])) for f, v in base.items()
              if isinstance(v, int) and not isinstance(v, bool) and not f.startswith("_") and v in changes]
    loose = [f for f, v in base.items() if v is None and not f.startswith("_")]
    news = sorted({n for ns in changes.values() for n in ns})
    for values in itertools.islice(_smallest_first(fields, loose, news), MAX_TRIES):
        merged = dict(base)
        merged.update(values)
        try:   # the config class validates itself (a width that its head count must divide)
            cfg = type(model.config).from_dict(merged)
        except Exception:
            continue
        if _fits(type(model), cfg, target):
            model.config = cfg
            return None
    why = "no config of the model's class has the pruned shapes"
    if uneven:
        why = "layers of one kind kept different numbers of units (" + "; ".join(uneven[:3]) + \
              "); prune with ETPPruner(..., uniform=True)"
    return why + "; save it with etp_graph.save_pruned instead"


def _smallest_first(fields, loose, news):
    """Config updates to try, fewest changed fields first: a field whose value merely equals an
    old count (``eos_token_id`` equal to a head count) is changed only if the shapes need it."""
    for k in range(1, len(fields) + 1):
        for chosen in itertools.combinations(fields, k):
            for values in itertools.product(*(vals for _, vals in chosen)):
                yield dict(zip((f for f, _ in chosen), values))
    for f in loose:   # a field left unset (``n_inner``) that a count of the cut can fill
        for n in news:
            yield {f: n}


def _fits(cls, cfg, target) -> bool:
    try:
        with torch.device("meta"):
            fresh = cls(cfg)
    except Exception:
        return False
    return _shapes(fresh) == target
