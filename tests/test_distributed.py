"""Training past one machine with PyTorch's own engine: two processes (gloo, CPU) train a
DistributedDataParallel model with the ETP penalty on different data, prune it, and end with
identical pruned models and outputs."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import etp_graph as eg


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Conv2d(16, 24, 3, padding=1)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        x = F.relu(self.c2(F.relu(self.b1(self.c1(x)))))
        return self.fc(x.mean((2, 3)))


def _rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)                       # the same start on every rank
    ddp = DistributedDataParallel(Net())
    x = torch.randn(4, 3, 8, 8)
    pruner = eg.ETPPruner(ddp, x, ignored_layers=[ddp.module.fc], config=eg.ETPConfig(beta=1e-2),
                          target_speedup=2.0)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(100 + rank)   # each rank its own data
    for _ in range(4):
        images, labels = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)
        loss = F.cross_entropy(ddp(images), labels) + pruner.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
    report = pruner.step()
    model = DistributedDataParallel(pruner.model)   # new tensors: wrap again
    model.eval()
    with torch.no_grad():
        y = model(torch.ones(2, 3, 8, 8))
    got = [None] * world
    dist.all_gather_object(got, ({k: v.clone() for k, v in model.module.state_dict().items()}, y, report.units_kept))
    if rank == 0:
        states = [s for s, _, _ in got]
        same = all(s.keys() == states[0].keys() and all(torch.equal(s[k], states[0][k]) for k in s) for s in states)
        torch.save({"same_state": same, "same_out": all(torch.equal(o, got[0][1]) for _, o, _ in got),
                    "kept": [k for _, _, k in got], "speedup": report.speedup, "shapes": {k: tuple(v.shape) for k, v in states[0].items()}}, out)
    dist.barrier()   # leave together: a rank tearing gloo down while its peer still works can abort
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_train_with_etp_and_end_with_the_same_pruned_model(tmp_path):
    out = str(tmp_path / "result.pt")
    mp.spawn(_rank, args=(2, _free_port(), out), nprocs=2, join=True)
    r = torch.load(out, weights_only=False)
    assert r["same_state"] and r["same_out"]
    assert r["kept"][0] == r["kept"][1] and r["speedup"] >= 2.0
    assert r["shapes"]["c1.weight"][0] < 16 or r["shapes"]["c2.weight"][0] < 24
