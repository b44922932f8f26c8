"""The benchmark runner under ``torchrun`` (two gloo processes on CPU): the same cells as one
process would write, written once, with every rank ending on the same numbers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import distributed

ROOT = Path(__file__).resolve().parents[2]


def test_shards_of_a_batch_are_disjoint_and_cover_it(monkeypatch):
    idx = torch.arange(10, 20)
    assert torch.equal(distributed.shard(idx), idx)            # one process: the whole batch
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    parts = []
    for r in range(3):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        parts.append(distributed.shard(idx))
    assert sorted(torch.cat(parts).tolist()) == idx.tolist()
    assert [len(p) for p in parts] == [4, 3, 3]
    with pytest.raises(ValueError, match="a batch of 2 cannot be split over 3 processes"):
        distributed.shard(idx[:2])


def test_torchrun_two_processes_write_each_cell_once(tmp_path):
    out, cache = tmp_path / "results", tmp_path / "cache"
    env = {**os.environ, "ETP_GRAPH_CACHE": str(cache), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "benchmarks.run", "tiny-cnn", "--methods", "etp,magnitude", "--seeds", "0",
           "--out", str(out), "--latency-repeat", "2"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stdout and done.stdout.count("cells to run") == 1   # rank 0 speaks
    files = sorted(p.name for p in (out / "tiny-cnn" / "quick").iterdir())
    assert files == ["etp-s0-soft0.75-streams.json", "magnitude-s0-soft0.75-streams.json"]                 # no temporary files left
    for name in files:
        cell = json.loads((out / "tiny-cnn" / "quick" / name).read_text())
        assert cell["machine"]["processes"] == 2
        assert [c["target"] for c in cell["cuts"]] == [1.5, 2.0]
        assert all(c["speedup"] >= c["target"] * 0.97 for c in cell["cuts"])
    # the dense start was trained once, by both ranks together, and saved once
    assert [p.name for p in cache.rglob("*.pt") if "dense" in p.name] == ["tiny-cnn-quick-dense20-s0.pt"]
