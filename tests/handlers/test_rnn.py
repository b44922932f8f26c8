"""RNNHandler: a hidden unit owns its gate rows in every layer and direction."""
import pytest
import torch
from torch import nn

import etp_graph as eg
from etp_graph.handlers import get_handler
from etp_graph.testing import assert_prune_equivalent


@pytest.mark.parametrize("cls,gates", [(nn.LSTM, 4), (nn.GRU, 3)])
def test_gate_rows_per_hidden_unit(cls, gates):
    m = cls(3, 5, num_layers=2, bidirectional=True)
    rows = [s for s in get_handler(m).slices(m, "out") if s.attr == "weight_ih_l1_reverse" and s.dim == 0][0]
    pos, idx = rows.index(torch.tensor([5 + 2]))          # backward direction, hidden unit 2
    assert sorted(idx.tolist()) == [2 + k * 5 for k in range(gates)]


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_stacked_bidirectional_prunes_exactly(cls):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.fc = cls(4, 6, num_layers=2, bidirectional=True, batch_first=True), nn.Linear(12, 2)

        def forward(self, x):
            return self.fc(self.rnn(x)[0][:, -1])

    torch.manual_seed(0)
    net, x = Net(), torch.randn(2, 5, 4)
    (g,) = eg.trace(net, x, ignored_layers=[net.fc]).groups
    assert g.size == 6
    assert_prune_equivalent(net, x, ignored_layers=[net.fc])
    g.prune([0, 1])
    assert net.rnn.hidden_size == 4 and net.fc.in_features == 8 and net(x).shape == (2, 2)


def test_projected_lstm_is_refused():
    m = nn.LSTM(3, 6, proj_size=2)
    assert "proj_size" in get_handler(m).unsupported(m, "out")
