"""MACs, parameters and latency.

Convention, written once: **one fused multiply-add counts as one MAC** (fvcore's convention:
a ``Linear(i, o)`` on ``n`` rows costs ``n·i·o``). fvcore traces the model with TorchScript and
counts with per-op handles; ops it has no handle for are added here, declared free, or reported
by :func:`unsupported_ops`, and :func:`count_macs` warns about them instead of counting zero.
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time
import warnings
from typing import Any, Callable, Dict, List, Sequence

import torch
from fvcore.nn import FlopCountAnalysis
from torch import nn

from .graph.inputs import as_call, eval_mode, flat_tensors, forward

__all__ = ["count_macs", "count_params", "unsupported_ops", "measure_latency", "compare_latency", "MAC_HANDLES", "FREE_OPS"]


def _sizes(v) -> List[int]:
    return list(v.type().sizes())


def _rnn_macs(gates: int) -> Callable:
    """``aten::lstm``/``aten::gru``: per layer, direction and step, ``gates·H·(I + H)`` MACs."""

    def handle(inputs, outputs) -> int:
        x = _sizes(inputs[0])
        params = [_sizes(p) for p in inputs[2].node().inputs()]
        batch_first = bool(inputs[-1].toIValue())
        steps, batch = (x[1], x[0]) if batch_first else (x[0], x[1])
        total = 0
        for shape in params:
            if len(shape) == 2:  # weight_ih [G·H, I] or weight_hh [G·H, H]
                total += shape[0] * shape[1]
        return steps * batch * total

    return handle


def _sdpa_macs(inputs, outputs) -> int:
    """``softmax(q·kᵀ)·v``: ``L·S·E`` for the scores and ``L·S·Ev`` for the weighted sum."""
    q, k, v = (_sizes(i) for i in inputs[:3])
    lead = math.prod(q[:-2])
    return lead * q[-2] * k[-2] * (q[-1] + v[-1])


def _baddbmm_macs(inputs, outputs) -> int:
    """``beta·M + alpha·(A @ B)`` for batched ``A (b, n, m)``, ``B (b, m, p)``: ``b·n·m·p``
    (the scaled, masked scores of ``nn.MultiheadAttention``)."""
    a, b = _sizes(inputs[1]), _sizes(inputs[2])
    return a[0] * a[1] * a[2] * b[2]


#: Handles for ops fvcore lacks: op name -> f(inputs, outputs) -> MACs.
MAC_HANDLES: Dict[str, Callable] = {
    "aten::lstm": _rnn_macs(4),
    "aten::gru": _rnn_macs(3),
    "aten::scaled_dot_product_attention": _sdpa_macs,
    "aten::baddbmm": _baddbmm_macs,
}

#: Ops that cost no multiply-adds and that fvcore neither counts nor ignores by itself (it
#: ignores data movement such as view/cat/relu already, see ``fvcore.nn.jit_analysis._IGNORED_OPS``,
#: and counts the norms, pooling and upsampling): element-wise maths, activations, pads,
#: reductions, index and scatter ops. A test keeps this list disjoint from fvcore's own.
FREE_OPS = tuple("""
aten::_pad_circular aten::abs aten::adaptive_avg_pool1d aten::add aten::add_ aten::amax
aten::amin aten::avg_pool2d aten::circular_pad1d aten::circular_pad2d aten::clone aten::cos
aten::cumsum aten::diff aten::div aten::elu aten::embedding aten::exp aten::expand_as aten::fill_
aten::gelu aten::gelu_ aten::glu aten::hardswish aten::hardtanh aten::im2col aten::index_add_
aten::index_select aten::le aten::leaky_relu aten::log aten::log_softmax aten::logsumexp aten::lt
aten::masked_fill_ aten::max_pool1d aten::max_pool2d aten::max_pool2d_with_indices
aten::max_pool3d aten::mean aten::min aten::mul aten::mul_ aten::ne aten::neg aten::new_ones
aten::numpy_T aten::ones_like aten::pad aten::pow aten::pow_ aten::prelu aten::randint
aten::reflection_pad1d aten::reflection_pad2d aten::repeat aten::replication_pad1d
aten::replication_pad2d aten::rsqrt aten::rsub aten::scatter aten::scatter_add
aten::scatter_add_ aten::scatter_reduce aten::scatter_reduce_ aten::sigmoid aten::silu
aten::sin aten::softmax aten::softplus aten::sqrt aten::std aten::std_mean aten::sub aten::sub_ aten::sum
aten::tanh aten::topk aten::tril aten::triu aten::unflatten aten::var aten::var_mean
aten::where aten::zero_
""".split())


class _Call(nn.Module):
    """Calls ``model(*args[:n], **dict(zip(keys, args[n:])))`` and returns its output tensors as a
    tuple: fvcore traces positional inputs only, and the JIT tracer returns tensors only (a
    Hugging Face output holds a ``DynamicCache``)."""

    def __init__(self, model: nn.Module, n: int, keys):
        super().__init__()
        self.model, self.n, self.keys = model, n, list(keys)

    def forward(self, *args):
        return tuple(flat_tensors(self.model(*args[:self.n], **dict(zip(self.keys, args[self.n:])))))


def _analysis(model: nn.Module, example_inputs: Any) -> FlopCountAnalysis:
    inputs, kwargs = as_call(example_inputs)
    model, inputs = _Call(model, len(inputs), kwargs.keys()), tuple(inputs) + tuple(kwargs.values())
    fca = FlopCountAnalysis(model, inputs)
    fca.set_op_handle(**MAC_HANDLES)
    fca.set_op_handle(**{op: None for op in FREE_OPS})
    fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    return fca


def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """Multiply-adds of one forward on ``example_inputs`` (1 fused multiply-add = 1 MAC).

    Example::

        >>> count_macs(nn.Linear(8, 4), torch.randn(2, 8))   # 2 rows · 8 · 4
        64
    """
    with eval_mode(model):
        fca = _analysis(model, example_inputs)
        total = int(fca.total())
        missing = dict(fca.unsupported_ops())
    if missing:
        warnings.warn(f"count_macs: no MAC handle for {sorted(missing)}; their cost is not included. "
                      "Add one to etp_graph.counting.MAC_HANDLES or declare it in FREE_OPS.",
                      stacklevel=2)
    return total


def unsupported_ops(model: nn.Module, example_inputs: Any) -> Dict[str, int]:
    """Ops (and how often they run) that :func:`count_macs` cannot count."""
    with eval_mode(model):
        fca = _analysis(model, example_inputs)
        fca.total()
        return dict(fca.unsupported_ops())


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def measure_latency(model: nn.Module, example_inputs: Any, warmup: int = 3, repeat: int = 10) -> Dict[str, float]:
    """Wall-clock latency of one forward under ``torch.inference_mode()``.

    Returns ``median_ms``, ``iqr_ms`` (interquartile spread), ``min_ms``, ``repeat`` and ``threads``.
    To compare models (before and after a cut), use :func:`compare_latency`: a latency measured
    alone minutes before another is not comparable with it on a busy machine.
    """
    return compare_latency([model], example_inputs, warmup=warmup, repeat=repeat)[0]


def compare_latency(models: Sequence[nn.Module], example_inputs: Any, warmup: int = 3,
                    repeat: int = 10) -> List[Dict[str, float]]:
    """The latencies of several models on the same inputs, measured side by side: each of the
    ``repeat`` rounds times one forward of every model in turn (under ``torch.inference_mode()``),
    so whatever else loads the machine during a round loads every model alike.

    Returns one :func:`measure_latency` dict per model, in order, each with ``ratio_to_first``:
    the median over rounds of the first model's time over this one's (a speed-up, 1.0 for the
    first), which cancels a slow round where a ratio of the medians would not.

    Example::

        >>> before, after = eg.compare_latency([model, pruned], x, repeat=20)
        >>> after["ratio_to_first"]     # the measured speed-up of the cut
    """
    models = list(models)
    if not models:
        raise ValueError("compare_latency needs at least one model")
    if repeat < 1 or warmup < 0:
        raise ValueError(f"repeat must be >= 1 and warmup >= 0, got repeat={repeat}, warmup={warmup}")
    times: List[List[float]] = [[] for _ in models]
    with contextlib.ExitStack() as stack:
        for m in models:
            stack.enter_context(eval_mode(m))
        stack.enter_context(torch.inference_mode())
        for _ in range(warmup):
            for m in models:
                forward(m, example_inputs)
        for _ in range(repeat):
            for m, ts in zip(models, times):
                t0 = time.perf_counter()
                forward(m, example_inputs)
                ts.append((time.perf_counter() - t0) * 1e3)
    out = []
    for ts in times:
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        out.append({"median_ms": statistics.median(ts), "iqr_ms": q[2] - q[0], "min_ms": min(ts),
                    "ratio_to_first": statistics.median(a / max(b, 1e-9) for a, b in zip(times[0], ts)),
                    "repeat": repeat, "threads": torch.get_num_threads()})
    return out
