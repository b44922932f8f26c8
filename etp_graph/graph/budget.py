"""A trace's bounded cost: no model makes it run for ever.

Two limits, both reported as a reason naming the layer, never as a hang:

* **a walk that does not close** (deterministic): the backend enumerates a group by following
  every dependency from its root and re-visiting a layer whenever it arrives with other
  indices. On a graph of chained reshapes and permutes (MaxViT's window and grid partitions)
  the flatten maps multiply the indices on every round and the walk does not close. A walk
  that carries more indices in one step than any dimension of any traced tensor has, or adds
  more entries than :func:`step_limit` allows, is stopped: the group is refused with the
  reason, the trace goes on.
* **time** (``trace(time_limit=...)``, default :data:`TIME_LIMIT` seconds): checked between
  groups, inside the backend's walk and between verification checks. What is left when it runs
  out is refused with the reason; the groups already found and verified are returned.

The walk is Torch-Pruning's own ``DependencyGraph.get_pruning_group``; the count is taken by the
group class it builds (installed once, active only inside :func:`bounded`, as the tolerant index
maps of :mod:`.backend`).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import time
from typing import Optional

from torch_pruning.dependency import graph as tp_graph
from torch_pruning.dependency import index_mapping as tp_index_mapping

__all__ = ["TIME_LIMIT", "Exhausted", "Budget", "bounded", "one_walk", "check_time", "out_of_time", "step_limit"]

#: Default seconds a trace may take (``trace(time_limit=None)``: no limit). The largest model
#: measured here, a 110 M-parameter LLaMA, traces in about 2.5 s on two CPU cores.
TIME_LIMIT = 300.0


_LONGER = "give it longer with time_limit=... (trace, ETPPruner; --time-limit in the CLI; None: no limit)"


class Exhausted(Exception):
    """A limit ran out; the message says which and how to raise it."""


@dataclasses.dataclass
class Budget:
    time_limit: Optional[float]
    steps: int                       #: entries one group's walk may add
    widest: int                      #: the largest size of any dimension of any traced tensor
    start: Optional[float] = None    #: ``time.perf_counter()`` when the trace began (default: now)

    def __post_init__(self):
        if self.start is None:
            self.start = time.perf_counter()

    def out_of_time(self) -> bool:
        return self.time_limit is not None and time.perf_counter() - self.start > self.time_limit

    def check_time(self, what: str) -> None:
        if self.out_of_time():
            raise Exhausted(f"{what} was not done when the trace's time limit of {self.time_limit:g} s ran out; "
                            f"{_LONGER}")

    def time_left_reason(self, what: str) -> str:
        return f"{what} was not examined: the trace's time limit of {self.time_limit:g} s ran out; {_LONGER}"


#: A step may carry this many times the widest dimension (indices repeat across concat inputs).
SLACK = 4


def step_limit(n_nodes: int) -> int:
    """Entries a group's walk may add: generous for any graph whose walk closes (a layer is
    reached once per path with new indices), far below what a non-closing walk reaches."""
    return 2_000 + 50 * n_nodes


_ACTIVE: contextvars.ContextVar[Optional["_Walk"]] = contextvars.ContextVar("etp_graph_budget", default=None)


class _Walk:
    def __init__(self, budget: Budget):
        self.budget, self.added, self.what = budget, 0, "this layer"

    def carry(self, n: int) -> None:
        """A step of the walk carries ``n`` indices: more than any tensor dimension holds means
        the index maps multiply without closing (each flatten multiplies by its stride)."""
        if n > SLACK * self.budget.widest:
            raise Exhausted(f"its channel dependencies did not close: the backend's walk from {self.what!r} "
                            f"reached {n:,} indices of one dimension, more than any tensor of the model has "
                            f"({self.budget.widest:,}): reshape/permute maps that multiply on every round")


@contextlib.contextmanager
def bounded(budget: Budget):
    """Every backend group walk started inside counts its entries against ``budget``."""
    _install()
    token = _ACTIVE.set(_Walk(budget))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def one_walk(what: str):
    """A fresh step count for one group's walk; :class:`Exhausted` names ``what``."""
    walk = _ACTIVE.get()
    if walk is None:
        yield
        return
    walk.added, walk.what = 0, what
    yield


def check_time(what: str) -> None:
    """Raise :class:`Exhausted` if the active trace's time ran out (nothing outside a trace)."""
    walk = _ACTIVE.get()
    if walk is not None:
        walk.budget.check_time(what)


def out_of_time() -> Optional[Budget]:
    """The active budget if its time ran out, else ``None``."""
    walk = _ACTIVE.get()
    return walk.budget if walk is not None and walk.budget.out_of_time() else None


def _install() -> None:
    if getattr(tp_graph.Group, "_etp_graph_counted", False):
        return
    base = tp_graph.Group

    class CountedGroup(base):
        _etp_graph_counted = True

        def add_dep(self, dep, idxs):
            walk = _ACTIVE.get()
            if walk is not None:
                walk.added += 1
                if walk.added > walk.budget.steps:
                    raise Exhausted(
                        f"its channel dependencies did not close: the backend's walk from {walk.what!r} "
                        f"added over {walk.budget.steps} entries (indices that change on every round "
                        "through reshapes/permutes)")
                walk.carry(len(idxs))
                walk.budget.check_time(f"the group rooted at {walk.what!r}")
            super().add_dep(dep, idxs)

    CountedGroup.__name__ = CountedGroup.__qualname__ = base.__name__
    tp_graph.Group = CountedGroup

    flatten = tp_index_mapping._FlattenIndexMapping
    plain = flatten.__call__

    def counted_call(self, idxs):
        walk = _ACTIVE.get()
        if walk is not None and not self.reverse:
            walk.carry(len(idxs) * self._stride)   # before the list is made
        return plain(self, idxs)

    flatten.__call__ = counted_call
