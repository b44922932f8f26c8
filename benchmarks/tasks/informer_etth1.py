"""Informer on ETTh1 (ETTh2 with ``--option dataset=ETTh2``), input 96, label 48, horizon 24
(``--option horizon=48`` …): the encoder–decoder with ProbSparse attention and distilling.

``etp_graph.zoo.informer.Informer`` at d_model 128, 8 heads, d_ff 512 (``--option d_model=512``
for the paper's width), Adam lr 1e-4, batch 32, MSE on the scaled series. Metric: test MSE and
MAE over all 2,857 test windows (scaled, the Informer paper's convention). Units: heads and FFN
units (d_model is refused by the tracer, with its reason in the cell's ``skipped_groups``).
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from benchmarks.data import load_ett
from etp_graph.zoo.informer import Informer

from benchmarks.distributed import shard

from .base import Budget, Metric, Task, sgd_step

_KEYS = ("x_enc", "x_mark_enc", "x_dec", "x_mark_dec")


class InformerETTh1(Task):
    name = "informer-etth1"
    metric = Metric("mse", False, "test MSE (scaled)")
    speedups = (2.0, 4.0, 8.0)
    budgets = {
        "quick": Budget(dense=532, reg=200, finetune=100, unit="steps (batch 32)",
                        note="dense start 2 epochs; 6–7 min per cell at 1 thread (measured)"),
        "full": Budget(dense=2130, reg=1065, finetune=532, unit="steps (batch 32)",
                       note="8 / 4 / 2 epochs"),
    }
    reg_mode = "grad"
    # ETP's strength from the earlier Informer benchmark; group-sl matched on an 8-head group
    # etp-unit: β_etp / N of that group (its farthest unit pushed as etp pushes that group's)
    betas = {"etp": 0.01, "etp-paper": 0.01, "torque": 0.01, "group-sl": 0.02, "etp-unit": 0.01 / 8, "etp-steep": 0.01}

    def _width(self):
        o = self.options
        return int(o.get("d_model", 128)), int(o.get("heads", 8)), int(o.get("d_ff", 4 * int(o.get("d_model", 128))))

    def load(self) -> None:
        name, horizon = self.options.get("dataset", "ETTh1"), int(self.options.get("horizon", 24))
        self.split = {s: {k: v.to(self.device) if torch.is_tensor(v) else v
                          for k, v in load_ett(name, s, seq_len=96, label_len=48, pred_len=horizon).items()}
                      for s in ("train", "test")}

    def build(self, seed: int):
        torch.manual_seed(seed)
        d_model, heads, d_ff = self._width()
        return Informer(pred_len=int(self.options.get("horizon", 24)), d_model=d_model, n_heads=heads,
                        d_ff=d_ff, seed=seed)

    def train(self, model, length, seed, hook=None, phase="finetune"):
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        data, batch = self.split["train"], 32
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        n, done = len(data["y"]), 0
        model.train()
        bar = tqdm(total=length, desc=phase, leave=False)
        while done < length:
            perm = torch.randperm(n, generator=g)
            for s in range(0, n - batch + 1, batch):
                if done == length:
                    break
                idx = shard(perm[s:s + batch]).to(self.device)   # this process's rows
                loss = F.mse_loss(model(*(data[k][idx] for k in _KEYS)), data["y"][idx])
                sgd_step(model, loss, opt, hook)
                done += 1
                bar.update()
        bar.close()
        model.eval()

    @torch.no_grad()
    def evaluate(self, model) -> Dict[str, float]:
        model.eval()
        data, se, ae = self.split["test"], 0.0, 0.0
        for s in range(0, len(data["y"]), 256):
            d = model(*(data[k][s:s + 256] for k in _KEYS)) - data["y"][s:s + 256]
            se += float((d * d).sum())
            ae += float(d.abs().sum())
        n = data["y"].numel()
        return {"mse": se / n, "mae": ae / n}

    def example_inputs(self):
        return tuple(self.split["test"][k][:32] for k in _KEYS)

    def latency_inputs(self):
        return tuple(self.split["test"][k][:64] for k in _KEYS)

    def heads(self, model):
        return [model.projection]

    def describe(self):
        d_model, heads, d_ff = self._width()
        return {"dataset": self.options.get("dataset", "ETTh1"), "horizon": int(self.options.get("horizon", 24)),
                "model": f"Informer d_model {d_model}, {heads} heads, d_ff {d_ff}, 2 enc + 1 dec, distil, ProbSparse",
                "optimizer": "Adam lr 1e-4, batch 32", "macs_inputs": "32 windows", "units": "heads, FFN units"}


TASK = InformerETTh1
