"""``make demo``: the pretrained ResNet-56 on CIFAR-10 (JPEG), ETP fine-tune → prune to a MACs
target → fine-tune, with the report (MACs, params, latency, accuracy at every stage).

    python -m benchmarks.demo [--speedup 2] [--etp-steps 200] [--finetune-steps 200] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
import warnings

import torch

from etp_graph import ETPConfig, ETPPruner, zoo
from etp_graph.counting import compare_latency
from etp_graph.testing import assert_prune_equivalent

from .data import load_cifar, normalize
from .training import evaluate, train_steps


def run(args) -> int:
    """Pretrained ResNet-56 on CIFAR-10 (JPEG): ETP fine-tune → prune to a MACs target → fine-tune."""
    torch.manual_seed(0)
    t_start = time.perf_counter()
    e = zoo.entry("resnet56_cifar")
    model = e.build(pretrained=True)
    x = e.example_inputs()
    heads = e.heads(model)
    train_x, train_y = load_cifar(args.data, "train")
    test_x, test_y = load_cifar(args.data, "test", limit=args.test_images)
    print(f"data: {len(train_y):,} train / {len(test_y):,} test CIFAR-10 images (JPEG) "
          f"in {time.perf_counter() - t_start:.0f}s; {torch.get_num_threads()} threads")

    acc = {"dense (pretrained)": evaluate(model, test_x, test_y, desc="eval dense")}
    print(f"dense accuracy: {acc['dense (pretrained)']:.2f}%")

    config = ETPConfig(beta=args.beta, c=args.c, pivot=0, profile="exp", norm="l2", order=args.order)
    pruner = ETPPruner(model, x, ignored_layers=heads, config=config, target_speedup=args.speedup,
                         max_pruning_ratio=args.max_ratio)
    print(f"traced: {len(pruner.graph.groups)} coupled groups, {len(pruner.graph.skipped)} skipped; "
          f"ETP penalty at start {float(pruner.penalty()):.4f}")
    checks = assert_prune_equivalent(model, x, ignored_layers=heads)
    print(f"mask-then-prune equivalence: {len(checks)} checks passed")

    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=0 if args.beta else 1e-4)
    loss = train_steps(model, train_x, train_y, args.etp_steps, opt, pruner=pruner,
                       batch_size=args.batch_size, seed=1, desc="ETP fine-tune")
    acc["dense after ETP training"] = evaluate(model, test_x, test_y, desc="eval ETP-trained")
    print(f"ETP fine-tune: {args.etp_steps} steps, last task loss {loss:.3f}, penalty "
          f"{float(pruner.penalty()):.4f}, accuracy {acc['dense after ETP training']:.2f}%")

    batch = normalize(test_x[:args.batch_size])      # latency also at a realistic batch
    before = copy.deepcopy(model)
    report = pruner.step(measure_latency=True, latency_repeat=20)
    lat_batch = compare_latency([before, model], batch, warmup=2, repeat=10)    # side by side
    del before
    acc["pruned, before fine-tune"] = evaluate(model, test_x, test_y, desc="eval pruned")
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(args.finetune_steps, 1))
    train_steps(model, train_x, train_y, args.finetune_steps, opt, batch_size=args.batch_size, seed=2,
                scheduler=sched, desc="fine-tune pruned")
    acc["pruned, after fine-tune"] = evaluate(model, test_x, test_y, desc="eval final")

    total = time.perf_counter() - t_start
    _print_report(args, report, acc, batch, lat_batch, len(test_y), total)
    if args.json:
        out = {"config": {**vars(args), "etp": dataclasses.asdict(config), "threads": torch.get_num_threads()},
               "accuracy": acc, "test_images": len(test_y), "seconds": round(total, 1),
               **report.as_dict(), "latency_ms_batch": [len(batch)] + [x["median_ms"] for x in lat_batch],
               "latency_speedup_batch": lat_batch[1]["ratio_to_first"]}
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
        print(f"results and resolved configuration written to {args.json}")
    return 0


def _print_report(args, report, acc, batch, lat_batch, n_test, total) -> None:
    print()
    print(report)
    print(f"latency, batch of {len(batch)} test images (median of 10, side by side): "
          f"{lat_batch[0]['median_ms']:.1f} -> {lat_batch[1]['median_ms']:.1f} ms "
          f"({lat_batch[1]['ratio_to_first']:.2f}x)")
    print(f"\naccuracy on the same {n_test:,} test images:")
    for k, v in acc.items():
        print(f"  {k:28}{v:6.2f}%")
    drop = acc["dense (pretrained)"] - acc["pruned, after fine-tune"]
    print(f"  {'change vs dense':28}{-drop:+6.2f} pt at {report.speedup:.2f}x fewer MACs")
    print(f"\ntotal {total:.0f}s (ETP {args.etp_steps} steps, fine-tune "
          f"{args.finetune_steps} steps, batch {args.batch_size}, beta {args.beta}, c {args.c})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--speedup", type=float, default=2.0, help="MACs speed-up target")
    p.add_argument("--etp-steps", type=int, default=200, help="ETP fine-tuning steps before pruning")
    p.add_argument("--finetune-steps", type=int, default=200, help="fine-tuning steps after pruning")
    p.add_argument("--beta", type=float, default=0.1, help="ETP strength")
    p.add_argument("--max-ratio", type=float, default=None, help="remove at most this fraction of a group's units")
    p.add_argument("--c", type=float, default=5.0, help="ETP exponent")
    p.add_argument("--order", choices=("index", "norm"), default="norm",
                   help="place units along the ETP profile by index (public code) or by pretrained norm")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--test-images", type=int, default=None, help="evaluate on a random subset")
    p.add_argument("--data", default=None, help="data folder (default $ETP_GRAPH_DATA; make sets it to ../shared/data)")
    p.add_argument("--json", default=None, help="also write the results and the resolved configuration here")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
