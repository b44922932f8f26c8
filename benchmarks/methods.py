"""The compared methods: each is a regulariser for the training phase and an importance for the cut.

Every method prunes through the same ``ETPPruner.path`` planner (global ranking by a unit's share
of its group's importance per MAC saved), so the comparison isolates what the method does.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, Optional

import torch

import etp_graph as eg


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    description: str
    #: the regulariser's config given the task's strength (None: plain training, no regulariser)
    config: Callable[[float], Optional[eg.ETPConfig]]
    random_importance: bool = False

    def regularizer_config(self, beta: Optional[float]) -> Optional[eg.ETPConfig]:
        if self.config is None:
            return None
        if beta is None:
            raise ValueError(f"method {self.name!r} needs a regulariser strength; add it to the task's betas")
        return self.config(beta)

    def importance(self, seed: int) -> Optional[Callable[[eg.CoupledGroup], torch.Tensor]]:
        """``None`` (the coupled norm) or, for ``random``, seeded scores per group."""
        if not self.random_importance:
            return None
        gen = torch.Generator().manual_seed(10_000 + seed)
        return lambda group: torch.rand(group.size, generator=gen)


#: our recommended defaults (chosen by this suite; see docs/results.md)
ETP_DEFAULTS = dict(c=5.0, pivot=0, profile="exp", norm="l2", order="norm")

METHODS: Dict[str, Method] = {m.name: m for m in (
    Method("etp", "ETP, recommended defaults: exp profile, c=5, pivot 0, units placed by norm",
           lambda b: eg.ETPConfig(beta=b, **ETP_DEFAULTS)),
    Method("etp-paper", "ETP as published: exp profile, c=5, pivot 0, order by index, squared L2",
           lambda b: eg.ETPConfig(beta=b, c=5.0, pivot=0, profile="exp", norm="l2", order="index")),
    Method("torque", "Torque: the linear profile, otherwise as etp",
           lambda b: eg.ETPConfig(beta=b, **{**ETP_DEFAULTS, "profile": "linear"})),
    Method("group-sl", "DepGraph sparse learning (Torch-Pruning GroupNormPruner.regularize, alpha=16)",
           lambda b: eg.ETPConfig(beta=b, c=math.log(16.0), profile="group-sl")),
    Method("etp-unit", "candidate defaults: etp with scale='unit' (no 1/N: a unit of a wide group is pushed "
           "as hard as one of a narrow group)", lambda b: eg.ETPConfig(beta=b, **ETP_DEFAULTS, scale="unit")),
    Method("etp-steep", "candidate: etp with c = 10 (the places next to the pivot pushed harder: with c = 5 "
           "the second of 8 heads is pushed 1.9x as hard as the pivot, with c = 10 3.5x)",
           lambda b: eg.ETPConfig(beta=b, **{**ETP_DEFAULTS, "c": 10.0})),
    Method("magnitude", "no regulariser (plain training for the same steps), coupled norm", None),
    Method("random", "no regulariser, random importance", None, random_importance=True),
)}

#: what a run compares unless told otherwise: the six methods of the benchmark (etp-unit is a
#: candidate for etp's defaults, run by name)
DEFAULT_METHODS = ("etp", "etp-paper", "torque", "group-sl", "magnitude", "random")

#: run end to end by Torch-Pruning itself (benchmarks/torch_pruning_arm.py), where it prunes exactly
TORCH_PRUNING = Method("torch-pruning", "Torch-Pruning's own GroupNormPruner.regularize (alpha=16) and "
                       "BasePruner with GroupMagnitudeImportance, global, pruning ratio searched to the "
                       "MACs target", lambda b: eg.ETPConfig(beta=b, c=math.log(16.0), profile="group-sl"))


def get(name: str) -> Method:
    if name == TORCH_PRUNING.name:
        return TORCH_PRUNING
    if name not in METHODS:
        raise KeyError(f"no method {name!r}; known: {', '.join(METHODS)}, {TORCH_PRUNING.name}")
    return METHODS[name]
