"""Registered models: tiny ones (one per layer family) for tests, reference ones for benchmarks."""
from .registry import ModelEntry, create, entry, list_models, register_model
from . import bert, gat, informer, resnet_cifar, tiny  # noqa: F401  (registration)

__all__ = ["ModelEntry", "create", "entry", "list_models", "register_model"]
