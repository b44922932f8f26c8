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
import ast
import importlib
import importlib.util
import logging
import os
import sys
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from . import zoo
from .counting import count_macs, count_params, unsupported_ops
from .graph import trace
from .graph.budget import TIME_LIMIT
from .io import save_pruned

from .log import log


class UsageError(Exception):
    """Bad usage: printed as one line, exit status 2."""


def _factory_kwargs(pairs: Optional[List[str]]) -> Dict[str, Any]:
    """``--arg key=value`` pairs; a value is a Python literal (``64``, ``0.1``, ``True``,
    ``[2, 2]``) or else the string itself."""
    out: Dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(f"--arg {pair!r}: expected name=value, e.g. --arg num_classes=10")
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text
    return out


def _is_hf_class(factory) -> bool:
    """A Hugging Face model class: built from its ``config_class``, not from keyword arguments."""
    return isinstance(factory, type) and issubclass(factory, nn.Module) and \
        getattr(factory, "config_class", None) is not None and hasattr(factory, "from_pretrained")


def load_model(spec: str, kwargs: Optional[Dict[str, Any]] = None) -> Tuple[nn.Module, Any, List[nn.Module]]:
    """``(model, default example inputs or None, default ignored layers)`` for MODEL, built with
    ``kwargs`` (a Hugging Face model class gets them as its config's fields)."""
    kwargs = kwargs or {}
    if spec.startswith("zoo:"):
        name = spec[4:]
        if name not in zoo.list_models():
            raise UsageError(f"no zoo model {name!r}; one of: {', '.join(zoo.list_models())}")
        e = zoo.entry(name)
        if kwargs:
            raise UsageError(f"--arg: zoo model {name!r} is built as registered; use its factory "
                             f"({e.build.__module__}:...) to change it")
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
        try:
            module_spec.loader.exec_module(module)
        except ImportError as e:
            raise UsageError(f"MODEL {spec!r}: running {where!r} failed ({e}); a file inside a package "
                             "is named as package.module:factory") from e
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise UsageError(f"MODEL {spec!r}: cannot import {where!r} ({e})") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UsageError(f"MODEL {spec!r}: {where!r} has no callable {attr!r}")
    try:
        if _is_hf_class(factory):
            known = factory.config_class().to_dict()
            unknown = sorted(set(kwargs) - set(known))
            if unknown:
                raise UsageError(f"--arg {unknown[0]}: {factory.config_class.__name__} has no such field "
                                 f"(it has {', '.join(sorted(k for k in known if not k.startswith('_'))[:12])}, ...)")
            model = factory(factory.config_class(**kwargs))
        else:
            model = factory(**kwargs)
    except TypeError as e:
        raise UsageError(f"MODEL {spec!r}: {attr}() with {kwargs or 'no arguments'} failed: {e}; "
                         "pass its arguments with --arg name=value") from e
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


def _random(model: nn.Module, shape: Tuple[int, ...]) -> Any:
    """A random input of ``shape``: token ids (a keyword argument) for a model whose declared
    main input is ``input_ids`` (Hugging Face's ``main_input_name``), floats otherwise."""
    if getattr(model, "main_input_name", None) == "input_ids":
        vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 2
        return {"input_ids": torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(0))}
    return torch.randn(*shape)


def example_inputs(args, default, model: Optional[nn.Module] = None) -> Any:
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
        return _random(model, shapes[0]) if len(shapes) == 1 else tuple(torch.randn(*s) for s in shapes)
    if default is None and getattr(model, "main_input_name", None) == "input_ids":
        return _random(model, (2, 16))
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


def _seconds(text: str) -> Optional[float]:
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0 or 'none', got {text!r}")
    return value


GRAPH_FORMATS = (".html", ".dot", ".gv", ".svg", ".png")


def _inspect(args) -> int:
    if args.graph and os.path.splitext(args.graph)[1].lower() not in GRAPH_FORMATS:
        raise UsageError(f"--graph {args.graph!r}: write one of {', '.join(GRAPH_FORMATS)}")
    model, default, heads = load_model(args.model, _factory_kwargs(args.arg))
    x = example_inputs(args, default, model)
    model.eval()
    log.info("tracing %s", type(model).__name__)
    graph = trace(model, x, ignored_layers=ignored(model, args.ignore, heads), time_limit=args.time_limit)
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
    model, default, heads = load_model(args.model, _factory_kwargs(args.arg))
    _checkpoint(model, args.checkpoint)
    x = example_inputs(args, default, model)
    model.eval()
    target = {"target_speedup": args.target_speedup} if args.target_speedup else {"pruning_ratio": args.pruning_ratio}
    pruner = ETPPruner(model, x, ignored_layers=ignored(model, args.ignore, heads), round_to=args.round_to,
                       time_limit=args.time_limit, **target)
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
        s.add_argument("--arg", action="append", metavar="NAME=VALUE",
                       help="a keyword argument of the factory (repeatable; a Python literal or a string); "
                            "a Hugging Face model class gets them as its config's fields")
        s.add_argument("--input-shape", action="append", metavar="1,3,224,224",
                       help="a random input of this shape (repeat for several positional inputs); token ids "
                            "for a model whose main input is input_ids (Hugging Face)")
        s.add_argument("--inputs", metavar="x.pt", help="example inputs saved with torch.save "
                                                       "(a Tensor, a tuple or a dict of keyword arguments)")
        s.add_argument("--ignore", action="append", metavar="NAME",
                       help="a module never pruned, e.g. the task head (repeatable; zoo models know theirs)")
        s.add_argument("--time-limit", type=_seconds, default=TIME_LIMIT, metavar="SECONDS",
                       help=f"seconds the trace may take (default {TIME_LIMIT:g}; 'none': no limit); what is "
                            "left when it runs out is skipped with the reason")
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
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")   # its config notes are not ours to print
        logging.getLogger("transformers").setLevel(logging.ERROR)
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
