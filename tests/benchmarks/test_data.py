"""Text loader: GLUE SST-2 from the shared TSVs, clear errors otherwise."""
import pytest

from benchmarks.data import load_sst2


def test_sst2_reads_glue_tsv_with_quotes_kept_verbatim():
    train, y_train = load_sst2("train")
    dev, y_dev = load_sst2("dev")
    assert (len(train), len(dev)) == (67349, 872) and len(y_train) == 67349
    assert set(y_dev.tolist()) == {0, 1} and int(y_dev.sum()) == 444
    assert dev[0] == "it 's a charming and often affecting journey . "


def test_sst2_quote_does_not_swallow_lines(tmp_path):
    (tmp_path / "train.tsv").write_text('sentence\tlabel\n"a quoted start\t1\nnext one\t0\n')
    x, y = load_sst2("train", root=tmp_path)
    assert x == ['"a quoted start', "next one"] and y.tolist() == [1, 0]


def test_sst2_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="hides the SST-2 test labels"):
        load_sst2("test")
    with pytest.raises(FileNotFoundError, match="dev.tsv"):
        load_sst2("dev", root=tmp_path)
    (tmp_path / "dev.tsv").write_text("text\tlabel\nfine\t1\n")
    with pytest.raises(ValueError, match="'sentence' and 'label'"):
        load_sst2("dev", root=tmp_path)
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nfine\t1\nbroken line\n")
    with pytest.raises(ValueError, match="dev.tsv:3"):
        load_sst2("dev", root=tmp_path)


def test_no_data_folder_is_a_clear_error(monkeypatch):
    from benchmarks.data import load_cifar
    from etp_graph.zoo.resnet_cifar import default_weights_dir
    monkeypatch.delenv("ETP_GRAPH_DATA", raising=False)
    monkeypatch.delenv("ETP_GRAPH_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError, match="set ETP_GRAPH_DATA"):
        load_cifar(None, "test")
    with pytest.raises(FileNotFoundError, match="set ETP_GRAPH_WEIGHTS"):
        default_weights_dir()
