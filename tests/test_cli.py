"""The etp-graph command: inspect prints the groups; demo forwards to benchmarks.demo."""
import pytest

from etp_graph import cli
from etp_graph.extras import require


def test_inspect_prints_every_group(capsys):
    assert cli.main(["inspect", "tiny_cnn"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["id", "root", "units", "layers", "check"]
    assert len([l for l in out.splitlines()[1:] if l.split()[0].isdigit()]) == 3


def test_bad_usage_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["inspect", "no_such_model"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_demo_takes_the_demo_options(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--help"])
    assert e.value.code == 0 and "--etp-steps" in capsys.readouterr().out


def test_a_missing_extra_is_named():
    with pytest.raises(ImportError, match=r"pip install 'etp-graph\[pyg\]'"):
        require("torch_geometric.no_such_module", "the GAT zoo models")
