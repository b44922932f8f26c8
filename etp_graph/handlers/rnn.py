"""Recurrent layers: ``nn.LSTM`` and ``nn.GRU`` (any depth, uni- or bidirectional).

A unit is one hidden unit ``h``. All stacked layers share ``hidden_size``, so unit ``h`` is removed
from every layer and both directions at once: its gate rows of ``weight_ih_l*``, ``weight_hh_l*``
and the biases, its column of every ``weight_hh_l*``, and its input columns of the next layer.
The module's output channel ``c`` (``c < D·H``) belongs to direction ``c // H``, unit ``c % H``.

Masking is exact: with a unit's gate rows zero its cell and hidden state stay 0 from the zero
initial state (LSTM: ``c = ½c + ½·tanh(0)``; GRU: ``h = ½h + ½·tanh(0)``).
"""
from __future__ import annotations

from typing import Callable, List, Tuple

import torch
from torch import nn

from .base import LayerHandler, TensorSlice, register_handler


def _gate_rows(direction: int, hidden: int, gates: int) -> Callable:
    def index(channels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        pos = torch.nonzero(channels // hidden == direction).flatten()
        h = channels[pos] % hidden
        return pos.repeat(gates), torch.cat([h + k * hidden for k in range(gates)])
    return index


def _hidden_cols(direction: int, hidden: int) -> Callable:
    def index(channels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        pos = torch.nonzero(channels // hidden == direction).flatten()
        return pos, channels[pos] % hidden
    return index


@register_handler
class RNNHandler(LayerHandler):
    module_types = (nn.LSTM, nn.GRU)
    can_root = True
    channel_last = True
    backend_lacks = True  # the backend's LSTM support is wrong and it has none for GRU

    @staticmethod
    def _gates(m) -> int:
        return 4 if isinstance(m, nn.LSTM) else 3

    @staticmethod
    def _suffixes(m) -> List[str]:
        return ["", "_reverse"] if m.bidirectional else [""]

    def unsupported(self, m, role, units: str = "heads"):
        if getattr(m, "proj_size", 0) > 0:
            return f"{type(m).__name__} with proj_size={m.proj_size}: projected LSTMs are not supported"
        return None

    def slices(self, m, role, units: str = "heads") -> List[TensorSlice]:
        sfx = self._suffixes(m)
        if role == "in":
            return [TensorSlice(f"weight_ih_l0{s}", 1) for s in sfx]
        H, G = m.hidden_size, self._gates(m)
        out: List[TensorSlice] = []
        for layer in range(m.num_layers):
            for d, s in enumerate(sfx):
                rows = _gate_rows(d, H, G)
                out += [TensorSlice(f"weight_ih_l{layer}{s}", 0, rows),
                        TensorSlice(f"weight_hh_l{layer}{s}", 0, rows),
                        TensorSlice(f"weight_hh_l{layer}{s}", 1, _hidden_cols(d, H))]
                if m.bias:
                    out += [TensorSlice(f"bias_ih_l{layer}{s}", 0, rows),
                            TensorSlice(f"bias_hh_l{layer}{s}", 0, rows)]
                if layer + 1 < m.num_layers:  # next layer reads [fwd H | bwd H] as its input
                    out += [TensorSlice(f"weight_ih_l{layer + 1}{s}", 1)]
        return out

    def period(self, m, role, units: str = "heads"):
        return m.hidden_size if (role == "out" and m.bidirectional) else None

    def refresh(self, m, removed):
        m.hidden_size = m.weight_hh_l0.shape[1]
        m.input_size = m.weight_ih_l0.shape[1]
        self.restored(m)

    def restored(self, m):
        if hasattr(m, "_init_flat_weights"):   # the cuDNN flat weight list points at the tensors
            m._init_flat_weights()

    def num_channels(self, m, role):
        return m.hidden_size * (2 if m.bidirectional else 1) if role == "out" else m.input_size
