"""The ``etp-graph`` command.

    etp-graph inspect MODEL [--input-shape 1,3,224,224 | --inputs x.pt] [--ignore fc] [--graph g.html]
    etp-graph prune MODEL --target-speedup 4 [--checkpoint w.pt] --out pruned.pt
    etp-graph bench TASK ...        (the benchmark runner, from a checkout)
    etp-graph demo ...              (make demo, from a checkout)

MODEL is ``zoo:NAME`` (``etp-graph inspect --list``), ``path/to/file.py:factory`` or
``package.module:factory``: a callable returning the ``nn.Module`` (a torchvision or
transformers constructor, a function of your own). Exit status: 0 done, 2 bad usage (one line
on stderr), 1 the work failed (one line; ``-v`` for the traceback and the library's log).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
import warnings
from typing import Any, List, Optional, Tuple

import torch
from torch import nn

from . import zoo
from .counting import count_macs, count_params, unsupported_ops
from .graph import trace
from .io import save_pruned

from .log import log


class UsageError(Exception):
    """Bad usage: printed as one line, exit status 2."""


def load_model(spec: str) -> Tuple[nn.Module, Any, List[nn.Module]]:
    """``(model, default example inputs or None, default ignored layers)`` for MODEL."""
    if spec.startswith("zoo:"):
        name = spec[4:]
        if name not in zoo.list_models():
            raise UsageError(f"no zoo model {name!r}; one of: {', '.join(zoo.list_models())}")
        e = zoo.entry(name)
        model = e.build()
        return model, e.example_inputs(), list(e.heads(model))
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise UsageError(f"MODEL {spec!r}: expected zoo:NAME, path/to/file.py:factory or package.module:factory")
    if where.endswith(".py"):
        if not os.path.isfile(where):
            raise UsageError(f"MODEL {spec!r}: no file {where!r}")
        module_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(where))[0], where)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise UsageError(f"MODEL {spec!r}: cannot import {where!r} ({e})") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UsageError(f"MODEL {spec!r}: {where!r} has no callable {attr!r}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise UsageError(f"MODEL {spec!r}: {attr}() returned {type(model).__name__}, not an nn.Module")
    return model, None, []


def _shape(text: str) -> Tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise UsageError(f"--input-shape {text!r}: expected positive ints separated by commas, e.g. 1,3,224,224")
    return dims


def example_inputs(args, default) -> Any:
    if args.inputs and args.input_shape:
        raise UsageError("give --input-shape or --inputs, not both")
    if args.inputs:
        if not os.path.isfile(args.inputs):
            raise UsageError(f"--inputs {args.inputs!r}: no such file")
        x = torch.load(args.inputs, map_location="cpu", weights_only=True)
        if not isinstance(x, (torch.Tensor, tuple, list, dict)):
            raise UsageError(f"--inputs {args.inputs!r} holds a {type(x).__name__}; save a Tensor, a tuple of "
                             "positional arguments or a dict of keyword arguments with torch.save")
        return x
    if args.input_shape:
        shapes = [_shape(s) for s in args.input_shape]
        return torch.randn(*shapes[0]) if len(shapes) == 1 else tuple(torch.randn(*s) for s in shapes)
    if default is None:
        raise UsageError("this model has no example inputs: pass --input-shape 1,3,224,224 (or --inputs x.pt)")
    return default


def ignored(model: nn.Module, names: Optional[List[str]], default: List[nn.Module]) -> List[nn.Module]:
    if not names:
        return default
    out = []
    for n in names:
        try:
            out.append(model.get_submodule(n))
        except AttributeError:
            top = [c for c, _ in model.named_children()]
            raise UsageError(f"--ignore {n!r}: the model has no such module (its children: {', '.join(top)})") from None
    return out


def _checkpoint(model: nn.Module, path: Optional[str]) -> None:
    if not path:
        return
    if not os.path.isfile(path):
        raise UsageError(f"--checkpoint {path!r}: no such file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and str(state.get("format", "")).startswith("etp_graph.pruned"):
        raise UsageError(f"--checkpoint {path!r} is a pruned model (save_pruned): load it with "
                         "etp_graph.load_pruned(factory, path); --checkpoint takes the unpruned weights")
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as e:
        first = str(e).strip().splitlines()
        raise RuntimeError(f"--checkpoint {path!r} does not fit this model: "
                           f"{first[1].strip() if len(first) > 1 else first[0]}") from e


GRAPH_FORMATS = (".html", ".dot", ".gv", ".svg", ".png")


def _inspect(args) -> int:
    if args.graph and os.path.splitext(args.graph)[1].lower() not in GRAPH_FORMATS:
        raise UsageError(f"--graph {args.graph!r}: write one of {', '.join(GRAPH_FORMATS)}")
    model, default, heads = load_model(args.model)
    x = example_inputs(args, default)
    model.eval()
    log.info("tracing %s", type(model).__name__)
    graph = trace(model, x, ignored_layers=ignored(model, args.ignore, heads))
    print(graph.table())
    for s in graph.skipped:
        print(f"skipped {s.root}: {s.reason}")
    print(f"MACs {count_macs(model, x):,}  params {count_params(model):,}")
    missing = unsupported_ops(model, x)
    if missing:
        print("ops the MAC counter cannot count: " + ", ".join(f"{op} ({n}x)" for op, n in sorted(missing.items())))
    if args.graph:
        from .render import write_graph
        write_graph(graph, args.graph)
        print(f"graph written to {args.graph}")
    return 0


def _prune(args) -> int:
    from .pruner import ETPPruner
    model, default, heads = load_model(args.model)
    _checkpoint(model, args.checkpoint)
    x = example_inputs(args, default)
    model.eval()
    target = {"target_speedup": args.target_speedup} if args.target_speedup else {"pruning_ratio": args.pruning_ratio}
    pruner = ETPPruner(model, x, ignored_layers=ignored(model, args.ignore, heads), round_to=args.round_to, **target)
    log.info("%d groups traced; pruning", len(pruner.graph.groups))
    report = pruner.step(measure_latency=args.latency)
    save_pruned(model, args.out)
    print(report)
    print(f"pruned model written to {args.out} (etp_graph.load_pruned(factory, {args.out!r}) loads it)")
    return 0


def _forward(module: str, what: str, argv) -> int:
    try:
        main_of = importlib.import_module(module).main
    except ImportError:
        raise UsageError(f"{what} lives in the repository's benchmarks/ folder; run it from a checkout of etp_graph")
    return main_of(argv)


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # one line, not argparse's usage block
        print(f"etp-graph: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="etp-graph", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="log what the library does; tracebacks on failure")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    def model_args(s):
        s.add_argument("model", help="zoo:NAME, path/to/file.py:factory or package.module:factory")
        s.add_argument("--input-shape", action="append", metavar="1,3,224,224",
                       help="a random input of this shape (repeat for several positional inputs)")
        s.add_argument("--inputs", metavar="x.pt", help="example inputs saved with torch.save "
                                                       "(a Tensor, a tuple or a dict of keyword arguments)")
        s.add_argument("--ignore", action="append", metavar="NAME",
                       help="a module never pruned, e.g. the task head (repeatable; zoo models know theirs)")
    i = sub.add_parser("inspect", help="print the coupled groups, what was skipped and why, MACs and params")
    model_args(i)
    i.add_argument("--graph", metavar="out.html", help="draw the dependency graph: .html (pyvis), .dot/.gv, "
                                                       ".svg or .png (graphviz; needs its dot program)")
    r = sub.add_parser("prune", help="prune to a target and write the pruned model")
    model_args(r)
    how = r.add_mutually_exclusive_group(required=True)
    how.add_argument("--target-speedup", type=float, metavar="S", help="MACs speed-up to reach")
    how.add_argument("--pruning-ratio", type=float, metavar="R", help="fraction of every group's units to remove")
    r.add_argument("--checkpoint", metavar="w.pt", help="a state dict to load into the model first")
    r.add_argument("--round-to", type=int, metavar="K", help="every group keeps a multiple of K units")
    r.add_argument("--latency", action="store_true", help="measure latency before and after")
    r.add_argument("--out", required=True, metavar="pruned.pt", help="where to write the pruned model (save_pruned)")
    sub.add_parser("bench", add_help=False, help="run benchmark cells (python -m benchmarks.run; from a checkout)")
    sub.add_parser("demo", add_help=False,
                   help="ETP fine-tune, prune and fine-tune the pretrained ResNet-56 on CIFAR-10 (make demo)")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = _parser()
    verbose = any(a in ("-v", "--verbose") for a in argv)
    rest = [a for a in argv if a not in ("-v", "--verbose")]
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")
    if not verbose:
        warnings.filterwarnings("ignore")
    try:
        if rest[:1] == ["demo"]:         # their options are their own
            return _forward("benchmarks.demo", "etp-graph demo", rest[1:])
        if rest[:1] == ["bench"]:
            return _forward("benchmarks.run", "etp-graph bench", rest[1:])
        args = p.parse_args(rest)
        return {"inspect": _inspect, "prune": _prune}[args.cmd](args)
    except UsageError as e:
        print(f"etp-graph: error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:
        if verbose:
            raise
        print(f"etp-graph: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
