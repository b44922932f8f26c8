"""Informer (Zhou et al., "Informer: Beyond Efficient Transformer for Long Sequence Time-Series
Forecasting", AAAI 2021), written here from the paper's description.

Token embedding (circular Conv1d) + fixed positional + time-feature embeddings; ProbSparse
self-attention (the query sampling is drawn from a generator seeded by ``seed``, so a forward is
deterministic and masking equals pruning); self-attention distilling (Conv1d + BatchNorm + ELU +
MaxPool between encoder layers); a decoder with masked ProbSparse self-attention and full cross
attention; a linear projection head. Attention layers are ``AttentionLayer``s with
``query/key/value/out_projection`` and ``n_heads``, which the attention handler prunes per head.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model

__all__ = ["Informer", "ProbAttention", "FullAttention", "AttentionLayer"]


class FullAttention(nn.Module):
    def __init__(self, mask_flag: bool = True, scale: Optional[float] = None, dropout: float = 0.1):
        super().__init__()
        self.mask_flag, self.scale, self.dropout = mask_flag, scale, nn.Dropout(dropout)

    def forward(self, q, k, v):                        # (B, L, H, E)
        scale = self.scale or 1.0 / math.sqrt(q.shape[-1])
        scores = torch.einsum("blhe,bshe->bhls", q, k) * scale
        if self.mask_flag:
            L, S = scores.shape[-2:]
            scores = scores.masked_fill(torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        a = self.dropout(scores.softmax(-1))
        return torch.einsum("bhls,bshd->blhd", a, v)


class ProbAttention(nn.Module):
    """ProbSparse attention: only the ``factor·ln L`` queries with the largest sparsity measure
    ``M = max(q·kᵀ) − mean(q·kᵀ)`` (estimated on ``factor·ln L`` sampled keys) attend; the rest
    take the mean (or, masked, the cumulative sum) of the values."""

    def __init__(self, mask_flag: bool = True, factor: int = 5, scale: Optional[float] = None,
                 dropout: float = 0.1, seed: int = 0):
        super().__init__()
        self.mask_flag, self.factor, self.scale, self.seed = mask_flag, factor, scale, seed
        self.dropout = nn.Dropout(dropout)

    def forward(self, q, k, v):                        # (B, L, H, E)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)     # (B, H, L, E)
        B, H, L_Q, E = q.shape
        L_K = k.shape[2]
        u_k = min(self.factor * math.ceil(math.log(L_K)), L_K)
        u_q = min(self.factor * math.ceil(math.log(L_Q)), L_Q)
        g = torch.Generator().manual_seed(self.seed)
        sample = torch.randint(L_K, (L_Q, u_k), generator=g).to(q.device)
        k_sample = k[:, :, sample, :]                                          # (B, H, L_Q, u_k, E)
        qk_sample = (q.unsqueeze(-2) @ k_sample.transpose(-2, -1)).squeeze(-2)
        m = qk_sample.max(-1)[0] - qk_sample.sum(-1) / L_K
        top = m.topk(u_q, sorted=False)[1]                                     # (B, H, u_q)
        q_reduce = torch.gather(q, 2, top.unsqueeze(-1).expand(-1, -1, -1, E))
        scale = self.scale or 1.0 / math.sqrt(E)
        scores = (q_reduce @ k.transpose(-2, -1)) * scale                      # (B, H, u_q, L_K)
        if self.mask_flag:
            if L_Q != L_K:
                raise ValueError("masked ProbSparse self-attention needs as many queries as keys")
            context = v.cumsum(dim=-2)
            causal = torch.ones(L_Q, L_K, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(causal[top], float("-inf"))
        else:
            context = v.mean(dim=-2, keepdim=True).expand(B, H, L_Q, v.shape[-1]).clone()
        attn = self.dropout(scores.softmax(-1))
        context = context.scatter(2, top.unsqueeze(-1).expand(-1, -1, -1, v.shape[-1]), attn @ v)
        return context.transpose(1, 2)                                         # (B, L, H, D)


class AttentionLayer(nn.Module):
    def __init__(self, attention: nn.Module, d_model: int, n_heads: int, mix: bool = False):
        super().__init__()
        d = d_model // n_heads
        self.inner_attention, self.n_heads, self.mix = attention, n_heads, mix
        self.query_projection = nn.Linear(d_model, d * n_heads)
        self.key_projection = nn.Linear(d_model, d * n_heads)
        self.value_projection = nn.Linear(d_model, d * n_heads)
        self.out_projection = nn.Linear(d * n_heads, d_model)

    def forward(self, queries, keys, values):
        B, L, _ = queries.shape
        S, H = keys.shape[1], self.n_heads
        out = self.inner_attention(self.query_projection(queries).view(B, L, H, -1),
                                   self.key_projection(keys).view(B, S, H, -1),
                                   self.value_projection(values).view(B, S, H, -1))
        if self.mix:
            out = out.transpose(2, 1).contiguous()
        return self.out_projection(out.reshape(B, L, -1))


class DataEmbedding(nn.Module):
    """Value (circular Conv1d over time) + fixed sinusoidal position + time features (Linear)."""

    def __init__(self, c_in: int, d_model: int, time_features: int = 4, dropout: float = 0.1, max_len: int = 5000):
        super().__init__()
        self.token = nn.Conv1d(c_in, d_model, 3, padding=1, padding_mode="circular", bias=False)
        self.temporal = nn.Linear(time_features, d_model, bias=False)
        pe = torch.zeros(max_len, d_model)
        pos = torch.arange(max_len).unsqueeze(1).float()
        div = torch.exp(torch.arange(0, d_model, 2).float() * -(math.log(10000.0) / d_model))
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
        self.register_buffer("pe", pe, persistent=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, x_mark):
        v = self.token(x.transpose(1, 2)).transpose(1, 2)
        return self.dropout(v + self.pe[: x.shape[1]] + self.temporal(x_mark))


class ConvLayer(nn.Module):
    """Self-attention distilling: halves the sequence."""

    def __init__(self, c: int):
        super().__init__()
        self.downConv = nn.Conv1d(c, c, 3, padding=1, padding_mode="circular")
        self.norm = nn.BatchNorm1d(c)
        self.maxPool = nn.MaxPool1d(3, stride=2, padding=1)

    def forward(self, x):
        return self.maxPool(F.elu(self.norm(self.downConv(x.transpose(1, 2))))).transpose(1, 2)


class EncoderLayer(nn.Module):
    def __init__(self, attention, d_model, d_ff, dropout=0.1):
        super().__init__()
        self.attention = attention
        self.conv1, self.conv2 = nn.Conv1d(d_model, d_ff, 1), nn.Conv1d(d_ff, d_model, 1)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        x = self.norm1(x + self.dropout(self.attention(x, x, x)))
        y = self.dropout(F.gelu(self.conv1(x.transpose(1, 2))))
        return self.norm2(x + self.dropout(self.conv2(y).transpose(1, 2)))


class DecoderLayer(nn.Module):
    def __init__(self, self_attention, cross_attention, d_model, d_ff, dropout=0.1):
        super().__init__()
        self.self_attention, self.cross_attention = self_attention, cross_attention
        self.conv1, self.conv2 = nn.Conv1d(d_model, d_ff, 1), nn.Conv1d(d_ff, d_model, 1)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d_model) for _ in range(3))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, cross):
        x = self.norm1(x + self.dropout(self.self_attention(x, x, x)))
        x = self.norm2(x + self.dropout(self.cross_attention(x, cross, cross)))
        y = self.dropout(F.gelu(self.conv1(x.transpose(1, 2))))
        return self.norm3(x + self.dropout(self.conv2(y).transpose(1, 2)))


class Informer(nn.Module):
    """``forward(x_enc, x_mark_enc, x_dec, x_mark_dec) -> (B, pred_len, c_out)``.

    Defaults follow the paper's ETTh setting (d_model 512, 8 heads, 2 encoder + 1 decoder layers,
    d_ff 2048, factor 5, distil, decoder self-attention ``mix``)."""

    def __init__(self, enc_in=7, dec_in=7, c_out=7, pred_len=24, d_model=512, n_heads=8, e_layers=2,
                 d_layers=1, d_ff=2048, factor=5, dropout=0.05, distil=True, mix=True, seed=0):
        super().__init__()
        self.pred_len = pred_len
        self.enc_embedding = DataEmbedding(enc_in, d_model, dropout=dropout)
        self.dec_embedding = DataEmbedding(dec_in, d_model, dropout=dropout)
        self.encoder = nn.ModuleList(
            EncoderLayer(AttentionLayer(ProbAttention(False, factor, dropout=dropout, seed=seed), d_model, n_heads),
                         d_model, d_ff, dropout) for _ in range(e_layers))
        self.distil = nn.ModuleList(ConvLayer(d_model) for _ in range(e_layers - 1)) if distil else nn.ModuleList()
        self.enc_norm = nn.LayerNorm(d_model)
        self.decoder = nn.ModuleList(
            DecoderLayer(AttentionLayer(ProbAttention(True, factor, dropout=dropout, seed=seed), d_model, n_heads, mix=mix),
                         AttentionLayer(FullAttention(False, dropout=dropout), d_model, n_heads),
                         d_model, d_ff, dropout) for _ in range(d_layers))
        self.dec_norm = nn.LayerNorm(d_model)
        self.projection = nn.Linear(d_model, c_out)

    def forward(self, x_enc, x_mark_enc, x_dec, x_mark_dec):
        enc = self.enc_embedding(x_enc, x_mark_enc)
        for i, layer in enumerate(self.encoder):
            enc = layer(enc)
            if i < len(self.distil):
                enc = self.distil[i](enc)
        enc = self.enc_norm(enc)
        dec = self.dec_embedding(x_dec, x_mark_dec)
        for layer in self.decoder:
            dec = layer(dec, enc)
        return self.projection(self.dec_norm(dec))[:, -self.pred_len:, :]


def informer_inputs(batch=2, seq_len=32, label_len=16, pred_len=8, channels=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, seq_len, channels, generator=g), torch.rand(batch, seq_len, 4, generator=g) - 0.5,
            torch.randn(batch, label_len + pred_len, channels, generator=g),
            torch.rand(batch, label_len + pred_len, 4, generator=g) - 0.5)


@register_model("informer_etth1", informer_inputs, heads=lambda m: [m.projection], tags=("informer",))
def informer_etth1(pred_len: int = 8, **kwargs) -> nn.Module:
    """Informer for ETTh1 (7 variables), small widths for tests (d_model 64, 4 heads, d_ff 128);
    pass the paper's ``d_model=512, n_heads=8, d_ff=2048`` for the full model."""
    torch.manual_seed(0)
    cfg = dict(d_model=64, n_heads=4, d_ff=128, pred_len=pred_len)
    cfg.update(kwargs)
    return Informer(**cfg)
