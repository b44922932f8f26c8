"""Exponential Torque (ETP) and Torque regularisers over coupled groups.

For every group ``g`` of :func:`etp_graph.trace` with ``N_g`` units and per-unit coupled norms
``n_g[i]`` (all parameter slices of unit ``i``: weights, biases, norm affines, the next layers'
input columns), the penalty is

    R = beta · Σ_g (1/N_g) · Σ_i w_g(i) · s_g[i]
    s_g[i] = n_g[i]²            (norm="l2", the paper)
    s_g[i] = Σ |θ| over unit i  (norm="l1", the public code's variant)

with the weight profile ``w(i) = exp(c·|i − p|/N)`` (:class:`ETP`) or ``|i − p|/N``
(:class:`Torque`), ``p`` the pivot unit. Units far from the pivot pay exponentially more, so
training concentrates the group's information near the pivot and drives the far units to zero.
:class:`GroupSL` is DepGraph's sparse learning (Torch-Pruning's ``GroupNormPruner.regularize``)
over the same groups, for comparison.
``i`` is the unit's place in the group's ordering: its index (``order="index"``, the public
code) or, with ``order="norm"``, its rank by coupled norm when the regulariser is built (the
strongest unit on the pivot, the weakest farthest away), which is what a pretrained model wants:
the penalty then empties the units that matter least.

The regularisers are shaped like ``torch.optim``: one base class, one hook (:meth:`coefficients`,
the per-unit multiplier of ``s_g[i]``; ETP and Torque differ only in their :meth:`weights` profile),
``penalty()`` (a loss term), ``apply_()`` (adds the same gradient to ``.grad`` after
``backward()``), ``decay_(lr)`` (a decoupled step on the penalty alone, for Adam),
``state_dict()`` / ``load_state_dict()``.
"""
from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from .graph.group import CoupledGroup

__all__ = ["ETPConfig", "Regularizer", "ETP", "Torque", "GroupSL", "make_regularizer"]


@dataclasses.dataclass(frozen=True)
class ETPConfig:
    """Settings of the ETP / Torque regulariser.

    Attributes:
        beta: strength of the penalty (the public VGG-19 code uses 1e-5 with ``norm="l1"``).
        c: steepness of the exponential profile; ``exp(c·d/N)``. The public code's base
            ``1.01 ** (500 / n)`` is ``c = 4.975``. Unused by ``profile="linear"``.
        pivot: the unit every other unit is pulled towards: an int (clamped to ``N − 1`` in
            smaller groups) or ``"center"`` (unit ``N // 2``). The public code uses 0.
        profile: ``"exp"`` (ETP), ``"linear"`` (the Torque baseline) or ``"group-sl"``
            (DepGraph's sparse learning, :class:`GroupSL`: ``beta`` is Torch-Pruning's ``reg``
            and ``c = ln(alpha)``; pivot and order are unused, the norm must be ``"l2"``).
        norm: ``"l2"`` (squared L2 per unit, the paper) or ``"l1"`` (the public code).
        zero_below: if set, :meth:`Regularizer.zero_small_` zeroes single regularised weights
            whose magnitude is below it (the public code does this with 5e-4 after each epoch).
        order: how a group's units are placed along the profile: ``"index"`` (unit ``i`` at
            place ``i``, the public code) or ``"norm"`` (ranked once, when the regulariser is
            built, by coupled norm: the strongest unit on the pivot, then outwards, nearer
            places first and lower places first on ties).
        scale: how a profile's weights become coefficients: ``"mean"`` (``beta·w/N``, the
            published formula: a group's penalty is the mean over its units, so a unit of a
            1,536-unit FFN group is pushed 128× less than a unit of a 12-head group) or
            ``"unit"`` (``beta·w``: every unit at the same place is pushed alike, whatever its
            group's width). Profiles only (``"exp"``, ``"linear"``).
    """

    beta: float
    c: float = 5.0
    pivot: Union[int, str] = 0
    profile: str = "exp"
    norm: str = "l2"
    zero_below: Optional[float] = None
    order: str = "index"
    scale: str = "mean"

    def __post_init__(self):
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"ETPConfig.beta must be a finite number >= 0, got {self.beta!r}")
        if not (isinstance(self.c, (int, float)) and math.isfinite(self.c) and self.c >= 0):
            raise ValueError(f"ETPConfig.c must be a finite number >= 0, got {self.c!r}")
        if isinstance(self.pivot, bool) or not (self.pivot == "center" or (isinstance(self.pivot, int) and self.pivot >= 0)):
            raise ValueError(f"ETPConfig.pivot must be an int >= 0 or 'center', got {self.pivot!r}")
        if self.profile not in PROFILES:
            raise ValueError(f"ETPConfig.profile must be one of {sorted(PROFILES)} ('exp' ETP, 'linear' "
                             f"Torque, 'group-sl' DepGraph), got {self.profile!r}")
        if self.profile == "group-sl" and self.norm != "l2":
            raise ValueError("ETPConfig(profile='group-sl') regularises squared L2 norms (as Torch-Pruning "
                             f"does); got norm={self.norm!r}, pass norm='l2'")
        if self.norm not in ("l2", "l1"):
            raise ValueError(f"ETPConfig.norm must be 'l2' or 'l1', got {self.norm!r}")
        if self.order not in ("index", "norm"):
            raise ValueError(f"ETPConfig.order must be 'index' or 'norm', got {self.order!r}")
        if self.scale not in ("mean", "unit"):
            raise ValueError(f"ETPConfig.scale must be 'mean' (beta·w/N, the paper) or 'unit' (beta·w), "
                             f"got {self.scale!r}")
        if self.zero_below is not None and not (self.zero_below > 0):
            raise ValueError(f"ETPConfig.zero_below must be None or > 0, got {self.zero_below!r}")

    def pivot_of(self, n: int) -> int:
        """The pivot unit of a group with ``n`` units."""
        return n // 2 if self.pivot == "center" else min(int(self.pivot), n - 1)


class Regularizer(abc.ABC):
    """Base class: the penalty ``R = Σ_g Σ_i coef_g[i] · s_g[i]`` over coupled groups.

    Subclasses set ``profile`` (the :attr:`ETPConfig.profile` they implement, checked against the
    config) and implement the one hook :meth:`coefficients`; a weight profile implements
    :meth:`ProfileRegularizer.weights` instead (``coef = beta · w(place_i) / N``).

    Args:
        groups: the :class:`CoupledGroup` list of :func:`etp_graph.trace` (``graph.groups``).
        config: :class:`ETPConfig`.
        model: the model whose parameters the groups index (default: the groups' own model).
    """

    profile: str = ""

    def __init__(self, groups: Sequence[CoupledGroup], config: ETPConfig, model: Optional[nn.Module] = None):
        if not isinstance(config, ETPConfig):
            raise TypeError(f"config must be an etp_graph.ETPConfig, got {type(config).__name__}")
        if config.profile != self.profile:
            raise ValueError(f"{type(self).__name__} implements profile={self.profile!r} but the config says "
                             f"profile={config.profile!r}; use eg.make_regularizer(groups, config) to get "
                             "the class that matches the config")
        self.groups = list(groups)
        self.config = config
        self.model = model if model is not None else (self.groups[0].model if self.groups else None)
        self._slot = {id(g): k for k, g in enumerate(self.groups)}
        self._places: List[torch.Tensor] = [self._rank(g) for g in self.groups]

    # ---------------------------------------------------------------------------------- hook
    @abc.abstractmethod
    def coefficients(self, group: CoupledGroup) -> torch.Tensor:
        """``Tensor[size]``, constant (no gradient): the multiplier of each unit's ``s[i]`` in ``R``."""

    # ------------------------------------------------------------------------------ ordering
    @torch.no_grad()
    def _rank(self, group: CoupledGroup) -> torch.Tensor:
        n = group.size
        if self.config.order == "index" or group.ordered:   # an ordered group's last units go first
            return torch.arange(n)
        pivot = self.config.pivot_of(n)
        slots = torch.argsort((torch.arange(n) - pivot).abs(), stable=True)     # pivot, then outwards
        strongest = torch.argsort(-group.unit_sums(self.model, self.config.norm).detach().cpu(), stable=True)
        places = torch.empty(n, dtype=torch.long)
        places[strongest] = slots
        return places

    def places(self, group: CoupledGroup) -> torch.Tensor:
        """``Tensor[size]`` of longs: each unit's place along the weight profile. A group that
        changed size (it was pruned) is ranked again from its current norms."""
        k = self._slot.get(id(group))
        if k is None:
            raise KeyError(f"group {group.root!r} is not one of this regulariser's groups; build the "
                           "regulariser from the graph whose groups you pass (e.g. eg.ETP(graph.groups, config))")
        if len(self._places[k]) != group.size:
            self._places[k] = self._rank(group)
        return self._places[k]

    # ------------------------------------------------------------------------------ penalty
    def penalty(self) -> torch.Tensor:
        """The penalty ``R`` as a differentiable scalar: add it to the task loss."""
        total = None
        for g in self.groups:
            s = g.unit_sums(self.model, self.config.norm)
            term = (self.coefficients(g).to(s) * s).sum()
            total = term if total is None else total + term
        return torch.zeros(()) if total is None else total

    @torch.no_grad()
    def _gradients(self) -> Dict[int, torch.Tensor]:
        """``id(param) → ∂R/∂param`` for every regularised parameter (one buffer each)."""
        l2 = self.config.norm == "l2"
        out: Dict[int, torch.Tensor] = {}
        for g in self.groups:
            coef = self.coefficients(g) * (2.0 if l2 else 1.0)
            for it, t, pairs in g.parameter_slices(self.model):
                buf = out.get(id(t))
                if buf is None:
                    buf = out[id(t)] = torch.zeros_like(t)
                units, index = pairs[0].to(t.device), pairs[1].to(t.device)
                theta = t.detach().index_select(it.dim, index)
                grad = theta if l2 else theta.sign()
                shape = [1] * t.dim()
                shape[it.dim] = -1
                buf.index_add_(it.dim, index, grad * coef.to(t)[units].view(shape))
        return out

    def _parameters(self) -> Dict[int, torch.Tensor]:
        return {id(t): t for g in self.groups for _, t, _ in g.parameter_slices(self.model)}

    @torch.no_grad()
    def apply_(self) -> None:
        """Add ``∂R/∂θ`` to every regularised parameter's ``.grad`` (call after ``backward()``).

        ``∂R/∂θ = 2·beta·w(i)/N · θ`` (``l2``) or ``beta·w(i)/N · sign(θ)`` (``l1``) for each
        slice of unit ``i``; the same as ``penalty().backward()`` without building its graph.
        """
        params = self._parameters()
        for key, grad in self._gradients().items():
            t = params[key]
            if t.grad is None:
                t.grad = grad
            else:
                t.grad.add_(grad)

    @torch.no_grad()
    def decay_(self, lr: float) -> None:
        """Decoupled ETP (as AdamW decouples weight decay): ``θ ← θ − lr·∂R/∂θ``, called after
        ``optimizer.step()``. With adaptive optimisers (Adam) a penalty inside the loss is
        rescaled per weight and can move a weight by at most about the learning rate per step,
        so it cannot empty units quickly; this step is a plain gradient step on ``R`` alone."""
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        params = self._parameters()
        for key, grad in self._gradients().items():
            params[key].sub_(grad, alpha=lr)

    @torch.no_grad()
    def zero_small_(self) -> int:
        """Zero single regularised weights with ``|θ| < zero_below``; returns how many were zeroed."""
        if self.config.zero_below is None:
            return 0
        count, seen = 0, set()
        for g in self.groups:
            for _, t, _ in g.parameter_slices(self.model):
                if id(t) in seen:
                    continue
                seen.add(id(t))
                small = t.abs() < self.config.zero_below
                count += int(small.sum())
                t.masked_fill_(small, 0.0)
        return count

    # -------------------------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        return {"kind": type(self).__name__, "config": dataclasses.asdict(self.config),
                "groups": [(g.root, g.size) for g in self.groups],
                "places": [p.tolist() for p in self._places]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore the configuration; the groups must be those the state was saved with."""
        groups = [tuple(x) for x in state.get("groups", [])]
        mine = [(g.root, g.size) for g in self.groups]
        if groups != mine:
            raise ValueError(f"regulariser state was saved for groups {groups[:4]}… but this one has "
                             f"{mine[:4]}…; build it from the same model and ignored layers")
        if state.get("kind") != type(self).__name__:
            raise ValueError(f"state is for a {state.get('kind')} regulariser, this is {type(self).__name__}")
        self.config = ETPConfig(**state["config"])
        if "places" in state:
            self._places = [torch.tensor(p, dtype=torch.long) for p in state["places"]]
        else:
            self._places = [self._rank(g) for g in self.groups]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(groups={len(self.groups)}, config={self.config})"


def _distance(n: int, pivot: int) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.float32) - pivot).abs() / n


class ProfileRegularizer(Regularizer):
    """A regulariser given by a weight profile ``w`` over the units' places:
    ``coef_g[i] = beta · w(place_i) / N_g``."""

    @abc.abstractmethod
    def weights(self, n: int, pivot: int) -> torch.Tensor:
        """``Tensor[n]``: the weight of each place of a group with ``n`` units and this pivot."""

    def group_weights(self, group: CoupledGroup) -> torch.Tensor:
        """``Tensor[size]``: the weight of each unit of ``group`` (profile at the unit's place)."""
        n = group.size
        return self.weights(n, self.config.pivot_of(n))[self.places(group)]

    def coefficients(self, group: CoupledGroup) -> torch.Tensor:
        per = self.config.beta / group.size if self.config.scale == "mean" else self.config.beta
        return self.group_weights(group) * per


class ETP(ProfileRegularizer):
    """Exponential Torque: ``w(i) = exp(c·|i − p|/N)``."""

    profile = "exp"

    def weights(self, n: int, pivot: int) -> torch.Tensor:
        return torch.exp(self.config.c * _distance(n, pivot))


class Torque(ProfileRegularizer):
    """Torque (linear) baseline: ``w(i) = |i − p|/N``."""

    profile = "linear"

    def weights(self, n: int, pivot: int) -> torch.Tensor:
        return _distance(n, pivot)


class GroupSL(Regularizer):
    """DepGraph's sparse learning (Torch-Pruning's ``GroupNormPruner.regularize``) over our groups.

    Each call reads the coupled norms ``n_i`` (L2 over every slice of unit ``i``) and pushes
    every unit with ``γ_i = exp(c · (max n − n_i) / (max n − min n))`` (Torch-Pruning's
    ``alpha ** …`` with ``c = ln alpha``; its ``regularize()`` default ``alpha = 16`` is
    ``c = ln 16 ≈ 2.77``): ``∂R/∂θ_i = beta · γ_i · θ_i``, ``γ`` held constant, so
    ``R = (beta / 2) · Σ_g Σ_i γ_i · ‖θ_i‖²``. Unlike ETP there is no ``1/N`` and no pivot: the
    weakest unit of a group is pushed ``alpha`` times harder than the strongest, at any size.
    A group whose norms are all equal (or not finite) is left alone, as Torch-Pruning does.
    """

    profile = "group-sl"

    @torch.no_grad()
    def coefficients(self, group: CoupledGroup) -> torch.Tensor:
        n = group.unit_sums(self.model, "l2").detach().float().cpu().sqrt()
        spread = n.max() - n.min()
        if not torch.isfinite(n).all() or not spread > 0:
            return torch.zeros(group.size)
        return torch.exp(self.config.c * (n.max() - n) / spread) * (self.config.beta / 2)


#: profile name → the regulariser class implementing it (the one place that maps them)
PROFILES = {cls.profile: cls for cls in (ETP, Torque, GroupSL)}


def make_regularizer(groups: Sequence[CoupledGroup], config: ETPConfig,
                     model: Optional[nn.Module] = None) -> Regularizer:
    """The regulariser of ``config.profile``: :class:`ETP` (``"exp"``), :class:`Torque`
    (``"linear"``) or :class:`GroupSL` (``"group-sl"``)."""
    return PROFILES[config.profile](groups, config, model)
