"""Smoke tests of the benchmark scripts: each main() with tiny arguments, and their shared module.

The scripts import their scaffolding as ``common`` from their own folder (they run as
``python benchmarks/<script>.py``), so the ``bench`` fixture puts that folder on ``sys.path`` and
forgets the imported modules afterwards.
"""

import argparse
import importlib
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

import mmtl_lib as ml

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
DATA = Path(os.environ.get("MMTL_DATA", Path(__file__).resolve().parents[2] / "shared/data/omniglot"))
needs_omniglot = pytest.mark.skipif(not (DATA / "omniglot-py").is_dir(), reason=f"no Omniglot at {DATA}")


@pytest.fixture
def bench(monkeypatch):
    """``bench(name)``: the module of ``benchmarks/<name>.py``, imported as its script imports."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    loaded = ["common"]

    def load(name):
        loaded.append(name)
        return importlib.import_module(name)

    yield load
    for name in loaded:
        sys.modules.pop(name, None)


def finite(pair):
    return all(math.isfinite(v) for v in pair)


# --- common -----------------------------------------------------------------------------------


def test_check_arguments_names_the_option_its_value_and_what_is_allowed(bench, capsys):
    common = bench("common")
    p = argparse.ArgumentParser(prog="bench")
    with pytest.raises(SystemExit):
        common.check_arguments(p, argparse.Namespace(seeds=0, k_shot=5), positive=("k_shot", "seeds"))
    assert "--seeds = 0 is not allowed: it must be >= 1" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        common.check_arguments(p, argparse.Namespace(methods="EW, fastest"), methods=("EW", "UW"))
    assert "--methods = 'EW, fastest': unknown ['fastest']; allowed: EW, UW" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        common.check_arguments(p, argparse.Namespace(only=" , "), methods=("cpu",), option="only")
    assert "--only = ' , ': unknown []; allowed: cpu" in capsys.readouterr().err

    args = argparse.Namespace(seeds=2, methods=" UW,EW ")
    common.check_arguments(p, args, positive=("seeds",), methods=("EW", "UW"))
    assert args.methods == ["UW", "EW"]


def test_save_report_records_the_machine(bench, tmp_path, capsys):
    common = bench("common")
    path = tmp_path / "new" / "report.json"
    common.save_report(str(path), {"summary": {"EW": [1.0, 0.0]}})
    report = json.loads(path.read_text())
    assert list(report) == ["machine", "summary"]
    assert report["machine"] == ml.machine() and report["summary"] == {"EW": [1.0, 0.0]}
    assert f"wrote {path}" in capsys.readouterr().out
    common.save_report(None, {"summary": {}})  # no --json: nothing written, nothing raised


def test_tables_and_epoch_batches(bench):
    common = bench("common")
    assert common.mean_std([1.0]) == (1.0, 0.0) and common.mean_std([1.0, 3.0]) == (2.0, 2**0.5)
    assert common.cell((0.5, 0.25)) == "0.500 +- 0.250" and common.cell((2.0, 0.5), ".1f", "+") == "+2.0 +- 0.5"
    order = common.epoch_batches(10, 7, 3, ml.generator(0))
    assert order.shape == (7, 3)
    for epoch in (order[:3], order[3:6]):  # 3 batches an epoch, no index twice, the 10th dropped
        assert epoch.unique().numel() == 9


# --- the scripts ------------------------------------------------------------------------------


def test_lookahead_benchmark_smoke(bench, capsys):
    report = bench("mmtl_lookahead").main(["--seeds", "1", "--train-steps", "5", "--n-aux", "30", "--n-test", "50",
                                           "--log-every", "2"])
    rows = {"single-task", "equal", "MAML + fine-tune", "learned k=1", "learned k=1 + refit", "learned k=3",
            "learned k=3 + refit", "oracle"}
    assert set(report["summary"]) == rows
    assert all(finite(row["mse"]) for row in report["summary"].values())
    assert len(report["per_seed"][0]["weight_history"]["learned k=3"]) == 3
    assert report["args"]["train_steps"] == 5 and report["args"]["maml_inner_steps"] == 1
    assert "primary test MSE" in capsys.readouterr().out


def test_tr_maml_benchmark_smoke(bench, capsys):
    report = bench("tr_maml").main(["--seeds", "1", "--iterations", "5", "--test-tasks", "30",
                                    "--test-inner-steps", "2"])
    assert set(report["summary"]) == {"MAML", "TR-MAML", "MTL pretrain"}
    for row in report["summary"].values():
        assert finite(row["mean_mse"]) and finite(row["worst_bin_mse"]) and len(row["bin_mse"]) == 10
    assert 0 <= report["summary"]["TR-MAML"]["p_hard"][0] <= 1
    assert "worst-bin MSE" in capsys.readouterr().out


def test_mmaml_benchmark_smoke(bench, capsys):
    report = bench("mmaml").main(["--seeds", "1", "--iterations", "5", "--test-tasks", "12", "--inner-steps", "2"])
    assert set(report["summary"]) == {"MMAML", "MAML", "MTL pretrain"}
    for row in report["summary"].values():
        assert finite(row["mse"]) and all(finite(row[f"mse_{m}"]) for m in ("sine", "linear", "quadratic"))
    assert "quadratic" in capsys.readouterr().out


def test_mtl_synthetic_benchmark_smoke(bench, tmp_path, capsys):
    out = tmp_path / "mtl_synthetic.json"
    report = bench("mtl_synthetic").main(["--seeds", "1", "--train-steps", "3", "--tasks", "2", "--n-train", "20",
                                          "--n-test", "10", "--batch-size", "10", "--json", str(out)])
    methods = ["EW", "EW/L0", "UW", "GradNorm", "DWA", "PCGrad", "RLW", "cross-stitch", "STL"]
    assert list(report["summary"]) == methods
    for row in report["summary"].values():
        assert finite(row["M_mean"]) and finite(row["delta_p"])
    assert report["summary"]["STL"]["delta_p"] == (0.0, 0.0)
    assert len(report["per_seed"][0]["GradNorm"]["weights"]) == 2
    assert json.loads(out.read_text())["machine"] == ml.machine()
    assert "Predicting 0 scores" in capsys.readouterr().out


def test_throughput_benchmark_smoke(bench, capsys, monkeypatch):
    monkeypatch.setattr(ml.compiled, "COMPILER", None)  # the compile backend's graph, traced but not compiled
    report = bench("throughput").main(["--device", "cpu", "--iters", "1", "--repeats", "1", "--warmup", "0",
                                       "--filters", "4", "--n-query", "1", "--meta-batch-size", "2",
                                       "--warm-compile-cache"])
    check = report["gradient_check"]
    assert check["reference"] == "torch.func loop"
    assert check["mmtl_lib loop"]["allclose"]
    # vmap sums the batched convolutions in another order: close in norm, not always entrywise
    assert check["mmtl_lib vmap"]["rel_norm_diff"] < 1e-4
    assert check["mmtl_lib compile"]["allclose"]
    assert not check["first_order_contrast"]["allclose"]
    ran = {"mmtl_lib loop", "mmtl_lib vmap", "mmtl_lib compile", "torch.func loop"} | set(report["peers"])
    assert set(report["results"]) == ran and set(report["skipped"]) == {"learn2learn", "higher"} - ran
    assert all(r["meta_iterations_per_s"] > 0 for r in report["results"].values())
    assert report["inner_steps"] == 1 and report["peer_model"] == "torch"
    assert report["compile"]["first_iteration_s"] > 0 and report["compile"]["inductor_cache"] == "warm"
    out = capsys.readouterr().out
    assert "meta-gradient check" in out and "compile: first meta-iteration" in out


@needs_omniglot
def test_cpu_budget_benchmark_trains_scores_and_reports(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MMTL_DATA", str(DATA))
    cpu_budget = bench("cpu_budget")
    out = tmp_path / "budget.json"
    rows = cpu_budget.main(["--budget", "1", "--tasks", "5", "--only", "cpu", "--json", str(out)])
    assert rows[0]["iterations"] > 0 and 0 <= rows[0]["accuracy"] <= 1 and rows[0]["test_inner_steps"] == 3
    report = json.loads(out.read_text())
    assert report["runs"][0]["name"] == "cpu" and report["machine"] == ml.machine()
    assert report["cpu_preset"] == ml.preset("cpu").to_dict()
    with pytest.raises(SystemExit):
        cpu_budget.main(["--only", "cpu,fastest"])
    assert "'fastest'" in capsys.readouterr().err


@needs_omniglot
def test_mtl_omniglot_benchmark_smoke(bench, monkeypatch, capsys):
    monkeypatch.setenv("MMTL_DATA", str(DATA))
    report = bench("mtl_omniglot").main(["--seeds", "1", "--train-steps", "2", "--alphabets", "Braille,Futurama",
                                         "--batch-size", "2", "--filters", "4"])
    assert list(report["summary"]) == ["EW", "UW", "GradNorm", "DWA", "PCGrad", "RLW", "STL"]
    for row in report["summary"].values():
        assert 0 <= row["mean_accuracy"][0] <= 1 and finite(row["delta_p"])
    assert report["alphabets"] == {"Braille": 26, "Futurama": 26} and "data" not in report["args"]
    assert "test accuracy % per alphabet" in capsys.readouterr().out


@needs_omniglot
def test_allocator_benchmark_smoke(bench, monkeypatch, capsys):
    monkeypatch.setenv("MMTL_DATA", str(DATA))
    report = bench("allocator").main(["--iters", "1", "--repeats", "1", "--warmup", "1"])
    if report:  # empty where keep_freed_memory() does not apply (not Linux with glibc)
        assert set(report["tasks_per_s"]) == {"glibc defaults", "keep_freed_memory"} and report["ratio"] > 0
    assert "preset cpu" in capsys.readouterr().out


@needs_omniglot
def test_reproduce_omniglot_writes_a_run(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("MMTL_DATA", str(DATA))
    out = tmp_path / "omniglot.json"
    bench("reproduce_omniglot").main(["--presets", "cpu", "--time-budget", "1", "--tasks", "5", "--device", "cpu",
                                      "--out", str(out)])
    (run,) = json.loads(out.read_text())["runs"]
    assert run["preset"] == "cpu" and run["iterations"] > 0 and 0 <= run["accuracy"] <= 1
    assert run["test_inner_steps"] == 3 and run["hardware"] == ml.machine(torch.device("cpu"))


@needs_omniglot
def test_reproduce_omniglot_records_the_validation_curve_and_time_to_target(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("MMTL_DATA", str(DATA))
    module = bench("reproduce_omniglot")
    monkeypatch.setitem(module.PAPER, "cpu", 1.0)  # a target of 1%
    out = tmp_path / "omniglot.json"
    module.main(["--presets", "cpu", "--time-budget", "1", "--tasks", "5", "--device", "cpu", "--val-every", "2",
                 "--val-tasks", "3", "--out", str(out)])
    (run,) = json.loads(out.read_text())["runs"]
    validation = run["validation"]
    assert validation["target"] == 0.01 and validation["every"] == 2 and validation["tasks"] == 3
    assert validation["curve"] and all(0 <= accuracy <= 1 for _, _, accuracy in validation["curve"])
    # a 5-way classifier scores far above 1% from the start: the first validation is the one recorded
    first_iteration, first_seconds, _ = validation["curve"][0]
    assert (validation["iteration_at_target"], validation["seconds_to_target"]) == (first_iteration, first_seconds)


def test_time_to_target_reads_the_first_validation_at_or_above_it(bench):
    history = [{"iteration": 50, "seconds": 1.0, "loss": 1.0}, {"iteration": 100, "seconds": 2.0, "val_metric": 0.5},
               {"iteration": 200, "seconds": 4.0, "val_metric": 0.9}, {"iteration": 300, "seconds": 6.0,
                                                                        "val_metric": 0.95}]
    time_to_target = bench("reproduce_omniglot").time_to_target
    assert time_to_target(history, 0.9) == (4.0, 200)
    assert time_to_target(history, 0.99) == (None, None)
    assert time_to_target(history, None) == (None, None)
