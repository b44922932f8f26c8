"""Informer on ETTh1/ETTh2: ETP-regularised training then pruning of heads and FFN units to a
MACs target, side by side with the same training without ETP (β = 0), in one run.

    .venv/bin/python benchmarks/informer_etth1.py --pred-len 24 --speedup 2 --epochs 2

Both arms: ``Informer`` (``etp_graph.zoo.informer``; ``--d-model``/``--heads``/``--d-ff``, the
paper uses 512/8/2048), input 96, label 48, Adam lr 1e-4, batch 32, MSE on the scaled series;
``eg.ETPPruner(target_speedup=…)``, ``--finetune-epochs``, then test MSE/MAE (scaled, the
Informer paper's convention). MACs are for one batch of 32 windows (``eg.count_macs``).
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import etp_graph as eg
from etp_graph.datasets import load_ett
from etp_graph.zoo.informer import Informer

_KEYS = ("x_enc", "x_mark_enc", "x_dec", "x_mark_dec")


@torch.no_grad()
def evaluate(model, data, batch=256):
    model.eval()
    se = ae = 0.0
    for s in range(0, len(data["y"]), batch):
        out = model(*(data[k][s:s + batch] for k in _KEYS))
        d = out - data["y"][s:s + batch]
        se += float((d * d).sum())
        ae += float(d.abs().sum())
    n = data["y"].numel()
    return se / n, ae / n


def train(model, data, epochs, lr, batch, seed, pruner=None, desc=None):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(data["y"])
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=g)
        for s in tqdm(range(0, n - batch + 1, batch), desc=f"{desc} epoch {ep + 1}", leave=False):
            idx = perm[s:s + batch]
            loss = F.mse_loss(model(*(data[k][idx] for k in _KEYS)), data["y"][idx])
            if pruner is not None:
                loss = loss + pruner.penalty()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        for grp in opt.param_groups:      # the Informer schedule: halve the rate every epoch
            grp["lr"] *= 0.5
    model.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="ETTh1", choices=("ETTh1", "ETTh2"))
    p.add_argument("--pred-len", type=int, default=24)
    p.add_argument("--speedup", type=float, default=2.0)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--d-ff", type=int, default=512)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--beta", type=float, default=0.01)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--units", default="heads", choices=("heads", "head_dims"))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    split = {s: load_ett(args.data, s, seq_len=96, label_len=48, pred_len=args.pred_len)
             for s in ("train", "test")}
    example = tuple(split["test"][k][:32] for k in _KEYS)
    rows = []
    for beta in (args.beta, 0.0):
        torch.manual_seed(0)
        model = Informer(pred_len=args.pred_len, d_model=args.d_model, n_heads=args.heads, d_ff=args.d_ff, seed=0)
        pruner = eg.ETPPruner(model, example, ignored_layers=[model.projection], target_speedup=args.speedup,
                              config=eg.ETPConfig(beta=beta), attention_units=args.units)
        train(model, split["train"], args.epochs, args.lr, args.batch, 1, pruner if beta > 0 else None,
              desc=f"beta={beta:g}")
        dense = evaluate(model, split["test"])
        report = pruner.step(measure_latency=True, latency_repeat=10)
        pruned = evaluate(model, split["test"])
        train(model, split["train"], args.finetune_epochs, args.lr * 0.5 ** args.epochs, args.batch, 2,
              desc="fine-tune")
        final = evaluate(model, split["test"])
        rows.append({"beta": beta, "dense": dense, "pruned": pruned, "finetuned": final,
                     "skipped": len(pruner.graph.skipped), **report.as_dict()})
        print(report)
    print(f"\nInformer / {args.data} 96->{args.pred_len} test (scaled MSE / MAE), target {args.speedup}x MACs "
          f"by {args.units}, d_model {args.d_model}, {args.epochs}+{args.finetune_epochs} epochs")
    print(f"{'arm':14}{'dense':>16}{'pruned':>16}{'fine-tuned':>16}{'MACs x':>8}{'latency x':>11}")
    for r in rows:
        name = f"ETP β={r['beta']:g}" if r["beta"] else "no ETP (β=0)"
        f = lambda m: f"{m[0]:.4f}/{m[1]:.4f}"   # noqa: E731
        print(f"{name:14}{f(r['dense']):>16}{f(r['pruned']):>16}{f(r['finetuned']):>16}{r['speedup']:8.2f}"
              f"{r['latency_ms'][0] / r['latency_ms'][1]:11.2f}")
    print(f"total {time.perf_counter() - t0:.0f}s, {torch.get_num_threads()} threads")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "runs": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
