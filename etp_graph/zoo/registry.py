"""Registry of zoo models: ``@register_model`` refuses duplicates and ``create`` names what is missing."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional

from torch import nn


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """A registered model: how to build it, what to feed it, and which layers are its heads."""

    name: str
    build: Callable[..., nn.Module]
    example_inputs: Callable[[], Any]
    heads: Callable[[nn.Module], List[nn.Module]]
    tags: tuple = ()


_MODELS: Dict[str, ModelEntry] = {}


def register_model(name: str, example_inputs: Callable[[], Any],
                   heads: Optional[Callable[[nn.Module], List[nn.Module]]] = None, tags: tuple = ()):
    """Decorator registering a model factory under ``name``."""
    def deco(build: Callable[..., nn.Module]):
        if name in _MODELS:
            raise ValueError(f"zoo model {name!r} is already registered; pick another name")
        _MODELS[name] = ModelEntry(name, build, example_inputs, heads or (lambda m: []), tuple(tags))
        return build
    return deco


def list_models(tag: Optional[str] = None) -> List[str]:
    """Registered names, sorted; with ``tag`` only those carrying it (e.g. ``"tiny"``)."""
    return sorted(n for n, e in _MODELS.items() if tag is None or tag in e.tags)


def entry(name: str) -> ModelEntry:
    if name not in _MODELS:
        raise KeyError(f"no zoo model {name!r}; registered: {', '.join(list_models())}")
    return _MODELS[name]


def create(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name`` (keyword arguments go to its factory)."""
    return entry(name).build(**kwargs)
