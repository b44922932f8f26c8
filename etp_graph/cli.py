"""The ``etp-graph`` command: ``inspect`` a zoo model's groups, ``demo`` the engine end to end."""
from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch

from . import zoo
from .counting import count_macs, count_params, measure_latency
from .graph import trace
from .testing import assert_prune_equivalent


def _inspect(args) -> int:
    e = zoo.entry(args.model)
    model = e.build()
    graph = trace(model, e.example_inputs(), ignored_layers=e.heads(model))
    print(graph.table())
    return 0


def _demo(args) -> int:
    """Pretrained ResNet-56 (CIFAR-10): trace, verify every group, prune the weakest units."""
    torch.manual_seed(0)
    e = zoo.entry("resnet56_cifar")
    model = e.build(pretrained=True)
    x = e.example_inputs()
    heads = e.heads(model)
    t0 = time.perf_counter()
    graph = trace(model, x, ignored_layers=heads)
    print(f"traced ResNet-56 in {time.perf_counter() - t0:.1f}s: {len(graph.groups)} groups, "
          f"{len(graph.skipped)} skipped\n")
    print(graph.table(), "\n")
    checks = assert_prune_equivalent(model, x, ignored_layers=heads)
    print(f"mask-then-prune equivalence: {len(checks)} checks passed "
          f"({sum(c.checked == 'values' for c in checks)} by value)\n")
    one = x[:1]
    before = {"macs": count_macs(model, one), "params": count_params(model),
              "latency": measure_latency(model, one, warmup=3, repeat=20)}
    for g in graph.groups:   # remove the weakest `ratio` of each group by coupled L2 norm
        k = int(g.size * args.ratio)
        if k:
            g.prune(torch.argsort(g.unit_norms())[:k].tolist())
    after = {"macs": count_macs(model, one), "params": count_params(model),
             "latency": measure_latency(model, one, warmup=3, repeat=20)}
    print(f"{'':18}{'before':>14}{'after':>14}{'ratio':>9}")
    for key in ("macs", "params"):
        print(f"{key.upper():18}{before[key]:>14,}{after[key]:>14,}{before[key] / after[key]:>8.2f}x")
    lb, la = before["latency"]["median_ms"], after["latency"]["median_ms"]
    print(f"{'latency (ms, 1 img)':18}{lb:>14.2f}{la:>14.2f}{lb / la:>8.2f}x   "
          f"(median of 20, {before['latency']['threads']} threads)")
    print(f"\nremoved the {args.ratio:.0%} lowest-norm units of every group (no regularisation or "
          "fine-tuning yet: accuracy is not claimed here)")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="etp-graph", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("inspect", help="print the coupled groups of a zoo model")
    i.add_argument("model", choices=zoo.list_models())
    d = sub.add_parser("demo", help="trace, verify and prune the pretrained ResNet-56")
    d.add_argument("--ratio", type=float, default=0.3, help="fraction of each group to remove")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    return {"inspect": _inspect, "demo": _demo}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
