"""What every benchmark cell does the same way: time its phases, and measure, fine-tune and
measure again a pruned copy (used by the runner and by the Torch-Pruning arm)."""
from __future__ import annotations

import time
from typing import Any, Dict

import etp_graph as eg

from . import distributed

from .tasks.base import Task

__all__ = ["Clock", "finetune_cut"]


class Clock:
    """Wall time per phase name, summed over the phase's spans: ``with clock("plan"): ...``."""

    def __init__(self):
        self.wall: Dict[str, float] = {}

    def __call__(self, phase: str):
        clock = self

        class _Span:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                clock.wall[phase] = round(clock.wall.get(phase, 0.0) + time.perf_counter() - self.t0, 2)
        return _Span()


def finetune_cut(task: Task, small, report: Dict[str, Any], target: float, dense, lat_inputs, seed: int,
                 latency_repeat: int, clock: Clock) -> Dict[str, Any]:
    """Measure a pruned copy (its latency side by side with the ``dense`` model's), fine-tune it,
    measure it again."""
    pruned = task.evaluate(small)
    with clock("latency"):
        lat_dense, lat = eg.compare_latency([dense, small], lat_inputs, warmup=2, repeat=latency_repeat)
    with clock(f"finetune {target:g}x"):
        distributed.fit(task, small, task.budget.finetune, seed=200 + seed, phase="finetune")
    return {"target": target, **report, "latency_ms": [lat_dense["median_ms"], lat["median_ms"]],
            "latency_iqr_ms": [lat_dense["iqr_ms"], lat["iqr_ms"]], "latency_speedup": lat["ratio_to_first"],
            "latency_side_by_side": True, "pruned": pruned, "finetuned": task.evaluate(small)}
