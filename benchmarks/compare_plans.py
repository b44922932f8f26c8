"""Do two planner settings cut the same units? Checked on the saved regularised models.

    python -m benchmarks.compare_plans minilm-sst2 --methods etp,group-sl --seeds 0 \\
        --a soft_cap_on=streams --b soft_cap=none

For every (method, seed) whose regularised model a run saved (``--reuse-regularised`` reloads
the same file), plans the task's speed-ups with ``ETPPruner`` settings ``a`` and ``b`` (keyword
overrides of the runner's defaults) and prints whether each pair of plans removes the same units
of every group. Where every pair is identical, the cells of one setting are the cells of the
other (the fine-tune after the cut is the same, seeded), and need not be run again.
"""
from __future__ import annotations

import argparse
from typing import Any, Dict, List

import torch

import etp_graph as eg

from . import methods as methods_mod
from .run import _reachable, _regularised_path
from .tasks import get_task


def _settings(items: List[str]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in ("soft_cap", "soft_cap_on", "score", "max_pruning_ratio", "round_to"):
            raise SystemExit(f"compare_plans: unknown planner setting {key!r}")
        out[key] = None if value.lower() == "none" else (
            value if key in ("soft_cap_on", "score") else (int(value) if key == "round_to" else float(value)))
    return out


def compare(task_name: str, methods: List[str], seeds: List[int], a: Dict[str, Any], b: Dict[str, Any],
            budget: str = "quick") -> List[tuple]:
    task = get_task(task_name)(budget, "cpu", {})
    task.load()
    rows = []
    for seed in seeds:
        for name in methods:
            method = methods_mod.get(name)
            saved = _regularised_path(task, method, seed)
            if not saved.is_file():
                print(f"{name} s{seed}: no saved regularised model ({saved}); run the cell first")
                continue
            model = task.dense(seed)
            model.load_state_dict(torch.load(saved, map_location="cpu"))
            config = method.regularizer_config(task.betas.get(method.name))   # its places break ties
            plans = []
            for setting in (a, b):
                pruner = eg.ETPPruner(model, task.example_inputs(), ignored_layers=task.heads(model),
                                      config=config or eg.ETPConfig(beta=0.0, **methods_mod.ETP_DEFAULTS),
                                      target_speedup=max(task.speedups), importance=method.importance(seed),
                                      group_filter=task.group_filter(model), **setting)
                plans.append(pruner.path(_reachable(pruner, list(task.speedups))))
            for pa, pb in zip(*plans):
                same = {g: sorted(u) for g, u in pa.removed.items()} == {g: sorted(u) for g, u in pb.removed.items()}
                rows.append((name, seed, pa.target_speedup, pb.target_speedup, same))
                print(f"{name} s{seed} {pa.target_speedup:g}x / {pb.target_speedup:g}x: "
                      f"{'the same units' if same else 'different units'} "
                      f"({pa.speedup:.2f}x / {pb.speedup:.2f}x MACs)")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task")
    p.add_argument("--methods", default=",".join(methods_mod.DEFAULT_METHODS))
    p.add_argument("--seeds", default="0")
    p.add_argument("--budget", default="quick")
    p.add_argument("--a", nargs="*", default=[], help="planner settings, e.g. soft_cap_on=streams")
    p.add_argument("--b", nargs="*", default=[], help="planner settings, e.g. soft_cap=none")
    args = p.parse_args(argv)
    rows = compare(args.task, [m for m in args.methods.split(",") if m], [int(s) for s in args.seeds.split(",")],
                   _settings(args.a), _settings(args.b), args.budget)
    same = sum(r[-1] for r in rows)
    print(f"{same} of {len(rows)} plans the same")
    return 0 if rows and same == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
