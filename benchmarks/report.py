"""Turn every cell JSON under ``benchmarks/results`` into ``docs/results.md`` and ``docs/img``.

    python -m benchmarks.report

One table per task (and budget, and ``round_to``): method × speed-up, the metric after
fine-tuning as mean ± std over seeds, then the same before fine-tuning, the MACs and latency
speed-ups; the commands that produced the cells. Plots: ``docs/img/<task>.png`` (metric against
MACs speed-up, one line per method, its seed spread as error bars) and ``docs/img/latency.png``
(latency speed-up against MACs speed-up over all tasks). The hand-written text around the tables
lives in ``benchmarks/notes/`` (``intro.md``, ``<task>.md``, ``outro.md``) and is copied in.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Tuple

from etp_graph.pruner import SOFT_CAP, SOFT_CAP_ON

from . import methods as methods_mod
from .tasks import get_task

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def load(results: Path) -> List[dict]:
    return [json.loads(p.read_text()) for p in sorted(results.rglob("*.json"))]


def _key(cell) -> Tuple[str, str, str]:
    opts = ",".join(f"{k}={v}" for k, v in sorted(cell.get("options", {}).items()))
    cap = cell.get("soft_cap")     # cells from before the soft cap existed ran without one
    if cap != SOFT_CAP:            # the planner's default is the plain table
        opts = ", ".join(o for o in (opts, "no soft cap" if cap is None else f"soft cap {cap:g}") if o)
    if cap is not None and cell.get("soft_cap_on", "all") != SOFT_CAP_ON[0]:   # not the default's groups
        opts = ", ".join(o for o in (opts, f"soft cap on {_CAP_ON[cell.get('soft_cap_on', 'all')]}") if o)
    if cell.get("score", "share") != "share":   # the planner's cost of a unit: another table
        opts = ", ".join(o for o in (opts, f"score {cell['score']}") if o)
    return cell["task"], cell["budget"], opts


_CAP_ON = {"all": "every group", "streams": "streams"}


def command_today(cell) -> str:
    """The cell's command with the planner options it ran with made explicit where today's
    defaults differ (cells from before the soft cap ran without one; before 2026-12-04 the cap
    held back every group), so that running it again reproduces the cell."""
    cmd = cell["command"]
    if "--soft-cap " not in cmd and cell.get("soft_cap") is None:
        cmd += " --soft-cap none"
    if "--soft-cap-on" not in cmd and cell.get("soft_cap") is not None \
            and cell.get("soft_cap_on", "all") != SOFT_CAP_ON[0]:
        cmd += f" --soft-cap-on {cell.get('soft_cap_on', 'all')}"
    return cmd


def _row_name(cell) -> str:
    extra = [f"β={cell.get('beta_override')}"] * (cell.get("beta_override") is not None) + [
        f"round_to={cell['round_to']}"] * bool(cell.get("round_to")) + [
        f"max ratio {cell.get('max_pruning_ratio')}"] * (cell.get("max_pruning_ratio") is not None) + [
        f"widths of {cell.get('widths_from')}"] * bool(cell.get("widths_from")) + [
        "separate trainings"] * bool(
        cell.get("separate_trainings"))
    return cell["method"] + (f" ({', '.join(extra)})" if extra else "")


def _ms(values: List[float], digits: int) -> str:
    if not values:
        return "–"
    m = statistics.mean(values)
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.pstdev(values):.{digits}f}"


def _by_target(cells: List[dict]) -> Dict[str, Dict[float, List[dict]]]:
    rows: Dict[str, Dict[float, List[dict]]] = defaultdict(lambda: defaultdict(list))
    for c in cells:
        for cut in c["cuts"]:
            rows[_row_name(c)][cut["target"]].append({**cut, "cell": c})
    return rows


def latency_speedup(cut: dict) -> float:
    """A cut's measured latency speed-up: the paired ratio where dense and pruned were timed side
    by side (or re-measured so: ``benchmarks.latency``), else the ratio of the two medians."""
    if cut.get("latency_speedup") is not None:
        return cut["latency_speedup"]
    return cut["latency_ms"][0] / cut["latency_ms"][1]


def _order(names) -> List[str]:
    known = list(methods_mod.METHODS)
    return sorted(names, key=lambda n: (known.index(n.split(" ")[0]) if n.split(" ")[0] in known else 99, n))


def table(cells: List[dict], metric: str, digits: int) -> List[str]:
    rows = _by_target(cells)
    targets = sorted({t for r in rows.values() for t in r})
    out = []
    for stage, title in (("finetuned", "after fine-tuning"), ("pruned", "pruned, before fine-tuning")):
        out += [f"{metric} {title} (mean ± std over seeds; *n* = seeds):", "",
                "| method | dense | regularised | " + " | ".join(f"{t:g}×" for t in targets) + " | *n* |",
                "| --- | --- | --- | " + " | ".join("---" for _ in targets) + " | --- |"]
        for name in _order(rows):
            r = rows[name]
            mine = [c for c in cells if _row_name(c) == name]
            vals = [_ms([x[stage][metric] for x in r.get(t, [])], digits) for t in targets]
            out.append(f"| {name} | {_ms([c['dense'][metric] for c in mine], digits)} | "
                       f"{_ms([c['regularised'][metric] for c in mine], digits)} | " + " | ".join(vals)
                       + f" | {len(mine)} |")
        out.append("")
    out += ["MACs speed-up / latency speed-up (each cut timed beside its dense model in alternating rounds, the input shape is each cell's config.latency.inputs; mean over seeds):", "",
            "| method | " + " | ".join(f"{t:g}×" for t in targets) + " |",
            "| --- | " + " | ".join("---" for _ in targets) + " |"]
    for name in _order(rows):
        r = rows[name]
        vals = []
        for t in targets:
            xs = r.get(t, [])
            vals.append("–" if not xs else f"{statistics.mean(x['speedup'] for x in xs):.2f} / "
                        f"{statistics.mean(latency_speedup(x) for x in xs):.2f}")
        out.append(f"| {name} | " + " | ".join(vals) + " |")
    out.append("")
    return out


def plot_task(cells: List[dict], metric, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = _by_target(cells)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in _order(rows):
        r = rows[name]
        ts = sorted(r)
        xs = [statistics.mean(x["speedup"] for x in r[t]) for t in ts]
        ys = [statistics.mean(x["finetuned"][metric.name] for x in r[t]) for t in ts]
        es = [statistics.pstdev([x["finetuned"][metric.name] for x in r[t]]) if len(r[t]) > 1 else 0 for t in ts]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=name)
    dense = [c["dense"][metric.name] for c in cells]
    ax.axhline(statistics.mean(dense), color="gray", ls="--", lw=1, label="dense")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("MACs speed-up")
    ax.set_ylabel(metric.label + " after fine-tuning")
    ax.set_title(f"{cells[0]['task']} ({cells[0]['budget']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency(cells: List[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    by_task = defaultdict(list)
    for c in cells:
        for cut in c["cuts"]:
            by_task[c["task"]].append((cut["speedup"], latency_speedup(cut)))
    top = max([x for pts in by_task.values() for x, _ in pts] + [2.0])
    for task, pts in sorted(by_task.items()):
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, label=task)
    ax.plot([1, top], [1, top], color="gray", lw=1, label="latency = MACs")
    ax.plot([1, top], [0.8, 0.8 * top], color="gray", lw=1, ls="--", label="0.8 × MACs")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("MACs speed-up")
    ax.set_ylabel("measured latency speed-up")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _note(name: str) -> List[str]:
    p = HERE / "notes" / name
    return [p.read_text().rstrip(), ""] if p.is_file() else []


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("--out", default=str(ROOT / "docs" / "results.md"))
    p.add_argument("--img", default=str(ROOT / "docs" / "img"))
    args = p.parse_args(argv)
    cells = load(Path(args.results))
    groups: Dict[Tuple[str, str, str], List[dict]] = defaultdict(list)
    for c in cells:
        groups[_key(c)].append(c)
    img, out = Path(args.img), Path(args.out)
    lines = _note("intro.md")
    keys = sorted(groups)
    for n, (task, budget, opts) in enumerate(keys):
        cs = groups[(task, budget, opts)]
        t = get_task(task)
        metric = t.metric
        digits = 2 if metric.higher_is_better else 4
        suffix = "-" + re.sub(r"[^A-Za-z0-9.]+", "-", opts.replace("=", "")).strip("-") if opts else ""
        png = img / f"{task}{'' if budget == 'quick' else '-' + budget}{suffix}.png"
        plot_task(cs, metric, png)
        b = cs[0]["config"]["budget"]      # what ran; the time note is the task's current one
        note = t.budgets[budget].note if budget in t.budgets else b["note"]
        lines += [f"## {task} ({budget}{', ' + opts if opts else ''})", "",
                  f"Budget: dense start {b['dense']}, regularisation {b['reg']}, fine-tune {b['finetune']} "
                  f"{b['unit']} per cut ({note}). Machine: {cs[0]['machine']['threads']} threads, "
                  f"{cs[0]['machine']['device']}. Cells: {len(cs)}, "
                  f"{sum(c['wall_s']['total'] for c in cs) / 60:.0f} min in all.", "",
                  "Commands (as run, with the planner options that differ from today's defaults made "
                  "explicit):", ""] + [f"    {cmd}" for cmd in sorted({command_today(c) for c in cs})] + [""]
        lines += table(cs, metric.name, digits)
        last = n + 1 == len(keys) or keys[n + 1][0] != task      # the task's notes once, after its tables
        lines += [f"![{task}](img/{png.name})", ""] + (_note(f"{task}.md") if last else [])
    plot_latency(cells, img / "latency.png")
    lines += ["## Latency against MACs, every cut of every task", "", "![latency](img/latency.png)", ""]
    lines += _note("outro.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {out} ({len(cells)} cells) and plots under {img}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
