"""Measure again, side by side, the latency of every cut recorded in the cell JSONs.

    python -m benchmarks.latency [--tasks resnet56-cifar10,...] [--repeat 10] [--force] [--rounds 3]

A cell's latency depends on the widths its plan keeps, not on the trained weights, so each cut
is rebuilt from its ``units_kept`` on the task's model (untrained weights), its MACs checked
against the cell's, and timed with the dense model in alternating rounds
(:func:`etp_graph.compare_latency`: the dense model and a cell's cuts in turn) on the task's
latency batch. Cells run before 2026-12-03
timed the dense model once, minutes before its cuts and beside training jobs; on a busy machine
that gave ratios from 0.04× to 170× (ResNet-56 at 2× MACs: a dense 8.8 s against 0.11 s).
The result replaces ``latency_ms`` and sets ``latency_speedup`` in the cut; the number timed in
the run stays as ``latency_ms_in_run`` and ``latency_remeasured`` says when, where and how.
Cuts already timed side by side, in their run or by an earlier call, are left alone (``--force``
measures them too), so a stopped call goes on where it stopped.
Identical widths of one task are timed once. Run it on a quiet machine. Even there, this
machine's speed drifts (the same dense ResNet-56 batch took 230 ms one hour and 300 ms the next,
2026-12-04) and a cell's ratio moved by up to a quarter between calls: ``--rounds 3`` times each
cell three times and keeps the median run, with every run's ratio in ``latency_remeasured``.
"""
from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from tqdm import tqdm

import etp_graph as eg

from .run import commit
from .tasks import get_task

HERE = Path(__file__).resolve().parent


def _due(cut: dict, force: bool) -> bool:
    """A cut to time: it has widths, and was timed neither side by side in its run nor here."""
    return bool(cut.get("units_kept")) and (force or not (cut.get("latency_side_by_side")
                                                           or cut.get("latency_remeasured")))


def _plan(pruner: eg.ETPPruner, kept: Dict[str, int]) -> Dict[int, List[int]]:
    """Remove the last units of every group down to the widths of ``kept`` (by group root). A
    root the trace no longer has stands for the one group rooted inside it that ``kept`` does
    not name (cells before 2026-12-02 named a BERT attention group by its attention module; the
    trace now roots it at the query projection); the MACs check confirms the match."""
    by_root = {g.root: g for g in pruner.graph.groups}
    named = {}
    for root, n in kept.items():
        if root not in by_root:
            inside = [r for r in by_root if r.startswith(root + ".") and r not in kept]
            if len(inside) != 1:
                raise KeyError(f"group {root!r} of the cell is not in this trace of the model "
                               f"(groups rooted inside it: {inside})")
            root = inside[0]
        named[root] = n
    return {by_root[r].id: list(range(n, by_root[r].size)) for r, n in named.items() if n < by_root[r].size}


def remeasure(paths: List[Path], repeat: int, force: bool, rounds: int = 1) -> Tuple[int, List[str]]:
    """Re-measure the cuts due; returns the number of cells written and, for each cell whose
    widths do not rebuild its model (left as it was), why. With ``rounds`` > 1 each cell is timed
    that many times (each time the dense model and its cuts in alternating rounds) and the run
    with the median ratio is kept; every run's ratio is recorded."""
    by_task: Dict[Tuple[str, str, str], List[Tuple[Path, dict]]] = {}
    for p in paths:
        cell = json.loads(p.read_text())
        todo = [c for c in cell.get("cuts", []) if _due(c, force)]
        if todo:
            key = (cell["task"], cell["budget"], json.dumps(cell.get("options", {}), sort_keys=True))
            by_task.setdefault(key, []).append((p, cell))
    done, failed = 0, []
    for (name, budget, options), cells in by_task.items():
        task = get_task(name)(budget, "cpu", json.loads(options))
        task.load()
        model = task.build(0)
        pruner = eg.ETPPruner(model, task.example_inputs(), ignored_layers=task.heads(model), pruning_ratio=0.5,
                              group_filter=task.group_filter(model))
        inputs, example = task.latency_inputs(), task.example_inputs()
        timed: Dict[str, Tuple[list, float]] = {}
        stamp = {"date": datetime.date.today().isoformat(), "commit": commit(), "threads": torch.get_num_threads(),
                 "repeat": repeat, "how": "benchmarks.latency: widths rebuilt, dense and cut in alternating rounds"}
        for path, cell in tqdm(cells, desc=f"{name} latency"):
            cuts = [c for c in cell["cuts"] if _due(c, force)]
            new = {}
            try:
                for cut in cuts:
                    key = json.dumps(cut["units_kept"], sort_keys=True)
                    if key in timed or key in new:
                        continue
                    small, _ = pruner.pruned_copy(_plan(pruner, cut["units_kept"]))
                    macs = eg.count_macs(small, example)
                    if macs != cut["macs"][1]:
                        raise RuntimeError(f"the rebuilt {cut['target']:g}x cut counts {macs:,} MACs, the cell "
                                           f"{cut['macs'][1]:,}: its widths do not rebuild its model")
                    new[key] = small
            except (KeyError, RuntimeError, ValueError) as e:
                failed.append(f"{path}: {e}")
                tqdm.write(f"left as it was: {failed[-1]}")
                continue
            if new:     # the dense model and this cell's new widths in the same rounds, ``rounds`` times
                runs = [eg.compare_latency([model, *new.values()], inputs, warmup=2, repeat=repeat)
                        for _ in range(rounds)]
                for i, key in enumerate(new, 1):
                    ratios = [r[i]["ratio_to_first"] for r in runs]
                    mid = sorted(range(rounds), key=ratios.__getitem__)[(rounds - 1) // 2]   # the median run
                    timed[key] = ([runs[mid][0]["median_ms"], runs[mid][i]["median_ms"]], ratios[mid], ratios)
            for cut in cuts:
                cut.setdefault("latency_ms_in_run", cut["latency_ms"])
                cut["latency_ms"], cut["latency_speedup"], ratios = timed[json.dumps(cut["units_kept"], sort_keys=True)]
                cut["latency_remeasured"] = dict(stamp, rounds=rounds, ratios=ratios)
            path.write_text(json.dumps(cell, indent=1))
            done += 1
    return done, failed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("--tasks", default=None, help="comma-separated task names (default: every task)")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--force", action="store_true", help="also the cuts timed side by side in their run")
    p.add_argument("--rounds", type=int, default=1,
                   help="time each cell this many times and keep the median (the machine's speed drifts)")
    args = p.parse_args(argv)
    tasks = set(args.tasks.split(",")) if args.tasks else None
    paths = [q for q in sorted(Path(args.results).rglob("*.json"))
             if tasks is None or json.loads(q.read_text()).get("task") in tasks]
    done, failed = remeasure(paths, args.repeat, args.force, max(1, args.rounds))
    print(f"{done} cells re-measured" + (f"; {len(failed)} left as they were:" if failed else ""))
    for f in failed:
        print(f"  {f}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
