"""Multi-head attention: heads (or head dimensions) as units, and the embedding width around them.

Every attention family here has the same anatomy: q/k/v projections whose rows are laid out
head after head (``row = offset + h·d + j`` for head ``h``, dimension ``j``), and an output
projection whose columns follow the same layout. Two kinds of unit live inside the module:

* ``"heads"`` (default): unit ``h`` owns the ``d`` q, k and v rows of head ``h``, their biases and
  the ``d`` output-projection columns of that head;
* ``"head_dims"``: unit ``j`` owns dimension ``j`` of q, k and v in *every* head (heads must keep
  one width) and the matching output columns.

Pick one per trace with ``trace(..., attention_units="head_dims")``. After a cut the module's
``num_heads``/``head_dim`` bookkeeping is rewritten, and the softmax scale stays the original
``1/√d_head``, so the pruned output equals the masked one exactly. The embedding width (the
projections' input columns, the output projection's rows) is the module's ``"in"``/``"out"`` role,
coupled to the rest of the model by the tracer.

Families: ``nn.MultiheadAttention`` (and so ``nn.TransformerEncoderLayer``/``DecoderLayer``),
hand-written ViT attention with a fused ``qkv`` Linear (``qkv``, ``proj``, ``num_heads``, where
its forward is the standard one),
Hugging Face BERT-style ``…Attention`` blocks (``self.query/key/value``, ``output.dense``,
``output.LayerNorm``), and Informer / Time-Series-Library ``AttentionLayer``
(``query/key/value/out_projection``, ``n_heads``); the last two, whose forward reads the sizes
they are given, are in :mod:`.projections`, the shared base in :mod:`.heads`.

``nn.MultiheadAttention`` and the fused ViT attention derive ``head_dim`` from their input width,
so once pruned their forward is replaced (:class:`PrunedMultiheadAttention`, a subclass with the
same parameters; the ViT module gets a standard attention forward of the same class family).
Verification at trace time compares the original forward (masked) with the replaced one
(pruned), so an attention whose forward does something else is refused, never changed silently.
"""
from __future__ import annotations

import copy
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from .base import TensorSlice, register_handler
from .heads import HeadedAttention, Layout, fit_linears

__all__ = ["PrunedMultiheadAttention", "apply_surgery"]



# ------------------------------------------------------------------- nn.MultiheadAttention
class PrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose widths no longer follow ``embed_dim // num_heads``.

    Same parameters and call signature; the forward reads the head count and width from
    ``num_heads``/``head_dim`` and keeps the scale ``etp_scale`` of the unpruned module.
    """

    @property
    def _qkv_same_embed_dim(self) -> bool:
        # False: the fused fast paths of nn.TransformerEncoder(Layer) derive head_dim from
        # embed_dim. A property, so restoring the original class restores the original flag.
        return False

    @_qkv_same_embed_dim.setter
    def _qkv_same_embed_dim(self, value: bool) -> None:
        self.__dict__["_qkv_same_embed_dim"] = value

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if self.batch_first and not unbatched:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        L, B, _ = query.shape
        S = key.shape[0]
        H, d = self.num_heads, self.head_dim
        if self.in_proj_weight is not None:
            wq, wk, wv = self.in_proj_weight.split(H * d)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        bq = bk = bv = None
        if self.in_proj_bias is not None:
            bq, bk, bv = self.in_proj_bias.split(H * d)
        q = F.linear(query, wq, bq).view(L, B, H, d).permute(1, 2, 0, 3)
        k = F.linear(key, wk, bk).view(S, B, H, d).permute(1, 2, 0, 3)
        v = F.linear(value, wv, bv).view(S, B, H, d).permute(1, 2, 0, 3)
        mask = None
        if attn_mask is not None:
            if attn_mask.dim() == 3:
                if attn_mask.shape[0] != B * H:
                    raise ValueError(f"a per-head attn_mask of shape {tuple(attn_mask.shape)} does not fit "
                                     f"{H} heads (this attention was pruned; pass a 2-D mask)")
                attn_mask = attn_mask.view(B, H, L, S)
            mask = _additive(attn_mask, q.dtype)
        elif is_causal:
            mask = _additive(torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1), q.dtype)
        if key_padding_mask is not None:
            kpm = _additive(key_padding_mask, q.dtype).view(B, 1, 1, S)
            mask = kpm if mask is None else mask + kpm
        p = self.dropout if self.training else 0.0
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) * self.etp_scale
            if mask is not None:
                scores = scores + mask
            w = scores.softmax(-1)
            out = F.dropout(w, p, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=self.etp_scale)
            w = None
        out = out.permute(2, 0, 1, 3).reshape(L, B, H * d)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if self.batch_first and not unbatched:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1)
        if w is not None:
            w = w.mean(1) if average_attn_weights else w
            if unbatched:
                w = w.squeeze(0)
        return out, w


def _additive(mask: torch.Tensor, dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


@register_handler
class MultiheadAttentionHandler(HeadedAttention):
    module_types = (nn.MultiheadAttention,)

    def layout(self, m):
        H, d = m.num_heads, m.head_dim
        if m.in_proj_weight is not None:
            qkv = (("in_proj_weight", "in_proj_bias", 0), ("in_proj_weight", "in_proj_bias", H * d),
                   ("in_proj_weight", "in_proj_bias", 2 * H * d))
        else:
            qkv = (("q_proj_weight", "in_proj_bias", 0), ("k_proj_weight", "in_proj_bias", H * d),
                   ("v_proj_weight", "in_proj_bias", 2 * H * d))
        return Layout(H, d, qkv, "out_proj.weight")

    def heads_refused(self, m):
        if m.bias_k is not None or m.add_zero_attn:
            return "nn.MultiheadAttention with add_bias_kv/add_zero_attn is not supported"
        return None

    def unsupported(self, m, role, units: str = "heads"):
        if role == "in" and m.in_proj_weight is None:
            return ("nn.MultiheadAttention with kdim/vdim different from embed_dim reads two streams; "
                    "its embedding width is not pruned through it (its heads still are)")
        return super().unsupported(m, role, units)

    def slices(self, m, role, units: str = "heads"):
        if role == "in":
            return [TensorSlice("in_proj_weight", 1)]
        out = [TensorSlice("out_proj.weight", 0)]
        return out + ([TensorSlice("out_proj.bias", 0)] if m.out_proj.bias is not None else [])

    def set_sizes(self, m, heads, head_dim):
        apply_surgery(m)
        m.num_heads, m.head_dim = heads, head_dim
        m.embed_dim = m.out_proj.weight.shape[0]
        if m.in_proj_weight is not None:
            m.kdim = m.vdim = m.in_proj_weight.shape[1]
        fit_linears(m, ["out_proj"])

    def num_channels(self, m, role):
        return m.out_proj.weight.shape[0] if role == "out" else (
            m.in_proj_weight.shape[1] if m.in_proj_weight is not None else m.q_proj_weight.shape[1])



# ---------------------------------------------------------- fused-qkv (ViT / timm style)
def _fused_qkv_forward(self, x):
    """Standard fused-qkv attention with the pruned widths and the unpruned scale."""
    B, N, _ = x.shape
    H, d = self.num_heads, self.etp_head_dim
    q, k, v = self.qkv(x).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
    attn = ((q @ k.transpose(-2, -1)) * self.etp_scale).softmax(dim=-1)
    if isinstance(getattr(self, "attn_drop", None), nn.Module):
        attn = self.attn_drop(attn)
    out = self.proj((attn @ v).transpose(1, 2).reshape(B, N, H * d))
    if isinstance(getattr(self, "proj_drop", None), nn.Module):
        out = self.proj_drop(out)
    return out


_FUSED_CLASSES: Dict[type, type] = {}
#: per class and plain attributes (:func:`_config_key`): does :func:`_fused_qkv_forward` compute
#: what the module's own forward does?
_COMPUTES_THE_SAME: Dict[tuple, bool] = {}


def _config_key(m: nn.Module) -> tuple:
    plain = (int, float, bool, str, type(None))
    return (type(m),) + tuple(sorted((k, v) for k, v in vars(m).items()
                                     if isinstance(v, plain) and k != "training"))


@torch.no_grad()
def _same_as_fused(m: nn.Module, head_dim: int) -> bool:
    """Does the standard fused-qkv forward give the module's own output on a random ``(1, 5, C)``
    input? Run on a float64 copy without hooks and torch-function modes (a trace may be running
    around it), in eval mode; the user's random state is not touched."""
    try:
        # copied without the hooks (a trace's hold its graph): each hook dict copies as an empty one
        memo = {id(d): type(d)() for sub in m.modules() for d in (
            sub._forward_hooks, sub._forward_pre_hooks, sub._forward_hooks_with_kwargs,
            sub._forward_pre_hooks_with_kwargs, sub._forward_hooks_always_called, sub._backward_hooks,
            sub._backward_pre_hooks)}
        c = copy.deepcopy(m, memo).double().eval()
        c.etp_head_dim, c.etp_scale = head_dim, float(getattr(m, "scale", head_dim ** -0.5))
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, 5, m.qkv.in_features, generator=gen, dtype=torch.float64)
        with torch._C.DisableTorchFunction():
            own = type(m).forward(c, x)
            ours = _fused_qkv_forward(c, x)
        return isinstance(own, torch.Tensor) and own.shape == ours.shape and bool(
            torch.allclose(own, ours, rtol=1e-9, atol=1e-12))
    except Exception:   # a forward that does not take (B, N, C) alone is not this family
        return False


@register_handler
class FusedQKVAttentionHandler(HeadedAttention):
    """A hand-written ViT attention: ``qkv = Linear(C, 3C)`` reshaped to ``(B, N, 3, H, C/H)``,
    softmax(q·kᵀ·scale)·v, ``proj = Linear(C, C)``; found by structure (``qkv``, ``proj``,
    ``num_heads``), and claimed only where the standard forward that a cut gives it computes the
    module's own output (a float64 copy on a random input, once per class and configuration):
    a module with those names and another forward (torchvision's Swin window attention) is left
    to the trace, which finds its heads and joins them with the width its forward ties them to."""

    module_types = ()

    def matches(self, m):
        qkv, proj, H = getattr(m, "qkv", None), getattr(m, "proj", None), getattr(m, "num_heads", None)
        if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and isinstance(H, int)
                and H > 0 and qkv.out_features == 3 * proj.in_features and proj.in_features % H == 0):
            return False
        if getattr(m, "etp_surgery", None) == "fused_qkv":
            return True
        # the names are a guess: ours only where the forward it would get computes what the
        # module's own does (torchvision's Swin has qkv, proj and num_heads, and windows)
        key = _config_key(m)
        if key not in _COMPUTES_THE_SAME:
            _COMPUTES_THE_SAME[key] = _same_as_fused(m, self._head_dim(m))
        return _COMPUTES_THE_SAME[key]

    def _head_dim(self, m):
        return getattr(m, "etp_head_dim", None) or m.proj.in_features // m.num_heads

    def layout(self, m):
        H, d = m.num_heads, self._head_dim(m)
        return Layout(H, d, (("qkv.weight", "qkv.bias", 0), ("qkv.weight", "qkv.bias", H * d),
                              ("qkv.weight", "qkv.bias", 2 * H * d)), "proj.weight")

    def heads_refused(self, m):
        for n in ("q_norm", "k_norm"):
            if not isinstance(getattr(m, n, nn.Identity()), nn.Identity):
                return f"{type(m).__name__}.{n} normalises over the head dimension; not supported"
        return None

    def slices(self, m, role, units: str = "heads"):
        if role == "in":
            return [TensorSlice("qkv.weight", 1)]
        return [TensorSlice("proj.weight", 0)] + ([TensorSlice("proj.bias", 0)] if m.proj.bias is not None else [])

    def set_sizes(self, m, heads, head_dim):
        if getattr(m, "etp_scale", None) is None:
            m.etp_scale = float(getattr(m, "scale", self._head_dim(m) ** -0.5))
        m.num_heads, m.etp_head_dim = heads, head_dim
        m.etp_surgery = "fused_qkv"
        apply_surgery(m)
        fit_linears(m, ["qkv", "proj"])

    def num_channels(self, m, role):
        return m.proj.out_features if role == "out" else m.qkv.in_features



# ------------------------------------------------------------------------------ surgery
def _rebuild_fused(cls: type, state: dict) -> nn.Module:
    """Unpickle a fused-qkv attention: the user's class, its state, then the surgery again."""
    m = cls.__new__(cls)
    m.__setstate__(state)
    apply_surgery(m)
    return m


def _fused_reduce_ex(self, protocol):
    # the replacement class is made at run time, so pickle (torch.save(model), deepcopy) refers
    # to the user's class and re-applies the surgery on load
    return _rebuild_fused, (type(self).__mro__[1], self.__dict__.copy())


def apply_surgery(m: nn.Module) -> None:
    """Give ``m`` the forward that reads its pruned widths (idempotent; used by ``load_pruned``)."""
    if isinstance(m, nn.MultiheadAttention):
        if not isinstance(m, PrunedMultiheadAttention):
            if getattr(m, "etp_scale", None) is None:
                m.etp_scale = float(m.head_dim) ** -0.5
            m.etp_surgery = "mha"
            m.__class__ = PrunedMultiheadAttention
        return
    if getattr(m, "etp_surgery", None) == "fused_qkv":
        cls = type(m)
        if cls in _FUSED_CLASSES.values():
            return
        new = _FUSED_CLASSES.get(cls)
        if new is None:
            new = type(cls.__name__, (cls,), {"forward": _fused_qkv_forward, "__reduce_ex__": _fused_reduce_ex,
                                             "__module__": cls.__module__, "__qualname__": cls.__qualname__})
            _FUSED_CLASSES[cls] = new
        m.__class__ = new
