"""Per-layer-family knowledge: which tensor slices belong to a unit, and how to keep a module valid.

A *handler* holds everything the engine knows about one family of modules; the graph, the
regulariser and the pruner only ever see the :class:`TensorSlice` tables it returns, so zeroing,
measuring and removing a unit are driven by one table and can never disagree. Its hooks:

* tracing — ``matches`` (structure-registered handlers), ``traced_as_leaf`` and ``observe``
  (layers hidden from the backend), ``num_channels`` (sizes for the backend's leaf adapter);
* grouping — ``slices(module, role)`` (for ``role="out"``, the output channels, or ``"in"``:
  which parameters and buffers, along which dimension, which indices each channel owns),
  ``period`` and ``block`` (channels that must go together: a grouped convolution's positions,
  a head's dimensions), ``unsupported`` (a reason it cannot be cut in a role),
  ``internal_groups`` (units wholly inside the module: attention heads); each takes
  ``units``, the trace's unit kind of head-structured groups (:data:`UNIT_KINDS`);
* pruning — ``refresh(module, removed)`` (rewrite ``out_features``, ``groups``, ``hidden_size``
  … after the tensors were cut) and ``restored(module)`` (redo derived state after an atomic
  restore, see :mod:`etp_graph.graph.atomic`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar, Dict, List, Optional, Tuple, Type

import torch
from torch import nn

__all__ = [
    "TensorSlice",
    "LayerHandler",
    "register_handler",
    "get_handler",
    "registered_handlers",
    "unregister_handler",
    "UNIT_KINDS",
    "InternalGroup",
]


def _identity(channels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(len(channels)), channels


#: The unit kinds of head-structured groups (attention, GAT), passed to the grouping hooks as
#: ``units``: ``"heads"`` (a whole head) or ``"head_dims"`` (one dimension in every head).
UNIT_KINDS = ("heads", "head_dims")


@dataclasses.dataclass(frozen=True)
class TensorSlice:
    """Tensor ``attr`` of a module, cut along ``dim``.

    ``index(channels)`` maps channel numbers (a LongTensor) to pairs ``(pos, idx)``: entry
    ``pos[k]`` of ``channels`` owns index ``idx[k]`` of the tensor along ``dim``. One channel may
    own several indices (an LSTM hidden unit owns four gate rows) and several channels may share
    one (every group of a grouped convolution reads the same weight column).
    """

    attr: str
    dim: int
    index: Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]] = _identity


@dataclasses.dataclass(frozen=True)
class InternalGroup:
    """Units wholly inside one module (attention heads): ``size`` units, numbered ``0..size-1`` in
    every slice; ``label`` is the role passed to ``refresh`` (``{"heads": k}``) after a cut.
    ``reason`` set: the group exists but cannot be pruned (it is reported in ``graph.skipped``)."""

    label: str
    size: int
    slices: Tuple[TensorSlice, ...]
    reason: Optional[str] = None


class LayerHandler:
    """Base class of the per-family handlers; subclasses set ``module_types``."""

    module_types: ClassVar[Tuple[Type[nn.Module], ...]] = ()
    #: False where a normalisation over the pruned dimension makes masking differ from removal.
    exact_when_masked: ClassVar[bool] = True
    #: May a group be rooted at this module's output channels?
    can_root: ClassVar[bool] = False
    #: The tracer backend has no (correct) support for this family: it gets a leaf adapter.
    backend_lacks: ClassVar[bool] = False
    #: Channels on the last dimension of a 3-D output (tokens ``(B, L, C)``), not on dim 1.
    channel_last: ClassVar[bool] = False
    #: Input channel ``c`` *is* output channel ``c`` (a hidden residual, a norm): one role, "out".
    couples_in_out: ClassVar[bool] = False

    def matches(self, module: nn.Module) -> bool:
        """For handlers registered by structure (``module_types = ()``): is this module one of ours?"""
        return False

    def observe(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        """Called once per traced call of a leaf module (e.g. to note a cross-attention call)."""

    def own_call(self, module: nn.Module, func: Callable, given: Dict[str, object]) -> bool:
        """Is ``func`` called with ``given`` (its arguments by name: ``input``, ``weight``, …) on the
        module's weight exactly ``module(input)``? A trace then runs such a call, made outside the
        module's forward, as the module's own (``etp_graph.graph.inputs.LayerCalls``)."""
        return False

    def traced_as_leaf(self, module: nn.Module) -> bool:
        """Hide the module's internal ops from the tracer: its outputs depend on its inputs only."""
        return self.backend_lacks

    def slices(self, module: nn.Module, role: str, units: str = "heads") -> List[TensorSlice]:
        raise NotImplementedError

    def period(self, module: nn.Module, role: str, units: str = "heads") -> Optional[int]:
        return None

    def block(self, module: nn.Module, role: str, units: str = "heads") -> Optional[int]:
        """Channels ``c`` with equal ``c // block`` go together (a head of ``block`` channels)."""
        return None

    def refresh(self, module: nn.Module, removed: Dict[str, int]) -> None:
        """Update the module's size attributes after its tensors were cut.

        ``removed`` maps a role (``"out"``/``"in"``) to how many channels it lost.
        """

    def restored(self, module: nn.Module) -> None:
        """Called after the module's tensors and attributes were put back by an atomic restore:
        rebuild what is derived from them (an RNN's flat weight list)."""

    def unsupported(self, module: nn.Module, role: str, units: str = "heads") -> Optional[str]:
        """A reason why this module cannot be cut in this role, or ``None``."""
        return None

    def internal_groups(self, module: nn.Module, units: str = "heads") -> List[InternalGroup]:
        """Units wholly inside the module (attention heads); slice ``attr`` may be dotted
        (``"out_proj.weight"``) to reach a submodule's tensor."""
        return []

    def num_channels(self, module: nn.Module, role: str) -> Optional[int]:
        return None


_REGISTRY: Dict[Type[nn.Module], LayerHandler] = {}
_PATTERNS: List[LayerHandler] = []


def register_handler(cls: Type[LayerHandler]) -> Type[LayerHandler]:
    """Class decorator: register a handler for its ``module_types``; duplicates are refused.

    A handler with ``module_types = ()`` that overrides ``matches(module)`` is registered by
    structure (a model family from a library we do not import, e.g. Hugging Face BERT): it is
    asked only for modules no type-registered handler claims."""
    instance = cls()
    if not cls.module_types:
        if type(instance).matches is LayerHandler.matches:
            raise TypeError(f"{cls.__name__} declares no module_types; set module_types = (nn.X, ...) "
                            "or override matches(module)")
        _PATTERNS.append(instance)
        return cls
    for t in cls.module_types:
        if t in _REGISTRY:
            raise ValueError(
                f"a handler for {t.__name__} is already registered "
                f"({type(_REGISTRY[t]).__name__}); call unregister_handler({type(_REGISTRY[t]).__name__}) first "
                f"or subclass the module type"
            )
        _REGISTRY[t] = instance
    return cls


def unregister_handler(cls: Type[LayerHandler]) -> None:
    """Remove every registration of handler class ``cls`` (to replace a built-in one)."""
    for t in [t for t, h in _REGISTRY.items() if type(h) is cls]:
        del _REGISTRY[t]
    _PATTERNS[:] = [h for h in _PATTERNS if type(h) is not cls]


def get_handler(module: nn.Module) -> Optional[LayerHandler]:
    """The handler for ``module``'s most specific registered type, or ``None``."""
    for t in type(module).__mro__:
        h = _REGISTRY.get(t)
        if h is not None:
            return h
    claims = [h for h in _PATTERNS if h.matches(module)]
    if len(claims) > 1:
        names = " and ".join(type(h).__name__ for h in claims)
        raise ValueError(f"{type(module).__name__} matches two structure-registered handlers, {names}; "
                         f"register a handler for {type(module).__name__} itself (register_handler with "
                         "module_types) or unregister_handler one of them")
    return claims[0] if claims else None


def registered_handlers() -> Dict[Type[nn.Module], LayerHandler]:
    return dict(_REGISTRY)


def modulo(period: int) -> Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]:
    """Channel ``c`` owns index ``c % period`` (shared across groups)."""

    def index(channels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return torch.arange(len(channels)), channels % period

    return index
