"""MultiheadAttentionHandler: its embedding width is refused with the reason; FFNs still prune."""
import torch
from torch import nn

import etp_graph as eg


def test_mha_embedding_group_is_skipped_with_reason_and_ffn_prunes():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, batch_first=True, dropout=0.0)
    g = eg.trace(layer, torch.randn(2, 3, 8))
    assert [(q.root, q.size) for q in g.groups] == [("linear1", 12)]
    assert any("head_dim" in s.reason for s in g.skipped)
