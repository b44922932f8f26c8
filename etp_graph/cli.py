"""The ``etp-graph`` command: ``inspect`` a zoo model's groups; ``demo`` runs ``benchmarks.demo``
(the engine end to end, from a checkout)."""
from __future__ import annotations

import argparse
import sys
import warnings

from . import zoo
from .graph import trace


def _inspect(args) -> int:
    e = zoo.entry(args.model)
    model = e.build()
    graph = trace(model, e.example_inputs(), ignored_layers=e.heads(model))
    print(graph.table())
    return 0


def _demo(argv) -> int:
    try:
        from benchmarks.demo import main as demo_main
    except ImportError:
        print("etp-graph demo: the demo lives in the repository's benchmarks/ folder; run `make demo` "
              "in a checkout of etp_graph", file=sys.stderr)
        return 2
    return demo_main(argv)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="etp-graph", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("inspect", help="print the coupled groups of a zoo model")
    i.add_argument("model", choices=zoo.list_models())
    sub.add_parser("demo", add_help=False,
                   help="ETP fine-tune, prune and fine-tune the pretrained ResNet-56 on CIFAR-10 (make demo)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"]:             # its options are the demo's own (python -m benchmarks.demo)
        return _demo(argv[1:])
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    return {"inspect": _inspect}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
