"""The etp-graph command: inspect and prune a user's model from the shell, graph pictures,
exit codes (0 done, 2 bad usage, 1 failure) with one line on stderr; demo and bench forward."""
import sys

import pytest
import torch

import etp_graph as eg
from etp_graph import cli
from etp_graph.extras import require

NET = '''
import torch
from torch import nn


def make(width=16, classes=10):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, classes))
'''


@pytest.fixture
def netfile(tmp_path, monkeypatch):
    path = tmp_path / "mynet.py"
    path.write_text(NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    return path


def test_inspect_a_zoo_model_prints_groups_macs_and_params(capsys):
    assert cli.main(["inspect", "zoo:tiny_cnn"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["id", "root", "units", "layers", "check"]
    assert len([line for line in out.splitlines()[1:] if line.split()[0].isdigit()]) == 3
    assert f"MACs {eg.count_macs(eg.zoo.create('tiny_cnn'), eg.zoo.entry('tiny_cnn').example_inputs()):,}" in out


def test_time_limit_reaches_the_trace(capsys):
    assert cli.main(["inspect", "zoo:tiny_cnn", "--time-limit", "0"]) == 0
    out = capsys.readouterr().out
    assert not [line for line in out.splitlines()[1:] if line.split()[0].isdigit()]
    assert out.count("the trace's time limit of 0 s ran out") == 3
    assert cli.main(["inspect", "zoo:tiny_cnn", "--time-limit", "none"]) == 0
    assert len([line for line in capsys.readouterr().out.splitlines()[1:] if line.split()[0].isdigit()]) == 3


@pytest.mark.parametrize("how", ["file", "module"])
def test_inspect_a_users_model_from_a_file_or_a_module(how, netfile, capsys):
    spec = f"{netfile}:make" if how == "file" else "mynet:make"
    assert cli.main(["inspect", spec, "--input-shape", "1,3,8,8", "--ignore", "7"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[1] for line in out.splitlines()[1:3]] == ["0", "3"]


def test_factory_arguments_are_python_literals(netfile, capsys):
    assert cli.main(["inspect", f"{netfile}:make", "--arg", "width=24", "--arg", "classes=3",
                     "--input-shape", "1,3,8,8", "--ignore", "7"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:3]]
    assert [(r[1], r[2]) for r in rows] == [("0", "24"), ("3", "32")]


def test_a_transformers_class_is_built_from_its_config_with_token_ids(tmp_path, capsys):
    pytest.importorskip("transformers")
    args = ["transformers:GPT2LMHeadModel", "--arg", "n_layer=2", "--arg", "n_embd=32", "--arg", "n_head=4",
            "--arg", "vocab_size=50", "--input-shape", "2,8", "--ignore", "lm_head"]
    assert cli.main(["inspect"] + args) == 0
    out = capsys.readouterr().out
    roots = [line.split()[1] for line in out.splitlines()[1:] if line.split()[0].isdigit()]
    assert roots == ["transformer.wte"] + [f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("attn.c_attn", "mlp.c_fc")]
    assert cli.main(["prune"] + args + ["--target-speedup", "1.5", "--out", str(tmp_path / "g.pt")]) == 0
    assert "1.5" in capsys.readouterr().out and (tmp_path / "g.pt").is_file()
    assert cli.main(["inspect", "transformers:GPT2LMHeadModel", "--arg", "n_layerz=2"]) == 2
    assert "GPT2Config has no such field" in capsys.readouterr().err


def test_inputs_from_a_file(netfile, tmp_path, capsys):
    torch.save(torch.randn(2, 3, 8, 8), tmp_path / "x.pt")
    assert cli.main(["inspect", f"{netfile}:make", "--inputs", str(tmp_path / "x.pt"), "--ignore", "7"]) == 0
    assert "MACs" in capsys.readouterr().out


@pytest.mark.parametrize("ext", [".html", ".dot"])
def test_graph_pictures_colour_layers_by_group(ext, tmp_path, capsys):
    out = tmp_path / f"g{ext}"
    assert cli.main(["inspect", "zoo:tiny_cnn", "--graph", str(out)]) == 0
    text = out.read_text()
    assert "c1" in text and "hidden" in text
    assert "#4e79a7" in text and "#f28e2b" in text    # groups 0 and 1 in their colours


def test_prune_writes_a_model_that_loads_back(netfile, tmp_path, capsys):
    out = tmp_path / "p.pt"
    assert cli.main(["prune", f"{netfile}:make", "--input-shape", "1,3,8,8", "--ignore", "7",
                     "--target-speedup", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "MACs" in text and "units kept" in text
    sys.path.insert(0, str(netfile.parent))
    import mynet
    fresh = eg.load_pruned(mynet.make, out).eval()
    assert fresh[0].out_channels < 16 or fresh[3].out_channels < 32
    assert fresh(torch.randn(1, 3, 8, 8)).shape == (1, 10)


@pytest.mark.parametrize("argv, says", [
    (["inspect", "zoo:no_such_model"], "no zoo model 'no_such_model'"),
    (["inspect", "nothing"], "expected zoo:NAME"),
    (["inspect", "mynet.py:nope"], "no file"),
    (["inspect", "{net}:nope", "--input-shape", "1,3,8,8"], "has no callable 'nope'"),
    (["inspect", "{net}:make"], "no example inputs: pass --input-shape"),
    (["inspect", "{net}:make", "--input-shape", "1,x"], "expected positive ints"),
    (["inspect", "{net}:make", "--input-shape", "1,3,8,8", "--ignore", "9"], "no such module"),
    (["inspect", "{net}:make", "--arg", "depth"], "expected name=value"),
    (["inspect", "{net}:make", "--arg", "depth=3"], "pass its arguments with --arg"),
    (["inspect", "zoo:tiny_cnn", "--arg", "width=3"], "is built as registered"),
    (["inspect", "zoo:tiny_cnn", "--graph", "g.pdf"], "write one of"),
    (["prune", "zoo:tiny_cnn", "--out", "p.pt"], "one of the arguments --target-speedup --pruning-ratio"),
    (["inspect", "zoo:tiny_cnn", "--time-limit", "-1"], "expected seconds >= 0 or 'none'"),
])
def test_bad_usage_is_one_line_and_exit_2(argv, says, netfile, capsys):
    argv = [a.replace("{net}", str(netfile)) for a in argv]
    try:
        code = cli.main(argv)
    except SystemExit as e:     # argparse's own usage errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and says in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_failure_is_one_line_exit_1_and_its_traceback_with_v(netfile, capsys):
    argv = ["inspect", f"{netfile}:make", "--input-shape", "1,4,8,8", "--ignore", "7"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot run on example_inputs" in err
    with pytest.raises(eg.TraceError):
        cli.main(["-v"] + argv)


def test_a_checkpoint_for_another_architecture_is_refused(netfile, tmp_path, capsys):
    torch.save(torch.nn.Linear(3, 4).state_dict(), tmp_path / "w.pt")
    assert cli.main(["prune", f"{netfile}:make", "--input-shape", "1,3,8,8", "--checkpoint", str(tmp_path / "w.pt"),
                     "--target-speedup", "2", "--out", str(tmp_path / "p.pt")]) == 1
    assert "does not fit this model" in capsys.readouterr().err and not (tmp_path / "p.pt").exists()


def test_demo_and_bench_take_their_own_options(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--help"])
    assert e.value.code == 0 and "--etp-steps" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--help"])
    assert e.value.code == 0 and "--reuse-regularised" in capsys.readouterr().out


def test_a_missing_extra_is_named():
    with pytest.raises(ImportError, match=r"pip install 'etp-graph\[pyg\]'"):
        require("torch_geometric.no_such_module", "the GAT zoo models")
    with pytest.raises(ImportError, match=r"pip install 'etp-graph\[viz\]'"):
        require("pyvis.no_such_module", "graph pictures")
