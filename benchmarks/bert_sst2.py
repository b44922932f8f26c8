"""Pretrained all-MiniLM-L6-v2 on SST-2: fine-tune, then ETP vs no ETP, pruned by heads and FFN
units to the same MACs target, side by side in one run.

    .venv/bin/python benchmarks/bert_sst2.py --speedup 2 --steps 400 --etp-steps 300 --finetune 200

1. Fine-tune the dense model (``--steps``, AdamW lr 5e-5, batch 32, length ≤ 64): the dense
   reference, accuracy on the 872 GLUE dev sentences.
2. Two arms from that same checkpoint: ``--etp-steps`` more steps with ETP (``order="norm"``:
   units ranked by their fine-tuned norm; applied decoupled, ``pruner.decay_(--etp-lr)`` after
   each AdamW step, as AdamW decouples weight decay) or without it (β = 0); then
   ``eg.ETPPruner(target_speedup=…)`` removes heads, FFN units and (with ``--hidden``) hidden
   units, globally by norm per MAC saved; then ``--finetune`` steps; dev accuracy.

MACs and latency are for a batch of 32 dev sentences padded to 64 tokens (``eg.count_macs``:
1 fused multiply-add = 1 MAC; embeddings look-ups are free).
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import etp_graph as eg
from etp_graph.datasets import load_sst2
from etp_graph.zoo.bert import load_tokenizer, minilm_sst2


def _encode(tok, sentences, max_len):
    enc = tok(sentences, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@torch.no_grad()
def accuracy(model, tok, sentences, labels, max_len, batch=128) -> float:
    model.eval()
    correct = 0
    for s in range(0, len(sentences), batch):
        logits = model(**_encode(tok, sentences[s:s + batch], max_len))
        correct += int((logits.argmax(1) == labels[s:s + batch]).sum())
    return 100.0 * correct / len(sentences)


def train(model, tok, sentences, labels, steps, lr, batch, max_len, seed, pruner=None, etp_lr=0.0, desc=None):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 - k / max(steps, 1))
    model.train()
    for _ in tqdm(range(steps), desc=desc, leave=False):
        idx = torch.randint(0, len(sentences), (batch,), generator=g)
        x = _encode(tok, [sentences[i] for i in idx], max_len)
        loss = F.cross_entropy(model(**x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if pruner is not None:      # decoupled ETP: Adam would rescale a penalty inside the loss
            pruner.decay_(etp_lr)
    model.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--speedup", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=400, help="dense fine-tuning steps")
    p.add_argument("--etp-steps", type=int, default=300)
    p.add_argument("--finetune", type=int, default=200)
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--etp-lr", type=float, default=0.006, help="step size of the decoupled ETP step")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--hidden", action="store_true", help="also prune the hidden (LayerNorm-coupled) units")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    tok = load_tokenizer()
    train_x, train_y = load_sst2("train")
    dev_x, dev_y = load_sst2("dev")
    example = _encode(tok, dev_x[:32], args.max_len)
    example = {k: F.pad(v, (0, args.max_len - v.shape[1])) for k, v in example.items()}   # fixed 32 x 64

    model = minilm_sst2()
    train(model, tok, train_x, train_y, args.steps, args.lr, args.batch, args.max_len, 0, desc="dense fine-tune")
    dense_acc = accuracy(model, tok, dev_x, dev_y, args.max_len)
    print(f"dense MiniLM after {args.steps} steps: dev accuracy {dense_acc:.2f}% ({time.perf_counter() - t0:.0f}s)")

    rows = []
    for beta in (args.beta, 0.0):
        m = copy.deepcopy(model)
        ignored = [m.classifier, m.hf.bert.pooler.dense]
        hidden = m.hf.config.hidden_size   # unless --hidden, keep the LayerNorm-coupled width
        pruner = eg.ETPPruner(m, example, ignored_layers=ignored, target_speedup=args.speedup,
                              config=eg.ETPConfig(beta=beta, order="norm"),
                              group_filter=None if args.hidden else (lambda g: g.size != hidden))
        train(m, tok, train_x, train_y, args.etp_steps, args.lr, args.batch, args.max_len, 1,
              pruner if beta > 0 else None, args.etp_lr, desc=f"beta={beta:g}")
        before = accuracy(m, tok, dev_x, dev_y, args.max_len)
        report = pruner.step(measure_latency=True, latency_repeat=10)
        pruned = accuracy(m, tok, dev_x, dev_y, args.max_len)
        train(m, tok, train_x, train_y, args.finetune, args.lr, args.batch, args.max_len, 2, desc="fine-tune")
        final = accuracy(m, tok, dev_x, dev_y, args.max_len)
        rows.append({"beta": beta, "before_prune": before, "pruned": pruned, "finetuned": final,
                     **report.as_dict()})
        print(report)

    print(f"\nMiniLM / SST-2 dev (872 sentences), target {args.speedup}x MACs, dense {dense_acc:.2f}%")
    print(f"{'arm':14}{'before %':>10}{'pruned %':>10}{'fine-tuned %':>14}{'vs dense':>10}{'MACs x':>8}{'latency x':>11}")
    for r in rows:
        name = f"ETP β={r['beta']:g}" if r["beta"] else "no ETP (β=0)"
        print(f"{name:14}{r['before_prune']:10.2f}{r['pruned']:10.2f}{r['finetuned']:14.2f}"
              f"{r['finetuned'] - dense_acc:+10.2f}{r['speedup']:8.2f}{r['latency_ms'][0] / r['latency_ms'][1]:11.2f}")
    print(f"total {time.perf_counter() - t0:.0f}s, {torch.get_num_threads()} threads")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "dense": dense_acc, "runs": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
