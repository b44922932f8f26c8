"""Run benchmark cells: one JSON per (task, method, seed), resumable.

    python -m benchmarks.run gat-cora --budget quick --seeds 0,1,2
    python -m benchmarks.run resnet56-cifar10 --methods etp,magnitude --speedups 2,4 --round-to 8

A cell: the task's dense start (cached per seed) → the method's regularisation phase (the same
steps, data order and optimiser for every method) → one ``ETPPruner.path`` over all speed-ups →
for each speed-up a pruned copy of that one trained model, fine-tuned for the same steps. Each
cell records the metric at every stage, MACs, params, measured latency (batch and threads
stated), the resolved configuration, the commit, the machine and the wall time of each phase.
A cell whose JSON exists is not run again (``--force`` to redo it).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from tqdm.auto import tqdm

import etp_graph as eg

from . import distributed
from . import methods as methods_mod
from .tasks import TASKS, get_task
from .phases import Clock, finetune_cut
from .tasks.base import RegHook, Task, cache_dir

RESULTS = Path(__file__).resolve().parent / "results"


def commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "etp_graph", "benchmarks/tasks",
                                "benchmarks/run.py", "benchmarks/methods.py"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine(device: str) -> Dict[str, Any]:
    return {"threads": torch.get_num_threads(), "device": device, "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "cuda": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
            "processes": distributed.world_size()}


@dataclasses.dataclass(frozen=True)
class PlanOptions:
    """How every method of a run is cut (the same for all): ``ETPPruner``'s ``round_to``,
    ``max_pruning_ratio``, ``soft_cap``, ``score`` and ``soft_cap_on`` (cells from before the
    soft cap existed ran without one: their files carry no ``-soft`` tag, as a run with
    ``--soft-cap none`` does; the cap on every group, the default until 2026-12-04, has no
    ``-streams`` tag, as a run with ``--soft-cap-on all`` does)."""

    round_to: Optional[int] = None
    max_pruning_ratio: Optional[float] = None
    soft_cap: Optional[float] = None
    score: str = "share"
    soft_cap_on: str = "streams"
    #: cut to the widths another method's cell (same seed and options) kept, with this method's
    #: importance choosing the units (``ETPPruner.plan_widths``): the planner's allocation apart
    #: from what the method's training ranks
    widths_from: Optional[str] = None

    def tags(self) -> str:
        return ((f"-soft{self.soft_cap:g}" if self.soft_cap is not None else "")
                + ("-streams" if self.soft_cap is not None and self.soft_cap_on == "streams" else "")
                + (f"-{self.score}" if self.score != "share" else "")
                + (f"-r{self.round_to}" if self.round_to else "")
                + (f"-m{self.max_pruning_ratio:g}" if self.max_pruning_ratio is not None else "")
                + (f"-w{self.widths_from}" if self.widths_from else ""))


def cell_path(out: Path, task: str, budget: str, method: str, seed: int, plan: PlanOptions = PlanOptions(),
              separate: bool = False, beta: Optional[float] = None) -> Path:
    tags = (f"-b{beta:g}" if beta is not None else "") + plan.tags() + ("-sep" if separate else "")
    return out / task / budget / f"{method}-s{seed}{tags}.json"


def _reachable(pruner: eg.ETPPruner, speedups: List[float]) -> List[float]:
    best = pruner.max_speedup()
    kept = [s for s in speedups if s <= best]
    # the largest the model reaches, just inside its limit, unless a kept target is already close
    if len(kept) < len(speedups) and (not kept or best * 0.98 > kept[-1] * 1.1):
        kept.append(float(f"{best * 0.98:.2f}"))
    return sorted(set(kept))


#: what the planner's ``score`` charges a removal, for the cell's configuration
_SCORED = {"share": "a unit's share of its group's importance",
           "kept": "a unit's share of the importance its group still keeps"}


def _regularised_path(task: Task, method: methods_mod.Method, seed: int) -> Path:
    """Where a cell keeps its regularised model (outside the repository), keyed by everything the
    regularisation phase depends on: task, budget, task options, method, its β, seed, steps."""
    opts = "".join(f"-{k}={v}" for k, v in sorted(task.options.items()))
    beta = task.betas.get(method.name)
    return (cache_dir() / "regularised" / f"{task.name}-{task.budget_name}{opts}-{method.name}"
            f"{'' if beta is None else f'-b{beta:g}'}-reg{task.budget.reg}-s{seed}.pt")


def _regularised(task: Task, method: methods_mod.Method, seed: int, speedup: float,
                 plan: PlanOptions, clock: Clock, reuse: bool = False):
    """The dense start of ``seed`` trained through the method's regularisation phase, and its pruner.

    The regularised weights are saved; with ``reuse`` a saved one is loaded instead of training
    again (the pruner is still built on the dense start, as when training, so the cut is the
    same): another plan (``--round-to``, ``--max-pruning-ratio``) of the same trained model."""
    with clock("dense"):
        model = task.dense(seed)
    dense = task.evaluate(model)
    config = method.regularizer_config(task.betas.get(method.name))
    pruner = eg.ETPPruner(model, task.example_inputs(), ignored_layers=task.heads(model),
                          config=config or eg.ETPConfig(beta=0.0, **methods_mod.ETP_DEFAULTS),
                          target_speedup=speedup, round_to=plan.round_to, importance=method.importance(seed),
                          max_pruning_ratio=plan.max_pruning_ratio, soft_cap=plan.soft_cap,
                          score=plan.score, soft_cap_on=plan.soft_cap_on, group_filter=task.group_filter(model))
    hook = RegHook(pruner.regularizer, task.reg_mode, task.decay_scale) if config is not None else None
    saved = _regularised_path(task, method, seed)
    with clock("regularise"):
        reused = reuse and saved.is_file()
        if reused:
            model.load_state_dict(torch.load(saved, map_location=task.device))
        else:
            distributed.fit(task, model, task.budget.reg, seed=100 + seed, hook=hook, phase="regularise")
            distributed.save_on_main(lambda p: torch.save(model.state_dict(), p), saved)
    return model, pruner, config, dense, reused


def run_cell(task: Task, method: methods_mod.Method, seed: int, speedups: List[float],
             plan_options: PlanOptions, latency_repeat: int, separate: bool = False,
             reuse: bool = False, widths: Optional[Dict[float, Dict[str, int]]] = None) -> Dict[str, Any]:
    """One cell. ``separate``: a fresh regularised training per target instead of one for all
    (to compare with the nested family from one training); ``reuse``: load the saved regularised
    model of an earlier run of this cell instead of training again; ``widths``: target → the
    units kept per group (another cell's), cut instead of planning."""
    clock = Clock()
    model, pruner, config, dense, reused = _regularised(task, method, seed, max(speedups), plan_options, clock,
                                                reuse and not separate)
    regularised = task.evaluate(model)
    with clock("plan"):
        if widths is not None:
            plans = [dataclasses.replace(pruner.plan_widths(w), target_speedup=t) for t, w in sorted(widths.items())]
        else:
            plans = pruner.path(_reachable(pruner, speedups))
    lat_inputs = task.latency_inputs()
    cuts = []
    for k, plan in enumerate(tqdm(plans, desc=f"{method.name} s{seed} cuts", leave=False)):
        if separate and k:      # train again from the dense start, for this target alone
            _, pruner, _, _, _ = _regularised(task, method, seed, plan.target_speedup, plan_options, clock)
            with clock("plan"):
                plan = pruner.path([plan.target_speedup])[0]
        small, report = pruner.pruned_copy(plan)
        cuts.append(finetune_cut(task, small, report.as_dict(), plan.target_speedup, model, lat_inputs, seed,
                         latency_repeat, clock))
    return {"dense": dense, "regularised": regularised, "cuts": cuts, "requested_speedups": speedups,
            "separate_trainings": separate, "regularised_reused": reused,
            "skipped_groups": [dataclasses.asdict(s) for s in pruner.graph.skipped],
            "config": {"method": {"name": method.name, "description": method.description,
                                  "regularizer": dataclasses.asdict(config) if config else None,
                                  "importance": "random" if method.random_importance else "coupled norm"},
                       "task": task.describe(), "budget": dataclasses.asdict(task.budget),
                       "reg_mode": task.reg_mode, "decay_scale": task.decay_scale,
                       "pruner": {**dataclasses.asdict(plan_options),
                                  "planner": f"ETPPruner.path ({_SCORED[plan_options.score]} per MAC)"},
                       "latency": {"repeat": latency_repeat, "inputs": _describe_inputs(lat_inputs)}},
            "wall_s": clock.wall}


def _describe_inputs(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return list(x.shape)
    if isinstance(x, dict):
        return {k: _describe_inputs(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return [_describe_inputs(v) for v in x]
    return repr(x)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=sorted(TASKS))
    p.add_argument("--methods", default=",".join(methods_mod.DEFAULT_METHODS), help="comma-separated")
    p.add_argument("--speedups", default=None, help="comma-separated MACs targets (default: the task's)")
    p.add_argument("--seeds", default="0")
    p.add_argument("--budget", default="quick")
    p.add_argument("--device", default="cpu")
    p.add_argument("--round-to", type=int, default=None, help="every group keeps a multiple of this many units")
    p.add_argument("--max-pruning-ratio", type=float, default=None,
                   help="no group loses more than this fraction of its units (every method alike)")
    p.add_argument("--soft-cap", default=str(eg.pruner.SOFT_CAP),
                   help="ETPPruner's soft_cap (default its own; 'none': one ranking for every unit, as "
                        "every cell run before 2026-12-03)")
    p.add_argument("--soft-cap-on", default=eg.pruner.SOFT_CAP_ON[0], choices=eg.pruner.SOFT_CAP_ON,
                   help="the groups the soft cap holds back: only the residual streams (default) or all "
                        "(the default of every cell run before 2026-12-04)")
    p.add_argument("--widths-from", default=None, metavar="METHOD",
                   help="cut every target to the widths METHOD's cell (same seed and options) kept, the units "
                        "chosen by this method's importance: the planner's allocation apart from the training")
    p.add_argument("--score", default="share", choices=eg.pruner.SCORES,
                   help="ETPPruner's score: a unit's share of its group's importance (default) or of what "
                        "the group still keeps")
    p.add_argument("--separate", action="store_true",
                   help="a separate regularised training per speed-up (default: one training, a nested family)")
    p.add_argument("--beta", action="append", default=[],
                   help="method=value: another regulariser strength than the task's (a separate row)")
    p.add_argument("--reuse-regularised", action="store_true",
                   help="load each cell's saved regularised model (from an earlier run) instead of training")
    p.add_argument("--latency-repeat", type=int, default=10)
    p.add_argument("--option", action="append", default=[], help="task option key=value (e.g. dataset=CiteSeer)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--force", action="store_true", help="run cells whose JSON exists again")
    args = p.parse_args(argv)
    options = dict(o.split("=", 1) for o in args.option)
    device = distributed.setup(args.device)   # under torchrun: join the process group
    try:
        return _run(args, argv, options, device)
    finally:
        distributed.teardown()


def _run(args, argv, options: Dict[str, str], device: str) -> int:
    task = get_task(args.task)(args.budget, device, options)
    betas = {m: float(v) for m, v in (b.split("=", 1) for b in args.beta)}
    task.betas = {**task.betas, **betas}
    names = [m for m in args.methods.split(",") if m]
    chosen = [methods_mod.get(m) for m in names]
    speedups = sorted(float(s) for s in args.speedups.split(",")) if args.speedups else list(task.speedups)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    plan = PlanOptions(args.round_to, args.max_pruning_ratio,
                       None if args.soft_cap.lower() == "none" else float(args.soft_cap), args.score,
                       args.soft_cap_on, args.widths_from)
    widths = {}
    if args.widths_from:
        if args.separate:
            raise SystemExit("benchmarks.run: --widths-from cuts one trained model; leave out --separate")
        for seed in seeds:
            src = cell_path(out, task.name, args.budget, args.widths_from, seed,
                            dataclasses.replace(plan, widths_from=None), False, betas.get(args.widths_from))
            if not src.is_file():
                raise SystemExit(f"benchmarks.run: --widths-from {args.widths_from}: no cell {src}; run it first")
            widths[seed] = {c["target"]: c["units_kept"] for c in json.loads(src.read_text())["cuts"]}
    todo = [(m, s) for s in seeds for m in chosen
            if args.force or not cell_path(out, task.name, args.budget, m.name, s, plan, args.separate, betas.get(m.name)).is_file()]
    if distributed.world_size() > 1 and any(m.name == "torch-pruning" for m, _ in todo):
        raise SystemExit("benchmarks.run: the torch-pruning row runs in one process; launch it without torchrun")
    distributed.agree([(m.name, s) for m, s in todo], "the list of cells to run")
    main_rank = distributed.is_main()
    if main_rank:
        print(f"{task.name} ({args.budget}): {len(todo)} of {len(seeds) * len(chosen)} cells to run; "
              f"{torch.get_num_threads()} threads, device {device}, {distributed.world_size()} process(es)")
    if not todo:
        return 0
    task.load()
    for method, seed in tqdm(todo, desc=task.name, disable=not main_rank):
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        if method.name == "torch-pruning":
            from .torch_pruning_arm import run_tp_cell
            result = run_tp_cell(task, seed, speedups, plan, args.latency_repeat)
        else:
            result = run_cell(task, method, seed, speedups, plan, args.latency_repeat, args.separate,
                              args.reuse_regularised, widths.get(seed))
        result.update({"task": task.name, "method": method.name, "seed": seed, "budget": args.budget,
                       "beta_override": betas.get(method.name),
                       "options": options, "round_to": plan.round_to,
                       "max_pruning_ratio": plan.max_pruning_ratio, "soft_cap": plan.soft_cap,
                       "score": plan.score, "soft_cap_on": plan.soft_cap_on, "widths_from": plan.widths_from,
                       "commit": commit(),
                       "machine": machine(device), "date": time.strftime("%Y-%m-%d %H:%M"),
                       "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:])})
        result["wall_s"]["total"] = round(time.perf_counter() - t0, 1)
        distributed.agree({k: result[k] for k in ("dense", "regularised")}
                          | {"cuts": [{k: c[k] for k in ("macs", "units_kept", "pruned", "finetuned")}
                                      for c in result["cuts"]]}, f"cell {method.name} s{seed}")
        path = cell_path(out, task.name, args.budget, method.name, seed, plan, args.separate,
                         betas.get(method.name))
        distributed.save_on_main(lambda p: p.write_text(json.dumps(result, indent=1)), path)
        if not main_rank:
            continue
        m = task.metric.name
        tqdm.write(f"{method.name} s{seed}: dense {result['dense'][m]:.4g} → regularised "
                   f"{result['regularised'][m]:.4g}; " + ", ".join(
                       f"{c['speedup']:.2f}x {c['pruned'][m]:.4g}→{c['finetuned'][m]:.4g}" for c in result["cuts"])
                   + f" ({result['wall_s']['total']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
