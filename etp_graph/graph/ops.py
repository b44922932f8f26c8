"""Every autograd op name the tracer reasons about, in one place.

Names are those of ``grad_fn.name()`` without the ``Backward`` suffix (``AddmmBackward0`` →
``Addmm``); :func:`op_name` makes them. Each set is one class of op, sorted; an op the channels
of a group pass through that is in none of them is reported in ``ChannelGraph.unknown_ops``
(and the group is verified by masking). fvcore's op names (``aten::…``), which the MAC counter
uses, are in :mod:`etp_graph.counting`.
"""
from __future__ import annotations

import re
from typing import Optional, Tuple

import torch

__all__ = ["HARMLESS_OPS", "PAD", "ATTENTION", "MAPPED_OPS", "PRODUCT_OPS", "REDUCTIONS", "DIM_MOVES", "COPIES", "op_name",
           "saved_dim", "reduced_dims"]


def _names(text: str) -> frozenset:
    return frozenset(text.split())


#: Element-wise maths, activations, spatial pooling/resampling, reductions over other dims,
#: dimension moves: ops that keep every channel at its position.
HARMLESS_OPS = _names("""
Abs AdaptiveAvgPool1D AdaptiveAvgPool2D AdaptiveAvgPool3D AdaptiveMaxPool1D AdaptiveMaxPool2D
AdaptiveMaxPool3D Add Addcdiv Addcmul Alias AvgPool1D AvgPool2D AvgPool3D Celu Clamp ClampMax
ClampMin Clone Cos Div Dropout Elu Exp Gelu Hardsigmoid Hardswish Hardtanh Index LeakyRelu Log
MaskedFill MaxPool1DWithIndices MaxPool2DWithIndices MaxPool3DWithIndices Mean Mish Mul
NativeDropout Neg Permute Pow Relu Relu6 Rsqrt Select Selu Sigmoid Silu Sin Softplus Sqrt
Squeeze Sub Sum T Tanh Threshold ToCopy Transpose Unsqueeze UpsampleBicubic2D
UpsampleBilinear2D UpsampleLinear1D UpsampleNearest1D UpsampleNearest2D UpsampleNearest3D Where
""")

#: The op label of head groups built inside an attention (by its handler or from the trace).
ATTENTION = "attention"

#: A constant pad; on the channel dimension (the option-A ResNet shortcut) it gets an offset map.
PAD = "ConstantPadNd"

#: Ops whose channel maps the tracer sets itself (index_maps.py) or that stand for a hidden
#: layer (``_Opaque``, backend.py); the groups through them are exact by construction.
MAPPED_OPS = _names("Concat Expand Reshape Slice Split Unbind _Opaque") | {PAD, ATTENTION}

#: Batched matrix products between activations (q·kᵀ, attn·v): channels are contracted, not kept;
#: a group reaching one outside a known attention is refused.
PRODUCT_OPS = _names("""
Baddbmm Bmm MatMul ScaledDotProductAttention ScaledDotProductEfficientAttention
ScaledDotProductFlashAttentionForCpu
""")

#: Ops that combine the positions of the dimensions they reduce into statistics that a zero does
#: not leave alone (a mean divides by the count, a max or softmax sees the zero): the statistics
#: of a normalisation written by hand (RMSNorm's ``x.pow(2).mean(-1)``, ``rsqrt``), or the
#: functional norms. Over the channel dimension they make masking differ from removal, so the
#: group is checked by shape, as through an ``nn.LayerNorm``; over other dimensions they are
#: harmless (a global average pool). ``Sum`` and vector norms are not here: a zero adds nothing.
REDUCTIONS = _names("""
Amax Amin Logsumexp LogSoftmax Max Mean Median Min NativeGroupNorm NativeLayerNorm Prod Softmax
Std StdMean Var VarMean
""")

#: Ops that move dimensions: the channel dimension is unknown past them.
DIM_MOVES = _names("Permute T Transpose")

#: Ops that copy a tensor unchanged (transparent when following a view back to its source).
COPIES = _names("Alias Clone ToCopy")


def op_name(grad_fn) -> str:
    """``grad_fn``'s op name without namespace and ``Backward`` suffix."""
    name = grad_fn.name() if hasattr(grad_fn, "name") else type(grad_fn).__name__
    name = name.split("::")[-1]
    return re.sub(r"Backward\d*$", "", name)


def saved_dim(value: int, rank: int) -> int:
    """A dim saved by autograd, made non-negative (negative dims come back as unsigned 64-bit)."""
    value = int(value)
    if value >= 2 ** 63:
        value -= 2 ** 64
    return value % rank


def reduced_dims(grad_fn) -> Optional[Tuple[Tuple[int, ...], int]]:
    """``(dims, rank)`` that a :data:`REDUCTIONS` op combines, dims non-negative; ``None`` where
    autograd saved neither (the caller treats that as "any dimension")."""
    self_ = getattr(grad_fn, "_saved_self", getattr(grad_fn, "_saved_result", None))
    sizes = getattr(grad_fn, "_saved_self_sym_sizes", None)
    rank = self_.dim() if isinstance(self_, torch.Tensor) else (len(sizes) if sizes else None)
    name = op_name(grad_fn)
    if name == "NativeLayerNorm":
        inp = getattr(grad_fn, "_saved_input", None)
        n = len(getattr(grad_fn, "_saved_normalized_shape", ()))
        return (tuple(range(inp.dim() - n, inp.dim())), inp.dim()) if inp is not None and n else None
    if name == "NativeGroupNorm":
        inp = getattr(grad_fn, "_saved_input", None)
        return ((1,), inp.dim()) if inp is not None else None
    if rank is None:
        return None
    dims = getattr(grad_fn, "_saved_dim", None)
    if dims is None:                       # a reduction of everything (``x.mean()``)
        return tuple(range(rank)), rank
    dims = dims if isinstance(dims, tuple) else (dims,)
    return tuple(saved_dim(d, rank) for d in dims) or tuple(range(rank)), rank
