"""Benchmark tasks, one file each, registered by name (``python -m benchmarks.run TASK``)."""
from __future__ import annotations

import importlib
from typing import Dict, Type

from .base import Task

#: task name → module under benchmarks.tasks (imported when the task is asked for)
TASKS: Dict[str, str] = {
    "tiny-cnn": "tiny",
    "gat-cora": "gat_cora",
    "informer-etth1": "informer_etth1",
    "resnet56-cifar10": "resnet56_cifar10",
    "vgg19-cifar10": "vgg19_cifar10",
    "minilm-sst2": "minilm_sst2",
}


def get_task(name: str) -> Type[Task]:
    if name not in TASKS:
        raise KeyError(f"no benchmark task {name!r}; known: {', '.join(sorted(TASKS))}")
    return importlib.import_module(f"{__name__}.{TASKS[name]}").TASK
