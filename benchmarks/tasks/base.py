"""What every benchmark task provides: data, a dense start, a training loop, an evaluation, budgets.

A task trains through :meth:`Task.train`, which calls a :class:`RegHook` (the method's
regulariser) at the one place its optimiser needs it, so every method sees the same data order,
optimiser and steps; only the hook differs.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

import etp_graph as eg


@dataclasses.dataclass(frozen=True)
class Budget:
    """Training lengths of one budget, in the task's ``unit`` (steps or epochs).

    ``dense``: training of the dense start (its own budget, cached per seed, not part of the
    grid); ``reg``: the regularisation phase every method gets; ``finetune``: after each cut."""

    dense: int
    reg: int
    finetune: int
    unit: str = "steps"
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Metric:
    name: str                 #: the key of :meth:`Task.evaluate`'s dict that ranks methods
    higher_is_better: bool
    label: str                #: axis label of the plots


class RegHook:
    """A method's regulariser inside a task's loop: ``"grad"`` adds ``∂R/∂θ`` to ``.grad`` after
    ``backward()`` (SGD, and Torch-Pruning's sparse-learning recipe); ``"decay"`` takes a
    decoupled step ``θ ← θ − lr_scale·lr·∂R/∂θ`` after ``optimizer.step()`` (Adam)."""

    def __init__(self, regularizer: Optional[eg.Regularizer], mode: str, lr_scale: float = 1.0):
        if mode not in ("grad", "decay"):
            raise ValueError(f"RegHook mode must be 'grad' or 'decay', got {mode!r}")
        self.regularizer, self.mode, self.lr_scale = regularizer, mode, lr_scale

    def after_backward(self) -> None:
        if self.regularizer is not None and self.mode == "grad":
            self.regularizer.apply_()

    def after_step(self, lr: float) -> None:
        if self.regularizer is not None and self.mode == "decay":
            self.regularizer.decay_(lr * self.lr_scale)


def sgd_step(model: nn.Module, loss: torch.Tensor, opt: torch.optim.Optimizer, hook: Optional[RegHook]) -> None:
    """One optimiser step with the regulariser hook in its place (the loop every task shares)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if hook is not None:
        hook.after_backward()
    opt.step()
    if hook is not None:
        hook.after_step(opt.param_groups[0]["lr"])


def cache_dir() -> Path:
    """Where dense starts are cached (outside the repository): ``$ETP_GRAPH_CACHE/benchmarks``."""
    return Path(os.environ.get("ETP_GRAPH_CACHE", Path.home() / ".cache" / "etp_graph")) / "benchmarks"


class Task:
    """Base class of a benchmark task; subclasses fill in the class attributes and methods."""

    name: str = ""
    metric: Metric
    speedups: Tuple[float, ...] = (2.0, 4.0, 8.0)
    budgets: Dict[str, Budget] = {}
    #: how the regulariser enters the loop (see :class:`RegHook`) and its step scale for "decay"
    reg_mode: str = "grad"
    decay_scale: float = 1.0
    #: regulariser strength per method (the others run without a regulariser)
    betas: Dict[str, float] = {}

    def __init__(self, budget: str = "quick", device: str = "cpu", options: Optional[Dict[str, Any]] = None):
        if budget not in self.budgets:
            raise ValueError(f"task {self.name!r} has budgets {sorted(self.budgets)}, got {budget!r}")
        self.budget_name, self.budget = budget, self.budgets[budget]
        self.device = torch.device(device)
        self.options = dict(options or {})

    # ------------------------------------------------------------------ to fill in
    def load(self) -> None:
        """Read the data (called once per run)."""
        raise NotImplementedError

    def build(self, seed: int) -> nn.Module:
        """The untrained (or pretrained, not yet fine-tuned) model."""
        raise NotImplementedError

    def train(self, model: nn.Module, length: int, seed: int, hook: Optional[RegHook] = None,
              phase: str = "finetune") -> None:
        """``length`` units of training; ``phase`` is ``"dense"``, ``"regularise"`` (every method,
        with its hook or none) or ``"finetune"`` (after a cut)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> Dict[str, float]:
        raise NotImplementedError

    def example_inputs(self) -> Any:
        """Inputs for tracing and MAC counting."""
        raise NotImplementedError

    def latency_inputs(self) -> Any:
        """A realistic batch (≥ 64 samples where the task has samples) for measured latency."""
        return self.example_inputs()

    def heads(self, model: nn.Module) -> List[nn.Module]:
        raise NotImplementedError

    def group_filter(self, model: nn.Module) -> Optional[Callable[[eg.CoupledGroup], bool]]:
        return None

    def describe(self) -> Dict[str, Any]:
        """What the task fixes (data, model, optimiser), saved beside the results."""
        return {}

    # ------------------------------------------------------------------ shared
    def dense(self, seed: int) -> nn.Module:
        """The dense start for ``seed``: built, trained for ``budget.dense`` and cached on disk."""
        model = self.build(seed).to(self.device)
        if self.budget.dense == 0:
            return model
        tag = "-".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        path = cache_dir() / f"{self.name}-{self.budget_name}-dense{self.budget.dense}-s{seed}{'-' + tag if tag else ''}.pt"
        if path.is_file():
            model.load_state_dict(torch.load(path, map_location=self.device))
            return model
        from benchmarks import distributed
        distributed.fit(self, model, self.budget.dense, seed=1000 + seed, phase="dense")
        distributed.save_on_main(lambda p: torch.save(model.state_dict(), p), path)
        return model
