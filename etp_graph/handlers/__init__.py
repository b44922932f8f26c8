"""Per-layer-family handlers. Importing this package registers the built-in ones."""
from .base import (LayerHandler, TensorSlice, get_handler, register_handler,  # noqa: F401
                   registered_handlers, unregister_handler)
from . import activation, attention, conv, conv1d, embedding, gat, linear, norm, projections, rnn  # noqa: F401  (registration)

__all__ = ["LayerHandler", "TensorSlice", "get_handler", "register_handler", "registered_handlers", "unregister_handler"]
