"""Optional dependencies, one per model family: a clear error naming the extra to install.

``pip install 'etp-graph[pyg]'`` (PyTorch Geometric: GAT), ``[hf]`` (Hugging Face transformers:
the BERT-family zoo), ``[bench]`` (the benchmark suite's plots and JPEG decoding), ``[viz]``
(pictures of the dependency graph: pyvis, graphviz). The engine
itself (trace, ETP, prune) needs none of them.
"""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]

EXTRAS = {"torch_geometric": "pyg", "transformers": "hf", "matplotlib": "bench", "PIL": "bench",
          "pyvis": "viz", "graphviz": "viz"}


def require(module: str, what: str) -> ModuleType:
    """Import ``module`` or raise ``ImportError`` saying which extra provides it and for what."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        extra = EXTRAS.get(module.split(".")[0])
        hint = f"pip install 'etp-graph[{extra}]'" if extra else f"pip install {module.split('.')[0]}"
        raise ImportError(f"{what} needs the optional dependency {module.split('.')[0]!r}: {hint}") from e
