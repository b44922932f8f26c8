"""The benchmark runner end to end on the seconds-long synthetic task: cells, resume, report."""
import json

import pytest

from benchmarks import latency, methods, report, run
from benchmarks.tasks import TASKS, get_task


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    with pytest.MonkeyPatch.context() as mp:      # dense starts cached in a temporary folder
        mp.setenv("ETP_GRAPH_CACHE", str(tmp_path_factory.mktemp("cache")))
        assert run.main(["tiny-cnn", "--methods", "etp,group-sl,random", "--seeds", "0", "--out", str(out),
                         "--latency-repeat", "2"]) == 0
        yield out


def test_cells_record_every_stage_and_the_configuration(cells):
    files = sorted((cells / "tiny-cnn" / "quick").glob("*.json"))
    assert [f.name for f in files][:3] == ["etp-s0-soft0.75-streams.json", "group-sl-s0-soft0.75-streams.json",
                                         "random-s0-soft0.75-streams.json"]
    r = json.loads(files[0].read_text())
    assert r["config"]["method"]["regularizer"]["profile"] == "exp"
    assert r["config"]["method"]["regularizer"]["order"] == "norm"
    assert r["soft_cap"] == 0.75 and r["config"]["pruner"]["soft_cap"] == 0.75     # the pruner's default
    assert r["soft_cap_on"] == "streams" and r["config"]["pruner"]["soft_cap_on"] == "streams"
    assert r["config"]["budget"] == {"dense": 20, "reg": 10, "finetune": 5, "unit": "steps", "note": "seconds"}
    assert r["machine"]["threads"] >= 1 and r["machine"]["device"] == "cpu"
    assert set(r["wall_s"]) >= {"dense", "regularise", "plan", "latency", "total"}
    assert [c["target"] for c in r["cuts"]] == [1.5, 2.0]
    for c in r["cuts"]:
        assert c["speedup"] >= c["target"]
        assert c["macs"][1] < c["macs"][0] and c["params"][1] < c["params"][0]
        assert len(c["latency_ms"]) == 2 and all(v > 0 for v in c["latency_ms"])
        assert c["latency_side_by_side"] and c["latency_speedup"] > 0     # dense and cut in turns
        assert 0 <= c["pruned"]["acc"] <= 100 and 0 <= c["finetuned"]["acc"] <= 100
    a, b = r["cuts"]
    assert all(b["units_kept"][k] <= a["units_kept"][k] for k in a["units_kept"])    # nested family
    sl = json.loads(files[1].read_text())
    assert sl["config"]["method"]["regularizer"]["profile"] == "group-sl"
    assert json.loads(files[2].read_text())["config"]["method"]["importance"] == "random"
    assert sl["dense"] == r["dense"]       # one dense start per seed, shared by every method


def test_finished_cells_are_not_run_again(cells, capsys):
    before = {f: f.stat().st_mtime_ns for f in (cells / "tiny-cnn" / "quick").glob("*.json")}
    assert run.main(["tiny-cnn", "--methods", "etp,random", "--seeds", "0", "--out", str(cells)]) == 0
    assert "0 of 2 cells to run" in capsys.readouterr().out
    assert {f: f.stat().st_mtime_ns for f in before} == before


def test_report_writes_tables_and_plots(cells, tmp_path):
    md = tmp_path / "results.md"
    report.main(["--results", str(cells), "--out", str(md), "--img", str(tmp_path / "img")])
    text = md.read_text()
    assert "## tiny-cnn" in text and "python -m benchmarks.run tiny-cnn" in text
    for m in ("etp", "group-sl", "random"):
        assert f"| {m} |" in text
    assert (tmp_path / "img" / "tiny-cnn.png").stat().st_size > 1000
    assert (tmp_path / "img" / "latency.png").stat().st_size > 1000


def test_every_task_and_method_is_registered():
    assert set(TASKS) == {"tiny-cnn", "gat-cora", "informer-etth1", "resnet56-cifar10", "vgg19-cifar10", "minilm-sst2"}
    assert list(methods.DEFAULT_METHODS) == ["etp", "etp-paper", "torque", "group-sl", "magnitude", "random"]
    assert set(methods.METHODS) == set(methods.DEFAULT_METHODS) | {"etp-unit", "etp-steep"}
    assert methods.get("etp-unit").regularizer_config(0.1).scale == "unit"
    assert methods.get("etp-steep").regularizer_config(0.1).c == 10.0
    for name in TASKS:
        task = get_task(name)
        assert {"quick", "full"} <= set(task.budgets) or name == "tiny-cnn"
        assert all(m in task.betas for m in ("etp", "etp-paper", "torque", "group-sl", "etp-unit", "etp-steep")), name
    with pytest.raises(KeyError, match="known"):
        methods.get("obd")
    with pytest.raises(ValueError, match="budgets"):
        get_task("gat-cora")("huge")


def test_one_training_family_equals_separate_trainings_for_etp(cells):
    """ETP's penalty does not depend on the target: a training per target gives the same cuts."""
    assert run.main(["tiny-cnn", "--methods", "etp", "--seeds", "0", "--out", str(cells), "--separate",
                     "--latency-repeat", "2"]) == 0
    family = json.loads((cells / "tiny-cnn" / "quick" / "etp-s0-soft0.75-streams.json").read_text())
    separate = json.loads((cells / "tiny-cnn" / "quick" / "etp-s0-soft0.75-streams-sep.json").read_text())
    assert separate["separate_trainings"] and not family["separate_trainings"]
    for a, b in zip(family["cuts"], separate["cuts"]):
        assert (a["target"], a["macs"], a["units_kept"]) == (b["target"], b["macs"], b["units_kept"])
        assert a["pruned"] == b["pruned"] and a["finetuned"] == b["finetuned"]


def test_torch_pruning_row_runs_where_it_is_exact_and_refuses_with_its_error_elsewhere(cells):
    from benchmarks.torch_pruning_arm import exactness
    import etp_graph as eg
    assert run.main(["tiny-cnn", "--methods", "torch-pruning", "--seeds", "0", "--out", str(cells),
                     "--latency-repeat", "2"]) == 0
    r = json.loads((cells / "tiny-cnn" / "quick" / "torch-pruning-s0-soft0.75-streams.json").read_text())
    assert r["refused"] is None and [c["target"] for c in r["cuts"]] == [1.5, 2.0]
    assert all(c["speedup"] >= c["target"] for c in r["cuts"])
    e = eg.zoo.entry("tiny_resnet_a")         # option-A (zero-padded) shortcut: Torch-Pruning is not exact
    model = e.build().eval()
    reason = exactness(model, e.example_inputs(), e.heads(model))
    assert reason is not None and len(reason) > 10


def test_max_pruning_ratio_caps_every_group_for_every_method(cells):
    out = cells
    assert run.main(["tiny-cnn", "--methods", "magnitude", "--seeds", "0", "--out", str(out), "--speedups", "1.5",
                     "--max-pruning-ratio", "0.6", "--latency-repeat", "2"]) == 0
    r = json.loads((out / "tiny-cnn" / "quick" / "magnitude-s0-soft0.75-streams-m0.6.json").read_text())
    assert r["max_pruning_ratio"] == 0.6 and r["config"]["pruner"]["max_pruning_ratio"] == 0.6
    kept = r["cuts"][0]["units_kept"]
    assert kept and all(n >= 16 - int(16 * 0.6) for n in kept.values()), kept   # 16-unit groups
    assert run.cell_path(out, "t", "quick", "etp", 0, run.PlanOptions(8, 0.5)).name == "etp-s0-r8-m0.5.json"
    assert run.cell_path(out, "t", "quick", "etp", 0, run.PlanOptions(None, None, 0.75, "share", "streams")).name == \
        "etp-s0-soft0.75-streams.json"
    assert run.cell_path(out, "t", "quick", "etp", 0, run.PlanOptions(None, None, 0.75)).name == \
        "etp-s0-soft0.75-streams.json"      # the default: the cap on the streams only
    assert run.cell_path(out, "t", "quick", "etp", 0, run.PlanOptions(None, None, 0.75, "share", "all")).name == \
        "etp-s0-soft0.75.json"              # the cap on every group, as every cell before 2026-12-04
    assert run.cell_path(out, "t", "quick", "etp", 0, run.PlanOptions(None, None, 0.75, "kept")).name == \
        "etp-s0-soft0.75-streams-kept.json"
    cap = {"task": "t", "budget": "quick", "soft_cap": 0.75}
    assert report._key({**cap, "soft_cap_on": "streams", "score": "kept"}) == ("t", "quick", "score kept")
    assert report._key({**cap, "soft_cap_on": "streams"}) == ("t", "quick", "")    # the plain table
    assert report._key(cap) == ("t", "quick", "soft cap on every group")          # a cell from before the key
    # the command of a cell run under older defaults is shown with them made explicit
    assert report.command_today({**cap, "command": "python -m benchmarks.run t"}) == \
        "python -m benchmarks.run t --soft-cap-on all"
    assert report.command_today({"soft_cap": None, "command": "python -m benchmarks.run t"}) == \
        "python -m benchmarks.run t --soft-cap none"
    assert report.command_today({**cap, "soft_cap_on": "streams", "command": "x --soft-cap-on streams"}) == \
        "x --soft-cap-on streams"


def test_a_saved_regularised_model_gives_the_same_cell(cells, tmp_path, monkeypatch):
    """--reuse-regularised loads the cell's saved regularised weights: same metrics and cuts as
    the run that trained them (the fixture's cache, a fresh results folder)."""
    first = json.loads((cells / "tiny-cnn" / "quick" / "etp-s0-soft0.75-streams.json").read_text())
    task_cls = get_task("tiny-cnn")
    train = task_cls.train

    def no_regularising(self, model, length, seed, hook=None, phase="finetune"):
        assert phase != "regularise", "the saved regularised model was not reused"
        return train(self, model, length, seed, hook, phase)
    monkeypatch.setattr(task_cls, "train", no_regularising)
    assert run.main(["tiny-cnn", "--methods", "etp", "--seeds", "0", "--out", str(tmp_path),
                     "--latency-repeat", "2", "--reuse-regularised"]) == 0      # the fixture's cache
    again = json.loads((tmp_path / "tiny-cnn" / "quick" / "etp-s0-soft0.75-streams.json").read_text())
    assert again["regularised_reused"] and again["regularised"] == first["regularised"]
    assert [(c["units_kept"], c["pruned"], c["finetuned"]) for c in again["cuts"]] == \
        [(c["units_kept"], c["pruned"], c["finetuned"]) for c in first["cuts"]]


def test_latency_of_an_old_cell_is_measured_again_from_its_widths(cells, tmp_path, capsys):
    """benchmarks.latency rebuilds each cut from its units_kept (its MACs must match the cell's),
    times it beside the dense model and keeps the number of the run; cuts timed side by side in
    their run are left alone."""
    old = json.loads((cells / "tiny-cnn" / "quick" / "etp-s0-soft0.75-streams.json").read_text())
    for c in old["cuts"]:
        del c["latency_side_by_side"], c["latency_speedup"]
        c["latency_ms"] = [1e4, 1.0]                    # a dense model timed on a busy machine
    folder = tmp_path / "tiny-cnn" / "quick"
    folder.mkdir(parents=True)
    (folder / "old.json").write_text(json.dumps(old))
    new = json.loads((cells / "tiny-cnn" / "quick" / "random-s0-soft0.75-streams.json").read_text())
    (folder / "new.json").write_text(json.dumps(new))
    assert latency.main(["--results", str(tmp_path), "--repeat", "2", "--rounds", "3"]) == 0
    again = json.loads((folder / "old.json").read_text())
    for c in again["cuts"]:
        assert c["latency_ms_in_run"] == [1e4, 1.0] and c["latency_ms"] != [1e4, 1.0]
        assert 0 < c["latency_speedup"] < 100 and c["latency_remeasured"]["repeat"] == 2
        ratios = c["latency_remeasured"]["ratios"]   # three runs, the median one kept
        assert len(ratios) == 3 and c["latency_speedup"] == sorted(ratios)[1]
    assert json.loads((folder / "new.json").read_text()) == new
    assert latency.main(["--results", str(tmp_path), "--repeat", "2"]) == 0      # nothing left to time
    assert json.loads((folder / "old.json").read_text()) == again
    (folder / "old.json").write_text(json.dumps({**old, "cuts": [{**old["cuts"][0], "macs": [1, 2]}]}))
    assert latency.main(["--results", str(tmp_path), "--repeat", "2"]) == 1      # reported, left as it was
    assert "do not rebuild its model" in capsys.readouterr().out
    assert json.loads((folder / "old.json").read_text())["cuts"][0]["macs"] == [1, 2]


def test_compare_plans_tells_the_same_cut_from_another(cells, capsys):
    """On the fixture's saved regularised model: a setting against itself plans the same units at
    every speed-up (exit 0); a hard cap that binds plans others (exit 1)."""
    from benchmarks import compare_plans
    assert compare_plans.main(["tiny-cnn", "--methods", "etp,random", "--a", "soft_cap_on=streams",
                               "--b", "soft_cap_on=streams"]) == 0
    assert "4 of 4 plans the same" in capsys.readouterr().out
    assert compare_plans.main(["tiny-cnn", "--methods", "etp", "--a", "max_pruning_ratio=0.2"]) == 1
    assert "different units" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown planner setting"):
        compare_plans.main(["tiny-cnn", "--a", "beta=1"])


def test_widths_from_another_cell_cut_this_methods_units_to_its_widths(cells):
    """--widths-from random: ETP's trained model cut to the widths random's cell kept (the same
    targets), the units chosen by ETP's importance; a missing source cell is a clear error."""
    assert run.main(["tiny-cnn", "--methods", "etp", "--seeds", "0", "--out", str(cells), "--latency-repeat", "2",
                     "--widths-from", "random", "--reuse-regularised"]) == 0
    folder = cells / "tiny-cnn" / "quick"
    mine = json.loads((folder / "etp-s0-soft0.75-streams-wrandom.json").read_text())
    theirs = json.loads((folder / "random-s0-soft0.75-streams.json").read_text())
    own = json.loads((folder / "etp-s0-soft0.75-streams.json").read_text())
    assert mine["widths_from"] == "random" and mine["regularised"] == own["regularised"]
    assert [(c["target"], c["units_kept"], c["macs"]) for c in mine["cuts"]] == \
        [(c["target"], c["units_kept"], c["macs"]) for c in theirs["cuts"]]
    assert report._row_name(mine) == "etp (widths of random)"
    with pytest.raises(SystemExit, match="no cell"):
        run.main(["tiny-cnn", "--methods", "etp", "--seeds", "0", "--out", str(cells), "--widths-from", "torque"])
