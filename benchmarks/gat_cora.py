"""GAT on Cora/CiteSeer: ETP-regularised training then pruning to a MACs target, side by side
with the same training without ETP (β = 0) pruned by coupled norm to the same target.

    .venv/bin/python benchmarks/gat_cora.py --dataset Cora --speedup 4 --seeds 3

Both arms: the paper's 2-layer GAT (8 heads of 8, one averaged output head), Adam lr 0.005,
weight decay 5e-4, dropout 0.6, ``--epochs`` of training, ``eg.ETPPruner(target_speedup=…)``
(heads or ``--units head_dims``), ``--finetune`` epochs, then test accuracy on the public split. Each training phase keeps its
best-validation epoch (the paper's model selection; the ETP arm's selection sees the penalised
model, as a user's would).
MACs are fvcore's for one full-graph forward (message passing included, ``eg.count_macs``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import etp_graph as eg
from etp_graph.datasets import load_planetoid
from etp_graph.zoo.gat import GAT


def _accuracy(model, data, mask) -> float:
    model.eval()
    with torch.no_grad():
        pred = model(data.x, data.edge_index).argmax(1)
    return 100.0 * float((pred[mask] == data.y[mask]).float().mean())


def _train(model, data, epochs, lr, pruner=None):
    """Full-batch Adam; keeps the weights of the epoch with the best validation accuracy (the GAT
    paper's model selection), so no arm is judged on a late over-fitted epoch."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=5e-4)
    best, best_state = -1.0, None
    for _ in range(epochs):
        model.train()
        loss = F.cross_entropy(model(data.x, data.edge_index)[data.train_mask], data.y[data.train_mask])
        if pruner is not None:
            loss = loss + pruner.penalty()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        val = _accuracy(model, data, data.val_mask)
        if val >= best:
            best, best_state = val, {k: v.clone() for k, v in model.state_dict().items()}
    if best_state is not None:
        model.load_state_dict(best_state)


def run_arm(data, seed: int, beta: float, args) -> dict:
    torch.manual_seed(seed)
    model = GAT(data.num_features, 8, int(data.y.max()) + 1, heads=(8, 1))
    x = (data.x, data.edge_index)
    config = eg.ETPConfig(beta=beta, c=args.c, pivot=0, order="index")
    pruner = eg.ETPPruner(model, x, ignored_layers=[model.head], config=config,
                          target_speedup=args.speedup, attention_units=args.units)
    _train(model, data, args.epochs, args.lr, pruner if beta > 0 else None)
    dense = _accuracy(model, data, data.test_mask)
    report = pruner.step(measure_latency=True, latency_repeat=20)
    pruned = _accuracy(model, data, data.test_mask)
    _train(model, data, args.finetune, args.lr)
    final = _accuracy(model, data, data.test_mask)
    return {"seed": seed, "beta": beta, "dense": dense, "pruned": pruned, "finetuned": final,
            **report.as_dict()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="Cora", choices=("Cora", "CiteSeer", "PubMed"))
    p.add_argument("--speedup", type=float, default=4.0)
    p.add_argument("--units", default="heads", choices=("heads", "head_dims"))
    p.add_argument("--beta", type=float, default=0.05)
    p.add_argument("--c", type=float, default=5.0)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--finetune", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.005)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    data = load_planetoid(args.dataset)
    rows = [run_arm(data, s, b, args) for b in (args.beta, 0.0) for s in range(args.seeds)]
    print(f"GAT / {args.dataset}: target {args.speedup}x MACs by {args.units}, {args.epochs}+{args.finetune} "
          f"epochs, {args.seeds} seeds, {torch.get_num_threads()} threads")
    print(f"{'arm':14}{'dense %':>10}{'pruned %':>10}{'fine-tuned %':>14}{'MACs x':>8}{'latency x':>11}")
    for b in (args.beta, 0.0):
        rs = [r for r in rows if r["beta"] == b]
        m = {k: statistics.mean(r[k] for r in rs) for k in ("dense", "pruned", "finetuned", "speedup")}
        sd = statistics.pstdev(r["finetuned"] for r in rs)
        lat = statistics.mean(r["latency_ms"][0] / r["latency_ms"][1] for r in rs)
        name = f"ETP β={b:g}" if b else "no ETP (β=0)"
        print(f"{name:14}{m['dense']:10.2f}{m['pruned']:10.2f}{m['finetuned']:9.2f} ±{sd:.2f}"
              f"{m['speedup']:8.2f}{lat:11.2f}")
    print(f"MACs {rows[0]['macs'][0]:,} -> {rows[0]['macs'][1]:,} (seed 0, ETP); units kept {rows[0]['units_kept']}")
    print(f"total {time.perf_counter() - t0:.0f}s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "runs": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
