"""CIFAR-10/100 loaders into memory (uint8 tensors) and the few transforms training needs.

Accepted layouts (``root`` is a folder or a file):

* the JPEG zip of ``../shared/data/cifar10_jpeg/cifar10_jpeg.zip``
  (``train/<class>/*.jpg``, ``test/<class>/*.jpg``; sorted class names are the labels), or the
  same tree unpacked;
* torchvision's pickled folders: ``cifar-10-batches-py/`` (``data_batch_1..5``, ``test_batch``)
  and ``cifar-100-python/`` (``train``, ``test``; fine labels).

Nothing is downloaded; a missing data set raises ``FileNotFoundError`` naming what was looked for.
"""
from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Iterator, List, Optional, Tuple, Union

import numpy as np
import torch

__all__ = ["load_cifar", "load_planetoid", "load_ppi", "load_ett", "load_sst2", "default_data_dir", "normalize", "augment", "batches", "CIFAR_MEAN", "CIFAR_STD"]

#: the normalisation the pretrained CIFAR ResNets (akamaster/pytorch_resnet_cifar10) were trained with
CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)


def default_data_dir() -> Path:
    """``$ETP_GRAPH_DATA`` (``make`` sets it to ``../shared/data`` beside the checkout); every
    loader also takes its folder as an argument."""
    env = os.environ.get("ETP_GRAPH_DATA")
    if not env:
        raise FileNotFoundError("no data folder: set ETP_GRAPH_DATA to the folder holding the data sets "
                                "(in this project's checkout, ../shared/data; `make` sets it) or pass "
                                "the loader's root= / the runner's --option data=PATH")
    return Path(env)


def _decode_jpegs(names: List[str], read) -> np.ndarray:
    from PIL import Image
    out = np.empty((len(names), 32, 32, 3), dtype=np.uint8)
    for k, n in enumerate(names):
        with Image.open(io.BytesIO(read(n))) as im:
            out[k] = np.asarray(im.convert("RGB"))
    return out


def _from_jpeg_tree(names: List[str], read, split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    files = sorted(n for n in names if n.lower().endswith((".jpg", ".jpeg"))
                   and len(Path(n).parts) >= 3 and Path(n).parts[-3] == split)
    if not files:
        raise FileNotFoundError(f"no {split}/<class>/*.jpg images found")
    classes = sorted({Path(n).parts[-2] for n in files})
    labels = torch.tensor([classes.index(Path(n).parts[-2]) for n in files], dtype=torch.long)
    return torch.from_numpy(_decode_jpegs(files, read)), labels


def _from_pickles(folder: Path, split: str, fine: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    if fine:
        files = [folder / ("train" if split == "train" else "test")]
    else:
        files = [folder / f"data_batch_{i}" for i in range(1, 6)] if split == "train" else [folder / "test_batch"]
    xs, ys = [], []
    for f in files:
        with open(f, "rb") as fh:
            d = pickle.load(fh, encoding="latin1")
        xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.extend(d["fine_labels" if fine else "labels"])
    return torch.from_numpy(np.concatenate(xs)), torch.tensor(ys, dtype=torch.long)


def load_cifar(root: Optional[Union[str, Path]] = None, split: str = "train", name: str = "cifar10",
               limit: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images ``uint8 [N, 32, 32, 3]`` and labels ``long [N]`` of a CIFAR split.

    Args:
        root: a data folder or file (default :func:`default_data_dir`); searched for the layouts
            in the module docstring.
        split: ``"train"`` or ``"test"``.
        name: ``"cifar10"`` or ``"cifar100"``.
        limit: keep the first ``limit`` images of each class-balanced ordering (for quick runs).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name not in ("cifar10", "cifar100"):
        raise ValueError(f"name must be 'cifar10' or 'cifar100', got {name!r}")
    root = Path(root) if root is not None else default_data_dir()
    tried = []
    pickled = "cifar-100-python" if name == "cifar100" else "cifar-10-batches-py"
    for folder in (root / pickled, root):
        tried.append(str(folder / ("train" if name == "cifar100" else "data_batch_1")))
        if (folder / ("train" if name == "cifar100" else "data_batch_1")).is_file():
            x, y = _from_pickles(folder, split, fine=name == "cifar100")
            return _limit(x, y, limit)
    if name == "cifar10":
        for z in (root, root / "cifar10_jpeg.zip", root / "cifar10_jpeg" / "cifar10_jpeg.zip"):
            tried.append(str(z))
            if z.is_file() and zipfile.is_zipfile(z):
                with zipfile.ZipFile(z) as zf:
                    x, y = _from_jpeg_tree(zf.namelist(), zf.read, split)
                return _limit(x, y, limit)
        for d in (root, root / "cifar10_jpeg"):
            tried.append(str(d / split))
            if (d / split).is_dir():
                names = [str(p.relative_to(d)) for p in (d / split).rglob("*") if p.is_file()]
                x, y = _from_jpeg_tree(names, lambda n, d=d: (d / n).read_bytes(), split)
                return _limit(x, y, limit)
    raise FileNotFoundError(f"{name} {split} data not found; looked for: {', '.join(tried)}. Put torchvision's "
                            f"'{pickled}' folder (or, for CIFAR-10, the JPEG zip) there, or set ETP_GRAPH_DATA")


def _limit(x, y, limit):
    if limit is None or limit >= len(y):
        return x, y
    g = torch.Generator().manual_seed(0)
    keep = torch.randperm(len(y), generator=g)[:limit].sort().values
    return x[keep], y[keep]


def normalize(images: torch.Tensor, mean=CIFAR_MEAN, std=CIFAR_STD) -> torch.Tensor:
    """``uint8 [N, H, W, 3]`` → ``float [N, 3, H, W]``, scaled to [0, 1] and standardised."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x - m) / s


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop after zero padding by ``pad`` and random horizontal flip, per image."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h))              # [n, h]
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w))              # [n, w]
    flip = torch.rand(n, generator=generator) < 0.5
    cols = torch.where(flip.view(n, 1), cols.flip(1), cols)
    idx_n = torch.arange(n).view(n, 1, 1)
    out = padded.permute(0, 2, 3, 1)[idx_n, rows.view(n, h, 1), cols.view(n, 1, w)]   # [n, h, w, c]
    return out.permute(0, 3, 1, 2).contiguous()


def batches(n: int, batch_size: int, generator: Optional[torch.Generator] = None) -> Iterator[torch.Tensor]:
    """Index batches over ``n`` items: shuffled (forever) with a generator, else once in order."""
    if generator is None:
        for s in range(0, n, batch_size):
            yield torch.arange(s, min(s + batch_size, n))
        return
    while True:
        perm = torch.randperm(n, generator=generator)
        for s in range(0, n - batch_size + 1, batch_size):
            yield perm[s:s + batch_size]


# ------------------------------------------------------------------------------------- graphs
def _cache_dir() -> Path:
    return Path(os.environ.get("ETP_GRAPH_CACHE", Path.home() / ".cache" / "etp_graph"))


def load_planetoid(name: str = "Cora", root: Optional[Union[str, Path]] = None):
    """A Planetoid citation graph (``Cora``, ``CiteSeer``, ``PubMed``) as one PyG ``Data`` with the
    standard public split masks.

    ``root`` holds ``<name>/raw/ind.<name>.*`` (default ``<data>/planetoid``). PyG writes a
    ``processed/`` folder beside ``raw/``, so the raw files are copied to a writable cache
    (``$ETP_GRAPH_CACHE``, default ``~/.cache/etp_graph``) first; nothing is downloaded.
    """
    import shutil
    from torch_geometric.datasets import Planetoid
    root = Path(root) if root is not None else default_data_dir() / "planetoid"
    raw = root / name / "raw"
    prefix = f"ind.{name.lower()}."
    needed = [prefix + s for s in ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index")]
    missing = [f for f in needed if not (raw / f).is_file()]
    if missing:
        raise FileNotFoundError(f"Planetoid {name}: {missing} not found in {raw}; put the raw Planetoid "
                                f"files there (the layout torch_geometric.datasets.Planetoid reads) or pass root=")
    work = _cache_dir() / "planetoid"
    dst = work / name / "raw"
    dst.mkdir(parents=True, exist_ok=True)
    for f in needed:
        if not (dst / f).is_file() or (dst / f).stat().st_size != (raw / f).stat().st_size:
            shutil.copyfile(raw / f, dst / f)
    return Planetoid(str(work), name)[0]


def load_ppi(root: Optional[Union[str, Path]] = None, split: str = "train"):
    """The PPI graphs (``torch_geometric.datasets.PPI``: 20 train / 2 val / 2 test graphs, 50
    features, 121 labels) from ``root`` (default ``<data>/PPI``). Never downloads: without the
    raw or processed files it raises ``FileNotFoundError`` saying what to put where."""
    from torch_geometric.datasets import PPI
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    root = Path(root) if root is not None else default_data_dir() / "PPI"
    raw = [root / "raw" / f"{s}_{k}" for s in ("train", "valid", "test")
           for k in ("graph.json", "feats.npy", "graph_id.npy", "labels.npy")]
    processed = [root / "processed" / f"{s}.pt" for s in ("train", "val", "test")]
    if not all(p.is_file() for p in processed) and not all(p.is_file() for p in raw):
        raise FileNotFoundError(
            f"PPI data not found under {root}: need raw/{{train,valid,test}}_{{graph.json,feats.npy,"
            "graph_id.npy,labels.npy} (the layout of torch_geometric.datasets.PPI) or its processed/ "
            "folder; this machine cannot download it, copy it there or pass root=")
    return PPI(str(root), split=split)


# ---------------------------------------------------------------------------------- time series
ETT_HORIZONS = (24, 48, 168, 336, 720)


def _time_features(stamps) -> np.ndarray:
    """Hour-of-day, day-of-week, day-of-month, day-of-year, each scaled to [-0.5, 0.5] (the
    Informer ``timeF`` encoding for hourly data)."""
    return np.array([[s.hour / 23.0 - 0.5, s.weekday() / 6.0 - 0.5, (s.day - 1) / 30.0 - 0.5,
                      (s.timetuple().tm_yday - 1) / 365.0 - 0.5] for s in stamps], dtype=np.float32)


def load_ett(name: str = "ETTh1", split: str = "train", seq_len: int = 96, label_len: int = 48,
             pred_len: int = 24, root: Optional[Union[str, Path]] = None):
    """Sliding windows over ``ETTh1.csv``/``ETTh2.csv`` with the standard Informer protocol:
    12/4/4 months for train/val/test, all 7 variables, standard scaling fitted on train.

    Returns a dict of tensors, one row per window: ``x_enc (N, seq_len, 7)``, ``x_mark_enc``,
    ``x_dec (N, label_len + pred_len, 7)`` (the last ``pred_len`` steps zeroed, as Informer feeds
    them), ``x_mark_dec``, and the target ``y (N, pred_len, 7)`` (scaled), plus ``mean``/``std``.
    """
    import csv
    from datetime import datetime
    if name not in ("ETTh1", "ETTh2"):
        raise ValueError(f"name must be 'ETTh1' or 'ETTh2', got {name!r}")
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    if pred_len <= 0 or seq_len <= 0 or not 0 <= label_len <= seq_len:
        raise ValueError("need seq_len > 0, pred_len > 0 and 0 <= label_len <= seq_len")
    path = (Path(root) if root is not None else default_data_dir() / "ETT-small") / f"{name}.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; put {name}.csv (github.com/zhouhaoyi/ETDataset, "
                                "ETT-small/) there or pass root=")
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    header, rows = rows[0], rows[1:]
    stamps = [datetime.fromisoformat(r[0]) for r in rows]
    values = np.array([[float(v) for v in r[1:]] for r in rows], dtype=np.float32)
    month = 30 * 24
    starts = [0, 12 * month - seq_len, 16 * month - seq_len]
    ends = [12 * month, 16 * month, 20 * month]
    k = ("train", "val", "test").index(split)
    train = values[:ends[0]]
    mean, std = train.mean(0), train.std(0)
    data = (values - mean) / std
    marks = _time_features(stamps)
    lo, hi = starts[k], ends[k]
    n = hi - lo - seq_len - pred_len + 1
    if n <= 0:
        raise ValueError(f"{split} split of {name} is too short for seq_len={seq_len} + pred_len={pred_len}")
    s = np.arange(n)[:, None] + lo
    enc_idx = s + np.arange(seq_len)
    dec_idx = s + seq_len - label_len + np.arange(label_len + pred_len)
    x_dec = data[dec_idx].copy()
    x_dec[:, label_len:] = 0.0
    return {"x_enc": torch.from_numpy(data[enc_idx]), "x_mark_enc": torch.from_numpy(marks[enc_idx]),
            "x_dec": torch.from_numpy(x_dec), "x_mark_dec": torch.from_numpy(marks[dec_idx]),
            "y": torch.from_numpy(data[dec_idx[:, label_len:]]), "columns": header[1:],
            "mean": torch.from_numpy(mean), "std": torch.from_numpy(std)}


# ----------------------------------------------------------------------------------------- text
def load_sst2(split: str = "train", root: Optional[Union[str, Path]] = None) -> Tuple[List[str], torch.Tensor]:
    """GLUE SST-2 sentences and labels (0 negative, 1 positive) from ``<root>/<split>.tsv``
    (default ``<data>/SST-2``; header ``sentence\\tlabel``, GLUE's layout, read with
    ``csv.QUOTE_NONE``). ``split`` is ``train`` (67,349) or ``dev`` (872): GLUE's test labels are
    hidden, so it is refused."""
    import csv
    if split not in ("train", "dev"):
        raise ValueError(f"split must be 'train' or 'dev' (GLUE hides the SST-2 test labels), got {split!r}")
    root = Path(root) if root is not None else default_data_dir() / "SST-2"
    path = root / f"{split}.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"SST-2 {split} split not found: {path}; put GLUE's SST-2 "
                                f"{{train,dev}}.tsv there (header 'sentence\\tlabel') or pass root=")
    sentences, labels = [], []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None or "sentence" not in header or "label" not in header:
            raise ValueError(f"{path}: expected a header with 'sentence' and 'label', got {header!r}")
        si, li = header.index("sentence"), header.index("label")
        for k, row in enumerate(reader, start=2):
            if len(row) != len(header):
                raise ValueError(f"{path}:{k}: expected {len(header)} tab-separated fields, got {len(row)}")
            sentences.append(row[si])
            labels.append(int(row[li]))
    return sentences, torch.tensor(labels, dtype=torch.long)
