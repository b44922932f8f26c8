"""``ETPPruner``: trace → regularise (training) → rank → remove coupled units → report.

Usage in a user's own loop::

    pruner = eg.ETPPruner(model, x, ignored_layers=[model.fc],
                          config=eg.ETPConfig(beta=1e-4), target_speedup=2.0)
    for images, labels in loader:
        loss = F.cross_entropy(model(images), labels) + pruner.penalty()
        opt.zero_grad(); loss.backward(); opt.step()
    report = pruner.step()      # atomic: on any error the model is unchanged
    print(report)
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import re
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, TypeVar

import torch
from torch import nn

from .counting import compare_latency, count_macs, count_params
from .graph import CoupledGroup, trace
from .graph.atomic import Snapshot
from .graph.budget import TIME_LIMIT
from .graph.group import cut_groups, prune_groups
from .graph.verify import twin
from .hf import is_hf_model, sync_config
from .importance import removal_order
from .log import log, phase
from .planning import MacModel
from .torque import ETPConfig, Regularizer, make_regularizer

T = TypeVar("T")

#: The default soft cap: no group loses more than three quarters of its units while a target can
#: be reached otherwise (ResNet-56 and Informer, every method: docs/results.md)
SOFT_CAP = 0.75
#: the planner's unit costs (``ETPPruner(score=...)``)
SCORES = ("share", "kept")
#: the groups the soft cap holds back: only the residual streams (:func:`is_stream`; the default:
#: every method gains or is level where it changes the plan, docs/results.md) or every group
SOFT_CAP_ON = ("streams", "all")


def is_stream(group: CoupledGroup) -> bool:
    """A residual stream: channels that layers add into (the group passes through an ``Add``:
    a ResNet stage's width, a transformer's embedding width), not an attention's heads."""
    return "Add" in group.ops and not group.heads


__all__ = ["ETPPruner", "PrunePlan", "PruneReport", "GroupResult", "is_stream"]

#: ``target_speedup`` is reached within this relative margin (MACs are counted, not estimated).
SPEEDUP_TOLERANCE = 0.03


@dataclasses.dataclass(frozen=True)
class GroupResult:
    root: str
    units_before: int
    units_after: int
    removed: List[int]


@dataclasses.dataclass
class PruneReport:
    """What :meth:`ETPPruner.step` did; ``print(report)`` gives a table."""

    target: str
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    groups: List[GroupResult]
    latency_before: Optional[Dict[str, float]] = None
    latency_after: Optional[Dict[str, float]] = None
    #: Hugging Face models: why ``model.config`` could not be made to describe the pruned model
    #: (``None``: it was, or nothing needed it; see :func:`etp_graph.hf.sync_config`)
    config_note: Optional[str] = None

    @property
    def speedup(self) -> float:
        """MACs speed-up, ``macs_before / macs_after``."""
        return self.macs_before / max(self.macs_after, 1)

    @property
    def latency_speedup(self) -> Optional[float]:
        """Measured latency speed-up (``None`` when not measured): the median over rounds of the
        paired before/after ratio (:func:`etp_graph.compare_latency`)."""
        if not (self.latency_before and self.latency_after):
            return None
        paired = self.latency_after.get("ratio_to_first")
        return paired if paired is not None else self.latency_before["median_ms"] / self.latency_after["median_ms"]

    @property
    def units_kept(self) -> Dict[str, int]:
        return {g.root: g.units_after for g in self.groups}

    def as_dict(self) -> Dict[str, Any]:
        """The numbers as plain JSON-ready values: ``[before, after]`` pairs, the speed-up, the
        median latencies in ms and the measured latency speed-up (``None`` when not measured) and
        the units kept per group."""
        lat = None
        if self.latency_before and self.latency_after:
            lat = [self.latency_before["median_ms"], self.latency_after["median_ms"]]
        return {"macs": [self.macs_before, self.macs_after], "params": [self.params_before, self.params_after],
                "speedup": self.speedup, "latency_ms": lat, "latency_speedup": self.latency_speedup,
                "units_kept": self.units_kept}

    def __str__(self) -> str:
        rows = [("", "before", "after", "ratio"),
                ("MACs", f"{self.macs_before:,}", f"{self.macs_after:,}", f"{self.speedup:.2f}x"),
                ("params", f"{self.params_before:,}", f"{self.params_after:,}",
                 f"{self.params_before / max(self.params_after, 1):.2f}x")]
        if self.latency_before and self.latency_after:
            b, a = self.latency_before["median_ms"], self.latency_after["median_ms"]
            rows.append((f"latency ms (median, {self.latency_before['threads']} threads)",
                         f"{b:.2f}", f"{a:.2f}", f"{self.latency_speedup:.2f}x"))
        w = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [f"ETP prune ({self.target})"]
        lines += ["  ".join(r[i].rjust(w[i]) if i else r[i].ljust(w[i]) for i in range(4)) for r in rows]
        kept = sum(g.units_after for g in self.groups)
        total = sum(g.units_before for g in self.groups)
        lines.append(f"units kept: {kept}/{total} in {len(self.groups)} groups")
        lines += [f"  {g.root}: {g.units_before} -> {g.units_after}" for g in self.groups
                  if g.units_after != g.units_before]
        if self.config_note:
            lines.append(f"model.config not updated: {self.config_note}")
        return "\n".join(lines)


class ETPPruner:
    """ETP regularisation and pruning over the coupled groups of any model.

    Args:
        model: the model; pruned in place by :meth:`step`. A ``DistributedDataParallel`` model
            is traced, penalised and pruned through its ``.module`` (every rank prunes rank 0's
            plan); wrap ``pruner.model`` again after :meth:`step`, as its tensors are new.
        example_inputs: a Tensor, a tuple of positional arguments or a dict of keyword arguments.
        ignored_layers: modules never pruned or regularised (the task head).
        config: :class:`ETPConfig` (default ``ETPConfig(beta=1e-4)``).
        pruning_ratio: remove this fraction of the units of every group (lowest importance first).
        target_speedup: remove units globally, by importance per MAC saved (a unit's share of its
            group's total importance, divided by the MACs its removal saves), until the fvcore MACs
            speed-up reaches this (within 3 %).
        threshold: remove the units whose normalised norm (unit norm / largest unit norm of its
            group) is below this.

    Exactly one of ``pruning_ratio``, ``target_speedup``, ``threshold`` must be given.
    ``attention_units``: ``"heads"`` (default), ``"query_heads"`` or ``"head_dims"``, the unit of
    attention groups (:func:`etp_graph.trace`).
    ``soft_cap`` (``target_speedup`` only, default :data:`SOFT_CAP` = 0.75): no residual stream
    (see ``soft_cap_on``) loses more than this fraction of its units while the target can be
    reached otherwise; past that, a stream may go to 7/8, then 15/16 … (each step halves what it
    keeps), one step at a time. Without it the planner's per-MAC ranking empties the MAC-cheapest
    wide group first: a residual stream, a transformer's embedding width (measured, every method
    loses there; docs/results.md). ``None``: one ranking for every unit (every group down to one).
    ``soft_cap_on``: ``"streams"`` (default): only the residual streams (:func:`is_stream`) are
    held back; heads, FFN units and a block's inner channels go by the one ranking. ``"all"``:
    every group is (the default before 2026-12-04; on MiniLM holding back heads and FFN units cost
    1.6–12.5 points, on ResNet-56 and Informer every method does as well or better with
    ``"streams"``: docs/results.md).
    ``score`` (``target_speedup`` only): what a unit's removal costs, per MAC it saves:
    ``"share"`` (default), its share of its group's total importance; ``"kept"``, its share of
    what its group still keeps when it goes (its importance over the sum of its own and every
    unit removed after it), which grows as a group thins: the costs of a group's removals add
    up to about ``-log`` of the fraction of its importance kept, so a plan weighs a group
    halved twice like two groups halved once, instead of emptying the cheapest one.
    ``max_pruning_ratio`` (``target_speedup`` only): a hard cap: remove at most this fraction of
    any group's units (a target past it is unreachable).
    ``group_filter``: only the groups for which it returns ``True`` are regularised and pruned;
    the others keep every unit (e.g. ``lambda g: g.size != 384`` keeps a BERT's hidden width).
    ``round_to``: every group keeps a multiple of this many units (or all of them, when it has
    fewer), as Torch-Pruning's ``round_to``: widths such as 51 channels run slower on real
    kernels than 48 or 56. The plan removes fewer units where it rounds, so the speed-up it
    reaches can exceed ``target_speedup`` by up to one rounding step per group.
    ``importance``: a callable ``group -> Tensor[group.size]`` ranking the units (lowest removed
    first); default the coupled norm. Every target (ratio, threshold, speed-up) uses it.
    ``uniform`` (``target_speedup``): the groups of one kind (the same root name up to layer
    numbers, e.g. every ``model.layers.*.mlp.gate_proj``) keep the same number of units, each
    its own most important ones, so a Hugging Face model's config can describe the pruned model
    (see :func:`etp_graph.hf.sync_config`).
    ``outputs``: the model outputs a cut must leave as they are (passed to :func:`trace`), e.g.
    ``["logits"]`` for a T5, whose ``encoder_last_hidden_state`` narrows with its hidden width.
    ``time_limit``: seconds the trace may take (passed to :func:`trace`; ``None``: no limit).
    """

    def __init__(self, model: nn.Module, example_inputs: Any, ignored_layers: Optional[Iterable[nn.Module]] = None,
                 config: Optional[ETPConfig] = None, pruning_ratio: Optional[float] = None,
                 target_speedup: Optional[float] = None, threshold: Optional[float] = None,
                 attention_units: str = "heads", max_pruning_ratio: Optional[float] = None,
                 soft_cap: Optional[float] = SOFT_CAP, score: str = "share", soft_cap_on: str = "streams",
                 group_filter: Optional[Callable[[CoupledGroup], bool]] = None, round_to: Optional[int] = None,
                 importance: Optional[Callable[[CoupledGroup], torch.Tensor]] = None, uniform: bool = False,
                 outputs: Optional[Sequence[Any]] = None, time_limit: Optional[float] = TIME_LIMIT):
        given = {k: v for k, v in (("pruning_ratio", pruning_ratio), ("target_speedup", target_speedup),
                                   ("threshold", threshold)) if v is not None}
        if len(given) != 1:
            raise ValueError("give exactly one of pruning_ratio, target_speedup, threshold; got "
                             f"{sorted(given) or 'none'}")
        (self.mode, self.amount), = given.items()
        if self.mode == "pruning_ratio" and not 0 < pruning_ratio < 1:
            raise ValueError(f"pruning_ratio must be in (0, 1), got {pruning_ratio}")
        if self.mode == "target_speedup" and not target_speedup > 1:
            raise ValueError(f"target_speedup must be > 1, got {target_speedup}")
        if self.mode == "threshold" and not 0 < threshold < 1:
            raise ValueError(f"threshold must be in (0, 1) (it is relative to each group's largest "
                             f"unit norm), got {threshold}")
        self.config = config if config is not None else ETPConfig(beta=1e-4)
        if not isinstance(self.config, ETPConfig):
            raise TypeError(f"config must be an etp_graph.ETPConfig, got {type(self.config).__name__}")
        #: the model traced, penalised and pruned: a ``DistributedDataParallel`` (or
        #: ``DataParallel``) wrapper's ``.module``; wrap the pruned model again after :meth:`step`
        self.model = _unwrapped(model)
        self.example_inputs = example_inputs
        self.ignored_layers = list(ignored_layers) if ignored_layers is not None else []
        self.attention_units = attention_units
        if max_pruning_ratio is not None and not 0 < max_pruning_ratio < 1:
            raise ValueError(f"max_pruning_ratio must be in (0, 1), got {max_pruning_ratio}")
        self.max_pruning_ratio = max_pruning_ratio
        if soft_cap is not None and not 0 < soft_cap < 1:
            raise ValueError(f"soft_cap must be None or in (0, 1), got {soft_cap}")
        self.soft_cap = soft_cap
        if soft_cap_on not in SOFT_CAP_ON:
            raise ValueError(f"soft_cap_on must be one of {SOFT_CAP_ON}, got {soft_cap_on!r}")
        self.soft_cap_on = soft_cap_on
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        self.score = score
        if group_filter is not None and not callable(group_filter):
            raise TypeError(f"group_filter must be a callable taking a CoupledGroup, got {type(group_filter).__name__}")
        self.group_filter = group_filter
        if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
            raise ValueError(f"round_to must be None or an int >= 1, got {round_to!r}")
        self.round_to = round_to
        if importance is not None and not callable(importance):
            raise TypeError(f"importance must be a callable taking a CoupledGroup, got {type(importance).__name__}")
        self._importance = importance
        self.uniform = bool(uniform)
        self.outputs = outputs
        if time_limit is not None and not time_limit >= 0:
            raise ValueError(f"time_limit must be None or seconds >= 0, got {time_limit!r}")
        self.time_limit = time_limit
        self._build()

    def _build(self) -> None:
        self.graph = trace(self.model, self.example_inputs, self.ignored_layers,
                           attention_units=self.attention_units, outputs=self.outputs,
                           time_limit=self.time_limit)
        if self.group_filter is not None:     # the others stay as they are: groups are independent
            self.graph.groups[:] = [g for g in self.graph.groups if self.group_filter(g)]
        self.regularizer: Regularizer = make_regularizer(self.graph.groups, self.config, self.model)

    # ------------------------------------------------------------------------------ training
    def penalty(self) -> torch.Tensor:
        """The ETP penalty (differentiable); add it to the task loss."""
        return self.regularizer.penalty()

    def apply_(self) -> None:
        """Add the penalty's gradient to ``.grad`` (call after ``loss.backward()``)."""
        self.regularizer.apply_()

    def decay_(self, lr: float) -> None:
        """Decoupled ETP step ``θ ← θ − lr·∂R/∂θ`` (call after ``optimizer.step()``; for Adam)."""
        self.regularizer.decay_(lr)

    # ------------------------------------------------------------------------------ ranking
    def importance(self, group: CoupledGroup) -> torch.Tensor:
        """``Tensor[size]``: the score that ranks a group's units (lowest removed first): the
        ``importance`` callable given to the constructor, else the unit's coupled norm (L2, or the
        L1 sum for ``norm="l1"``)."""
        if self._importance is not None:
            scores = torch.as_tensor(self._importance(group)).detach().flatten()
            if scores.numel() != group.size:
                raise ValueError(f"importance({group.root!r}) returned {scores.numel()} scores for a group "
                                 f"of {group.size} units; return one score per unit")
            return scores.float().cpu()
        with torch.no_grad():
            s = group.unit_sums(self.model, self.config.norm)
        return s.sqrt() if self.config.norm == "l2" else s

    def _ranked(self, group: CoupledGroup):
        """``(scores, order)``: one importance reading and the removal order it gives."""
        imp = self.importance(group)
        if group.ordered:     # only the last units can go, the last first
            return imp, torch.arange(group.size - 1, -1, -1)
        return imp, removal_order(imp, self.config.pivot_of(group.size), self.regularizer.places(group))

    def _rounded(self, removal: Dict[int, List[int]]) -> Dict[int, List[int]]:
        """Each group's removal list (in removal order) shortened so the group keeps a multiple of
        ``round_to`` units (or all of them); sorted for :meth:`CoupledGroup.prune`."""
        k = self.round_to
        out = {}
        for g in self.graph.groups:
            units = removal.get(g.id, [])
            if k is not None and units:
                keep = min(g.size, -(-(g.size - len(units)) // k) * k)
                units = units[:g.size - keep]
            if units:
                out[g.id] = sorted(units)
        return out

    def plan(self) -> Dict[int, List[int]]:
        """Group id → units to remove, for the configured target; changes nothing."""
        if self.mode == "target_speedup":
            return self.path([self.amount])[0].removed
        removal = {}
        for g in self.graph.groups:
            imp, order = self._ranked(g)
            if self.mode == "pruning_ratio":
                removal[g.id] = order[: min(int(self.amount * g.size), g.size - 1)].tolist()
            else:
                rel = imp / imp.max().clamp_min(torch.finfo(imp.dtype).tiny)
                low = [bool(rel[u] < self.amount) for u in order[: g.size - 1]]
                if g.ordered:    # the last units in a row
                    low = list(itertools.accumulate(low, lambda a, b: a and b))
                removal[g.id] = [int(u) for u, ok in zip(order[: g.size - 1], low) if ok]
        return self._rounded(removal)

    def _macs(self, model: nn.Module) -> int:
        return count_macs(model, self.example_inputs)

    def _cut_copy(self, plan: Dict[int, List[int]], share: bool = False) -> nn.Module:
        """The model with ``plan`` cut: a deep copy, or (``share``, to count it) a twin sharing
        the tensors a cut leaves alone (:func:`etp_graph.graph.verify.twin`)."""
        clone = twin(self.model) if share else copy.deepcopy(self.model)
        cut_groups(clone, [(g, sorted(plan[g.id])) for g in self.graph.groups if plan.get(g.id)])
        return clone

    def _counted(self, plan: Dict[int, List[int]]) -> int:
        """fvcore MACs of the model with ``plan`` cut."""
        return self._macs(self._cut_copy(plan, share=True)) if plan else self._macs(self.model)

    def _sizes(self) -> Dict[int, int]:
        return {g.id: g.size for g in self.graph.groups}

    def _blocks(self) -> List[List[CoupledGroup]]:
        """Groups planned together: each alone, or with ``uniform`` the groups of one kind (the
        same root name up to layer numbers, the same size) so every layer keeps as many units."""
        groups = [g for g in self.graph.groups if g.size >= 2]
        if not self.uniform:
            return [[g] for g in groups]
        kinds: Dict[Tuple[str, int], List[CoupledGroup]] = {}
        for g in groups:
            kinds.setdefault((re.sub(r"\d+", "*", g.root), g.size), []).append(g)
        return list(kinds.values())

    def _candidates(self, costs: MacModel) -> List[tuple]:
        """Every removable unit (with ``uniform``: the k-th unit of every group of a kind) as
        ``(score, k, ((group id, unit), ...))``, sorted: a unit's share of its group's importance
        per MAC its removal saves (predicted from per-module costs, :class:`MacModel`); ``k`` is
        its place in its group's order."""
        candidates, base = [], costs.total
        for block in self._blocks():
            ranked, saved = [], 0.0
            for g in block:
                imp, order = self._ranked(g)
                order = order.tolist()
                saved += costs.saved_by_one(g.id)
                # a unit's share of its group's importance (``score``), per MAC it saves: a head (1
                # of 12) and an FFN unit (1 of 1536) compare by the part of their group's work they
                # do, so neither kind is cut first just because its units are wide or narrow
                ranked.append((g, order, self._costs(imp, order)))
            size = block[0].size
            held = self.soft_cap_on == "all" or any(is_stream(g) for g in block)
            cap = size - 1 if self.max_pruning_ratio is None else int(size * self.max_pruning_ratio)
            last = 0.0
            for k in range(min(cap, size - 1)):   # keep at least one unit per group
                share = sum(float(rel[k]) for _, _, rel in ranked)
                if any(g.ordered for g in block):   # never before the unit that must go first
                    share = last = max(share, last)
                candidates.append((self._tier(k, size) if held else 0, share / max(saved, 1) * base, k,
                                   tuple((g.id, order[k]) for g, order, _ in ranked)))
        candidates.sort(key=lambda c: c[:3])
        return [c[1:] for c in candidates]

    def _costs(self, imp: torch.Tensor, order: List[int]) -> torch.Tensor:
        """``Tensor[size]``: the cost of the ``k``-th removal of a group (in removal ``order``),
        before it is divided by the MACs it saves (see ``score``)."""
        if self.score == "share":
            return (imp / imp.sum().clamp_min(torch.finfo(imp.dtype).tiny))[order]
        mine = imp[order].double().clamp_min(0)
        left = mine.flip(0).cumsum(0).flip(0)   # what the group keeps just before the k-th removal
        return (mine / left.clamp_min(torch.finfo(torch.float64).tiny)).float()

    def _tier(self, k: int, size: int) -> int:
        """The soft cap's step of a group's ``k``-th removal (0-based): 0 while the group keeps
        at least ``1 - soft_cap`` of its units, then one more each time what it keeps halves."""
        if self.soft_cap is None:
            return 0
        keep, tier = (1 - self.soft_cap) * size, 0
        while size - (k + 1) < keep - 1e-9:
            keep, tier = keep / 2, tier + 1
        return tier

    def _prefix(self, candidates: List[tuple], n: int) -> Dict[int, List[int]]:
        """The plan removing the first ``n`` candidates (then rounded to ``round_to``)."""
        removal: Dict[int, List[int]] = {}
        for _, _, pairs in candidates[:n]:
            for gid, u in pairs:
                removal.setdefault(gid, []).append(u)
        return self._rounded(removal)

    def max_speedup(self) -> float:
        """The largest MACs speed-up a plan can reach: every group down to one unit (or to
        ``max_pruning_ratio`` and ``round_to``); changes nothing."""
        costs = MacModel(self.model, self.example_inputs, self.graph.groups)
        candidates = self._candidates(costs)
        return costs.total / max(self._counted(self._prefix(candidates, len(candidates))), 1)

    def plan_widths(self, widths: Dict[str, int]) -> "PrunePlan":
        """A plan that keeps, in each group named by its root (``GroupResult.root``, a report's
        ``units_kept``), that many units: its most important ones (the same order as every other
        plan); groups not named keep every unit. Changes nothing.

        What it is for: another plan's widths with this model's importance, e.g. the widths one
        method's planner chose for the units another method's training ranks (benchmarks), or a
        published architecture's widths.

        Example::

            >>> plan = pruner.plan_widths({"conv1": 8, "layer1.0.conv1": 4})
            >>> small, report = pruner.pruned_copy(plan)
        """
        by_root = {g.root: g for g in self.graph.groups}
        unknown = sorted(set(widths) - set(by_root))
        if unknown:
            raise KeyError(f"plan_widths: no group rooted at {unknown[:3]} in this model's trace "
                           f"(groups: {sorted(by_root)[:5]}{' …' if len(by_root) > 5 else ''})")
        removal = {}
        for root, keep in widths.items():
            g = by_root[root]
            if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= g.size:
                raise ValueError(f"plan_widths: group {root!r} has {g.size} units; keep between 1 and "
                                 f"{g.size}, got {keep!r}")
            if keep < g.size:
                removal[g.id] = sorted(self._ranked(g)[1][: g.size - keep].tolist())
        before = self._macs(self.model)
        after = self._counted(removal)
        return PrunePlan(before / max(after, 1), removal, before, after, self._sizes())

    def path(self, speedups: Sequence[float]) -> List["PrunePlan"]:
        """Plans for several MACs speed-ups from the model as it is now; changes nothing.

        All targets share one global ranking (the ``target_speedup`` rule) and each plan removes
        the shortest prefix of it that reaches its target, so the family is nested: every unit
        kept at the largest speed-up is kept at every smaller one. Returns one :class:`PrunePlan`
        per target, in ascending order of target; prune a copy with :meth:`pruned_copy` (one
        training, many speed-ups) or the model itself with ``step(plan=...)``.

        Example::

            >>> p2, p4, p8 = pruner.path([2, 4, 8])
            >>> small, report = pruner.pruned_copy(p8)      # pruner.model is unchanged
        """
        targets = sorted(float(t) for t in speedups)
        if not targets or targets[0] <= 1:
            raise ValueError(f"speedups must be a non-empty list of numbers > 1, got {list(speedups)}")
        with phase("planning: per-module costs and the ranking"):
            costs = MacModel(self.model, self.example_inputs, self.graph.groups)
            base = costs.total
            candidates = self._candidates(costs)
        cache: Dict[int, int] = {}

        def macs(n: int) -> int:   # counted by fvcore
            if n not in cache:
                cache[n] = self._counted(self._prefix(candidates, n)) if n else base
            return cache[n]

        def reaches(n: int, t: float) -> bool:
            return base / max(macs(n), 1) >= t

        def unreachable(t: float):
            best = base / max(macs(len(candidates)), 1)
            return ValueError(f"target_speedup={t} is unreachable: removing every unit but one in each of "
                              f"the {len(self.graph.groups)} groups (within max_pruning_ratio and round_to) "
                              f"gives {best:.2f}x; the model is unchanged")

        plans, floor = [], 0
        for t in targets:
            # the shortest prefix reaching t: guessed from the prediction, then confirmed by fvcore
            # (galloping out from the guess until the bracket lo < n <= hi holds, then bisecting)
            guess = _bisect(floor, len(candidates), lambda n: base / max(costs.predict(self._prefix(candidates, n)), 1) >= t)
            lo, hi, step = floor, len(candidates), 1
            if reaches(guess, t) and macs(guess) == costs.predict(self._prefix(candidates, guess)):
                # fvcore confirms the guess; the prediction, exact here, says one less does not reach
                lo = hi = guess
            elif reaches(guess, t):
                hi = guess
                while hi - step > floor and reaches(hi - step, t):
                    hi, step = hi - step, step * 2
                lo = max(floor, hi - step)
            else:
                lo = guess
                while lo + step < len(candidates) and not reaches(lo + step, t):
                    lo, step = lo + step, step * 2
                hi = min(len(candidates), lo + step)
                if not reaches(hi, t):
                    raise unreachable(t)
            hi = _bisect(lo, hi, lambda n: reaches(n, t))
            plans.append(PrunePlan(t, self._prefix(candidates, hi), base, macs(hi), self._sizes()))
            log.info("plan for %gx: %d units, %.3fx counted (%d fvcore counts so far)", t, hi,
                     base / max(macs(hi), 1), len(cache))
            floor = hi - 1 if hi > 0 else 0
        return _same_on_every_rank(plans)

    # ------------------------------------------------------------------------------ pruning
    def _resolve_plan(self, plan) -> Tuple[str, Dict[int, List[int]]]:
        if plan is None:
            return f"{self.mode}={self.amount}", self.plan()
        if isinstance(plan, PrunePlan):
            return f"target_speedup={plan.target_speedup:g}", plan.removed
        if isinstance(plan, dict):
            return "plan", plan
        raise TypeError(f"plan must be a PrunePlan (from path()), a dict of group id -> units or None, "
                        f"got {type(plan).__name__}")

    def pruned_copy(self, plan: Optional["PrunePlan"] = None, measure_latency: bool = False,
                    latency_repeat: int = 20) -> Tuple[nn.Module, PruneReport]:
        """A pruned deep copy of the model and its report; the model and the graph are unchanged.

        ``plan`` is a :class:`PrunePlan` from :meth:`path` (default: the configured target)."""
        target, removal = self._resolve_plan(plan)
        clone = self._cut_copy(removal)
        results = [GroupResult(g.root, g.size, g.size - len(removal.get(g.id, [])), list(removal.get(g.id, [])))
                   for g in self.graph.groups]
        report = self._report(target, self.model, clone, results, measure_latency, latency_repeat)
        if is_hf_model(clone):
            report.config_note = sync_config(clone, [(g, r.units_before, r.units_after)
                                                     for g, r in zip(self.graph.groups, results)])
        return clone, report

    def _report(self, target, before, after, results, measure_latency, repeat) -> PruneReport:
        lat = compare_latency([before, after], self.example_inputs, repeat=repeat) if measure_latency \
            else [None, None]
        return PruneReport(target, self._macs(before), self._macs(after), count_params(before),
                           count_params(after), results, lat[0], lat[1])

    def step(self, measure_latency: bool = False, latency_repeat: int = 20,
             plan: Optional["PrunePlan"] = None) -> PruneReport:
        """Remove the planned units from the model. Atomic: on any error the model is unchanged.

        ``plan``: a :class:`PrunePlan` from :meth:`path` (default: plan the configured target now).

        Returns:
            :class:`PruneReport` with MACs/params before and after, units per group and, when
            ``measure_latency``, the median latency before and after (``inference_mode``),
            measured side by side (:func:`etp_graph.compare_latency`) with a copy of the model
            as it was, which this call holds (the model's memory once more) until it returns.
        """
        params_before = count_params(self.model)
        before = copy.deepcopy(self.model) if measure_latency else None
        if plan is None and self.mode == "target_speedup":
            plan = self.path([self.amount])[0]
        # a plan from path() for the model's widths as they are now was counted on it and on its cut
        counted = plan if isinstance(plan, PrunePlan) and plan.sizes == self._sizes() else None
        macs_before = counted.macs_before if counted is not None else self._macs(self.model)
        target, plan = self._resolve_plan(plan)
        plan = _same_on_every_rank(plan)
        if counted is not None and plan != counted.removed:   # rank 0's plan, not this rank's
            counted = None
        snapshot = Snapshot(self.model)
        results = []
        try:
            sizes = [g.size for g in self.graph.groups]
            prune_groups(self.graph, [(g, plan[g.id]) for g in self.graph.groups if plan.get(g.id)])
            results = [GroupResult(g.root, n, g.size, list(plan.get(g.id, [])))
                       for g, n in zip(self.graph.groups, sizes)]
            macs_after = counted.macs_after if counted is not None else self._macs(self.model)
        except BaseException:
            snapshot.restore()
            self._build()    # the groups were renumbered by the partial prune: trace afresh
            raise
        lat_before, lat_after = compare_latency([before, self.model], self.example_inputs, repeat=latency_repeat) \
            if measure_latency else (None, None)
        del before
        note = sync_config(self.model, [(g, r.units_before, r.units_after) for g, r in zip(self.graph.groups, results)]) \
            if is_hf_model(self.model) else None
        return PruneReport(target, macs_before, macs_after, params_before,
                           count_params(self.model), results, lat_before, lat_after, note)


def _unwrapped(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DataParallel, DistributedDataParallel
    return model.module if isinstance(model, (DistributedDataParallel, DataParallel)) else model


def _same_on_every_rank(plan: T) -> T:
    """Under ``torch.distributed`` every rank prunes rank 0's plan (or plans). The plan is a function of
    the weights, which data-parallel training keeps equal, but a tie broken by round-off on one
    rank must not give two architectures."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return plan
    box = [plan if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _bisect(lo: int, hi: int, ok: Callable[[int], bool]) -> int:
    """The smallest ``n`` in ``(lo, hi]`` with ``ok(n)``, for ``ok`` false at ``lo`` (or ``lo`` the
    floor) and true at ``hi`` (monotone)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


@dataclasses.dataclass(frozen=True)
class PrunePlan:
    """Units to remove for one MACs speed-up target (from :meth:`ETPPruner.path`).

    ``removed``: group id → sorted unit indices; ``macs_before``/``macs_after``: counted on the
    model and on a pruned copy (fvcore, the pruner's example inputs)."""

    target_speedup: float
    removed: Dict[int, List[int]]
    macs_before: int
    macs_after: int
    #: group id → units when planned (the counts hold while the model keeps these widths)
    sizes: Optional[Dict[int, int]] = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def speedup(self) -> float:
        return self.macs_before / max(self.macs_after, 1)

    def kept(self, group: CoupledGroup) -> List[int]:
        """The units of ``group`` this plan keeps (indices as the group numbers them now)."""
        gone = set(self.removed.get(group.id, []))
        return [u for u in range(group.size) if u not in gone]
