"""The command line: a user's mistake is one line and exit status 2, refused before any data is
read; a library bug is a traceback and exit status 1; training and evaluating work end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmtl_lib as ml
import mmtl_lib.config
from mmtl_lib.__main__ import main

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MMTL_DATA", REPO.parent / "shared/data/omniglot"))
needs_omniglot = pytest.mark.skipif(not (DATA / "omniglot-py").is_dir(), reason=f"no Omniglot at {DATA}")


def one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert captured.out == ""
    return err


BAD_SETTINGS = [
    (["--set", "backend=warp"], "backend = 'warp' is not allowed"),
    (["--set", "outer_optimizer=sgdd"], "outer_optimizer = 'sgdd' is not allowed"),
    (["--set", "schedule=sometimes"], "schedule = 'sometimes' is not allowed"),
    (["--set", "inner_optimizer=lbfgs"], "inner_optimizer = 'lbfgs' is not allowed"),
    (["--set", "amp=perhaps"], "amp = 'perhaps' is not allowed"),
    (["--set", "tf32=yes"], "tf32 = 'yes' is not allowed"),
    (["--set", "split=bogus"], "split = 'bogus' is not allowed"),
    (["--set", "rotation=maybe"], "rotation = 'maybe' is not allowed"),
    (["--set", "n_way=0"], "n_way = 0 is not allowed"),
    (["--set", "seed=1.5"], "seed = 1.5 is not allowed"),
    (["--set", "seed=-1"], "seed = -1 is not allowed"),
    (["--seed", "-1"], "seed = -1 is not allowed"),
    (["--set", "final_lr_fraction=-0.1"], "final_lr_fraction = -0.1 is not allowed"),
    (["--set", "final_lr_fraction=1.5"], "final_lr_fraction = 1.5 is not allowed"),
    (["--set", "inner_lr=1e999"], "inner_lr = inf is not allowed"),
    (["--set", "outer_grad_clip=0"], "outer_grad_clip = 0 is not allowed"),
    (["--set", "outer_grad_clip=-1"], "outer_grad_clip = -1 is not allowed"),
    (["--set", "time_budget=0"], "time_budget = 0 is not allowed"),
    (["--set", "checkpoint_every=0"], "checkpoint_every = 0 is not allowed"),
    (["--set", "checkpoint_minutes=-1"], "checkpoint_minutes = -1 is not allowed"),
    (["--time-budget", "0"], "time_budget = 0.0 is not allowed"),
    (["--iterations", "0"], "iterations = 0 is not allowed"),
    (["--set", "k_shot=10", "--set", "n_query=15"], "k_shot + n_query = 25 exceeds the 20 drawers"),
    (["--set", "inner_steps=0"], "inner_steps = 0 is not allowed"),
    (["--set", "algorithm=mamal"], "algorithm = 'mamal' is not allowed"),
    (["--set", "colour=red"], "unknown configuration keys ['colour']"),
    (["--set", "inner_steps"], "--set 'inner_steps' is not KEY=VALUE"),
    (["--set", "inner_batch_size=10"], "these settings would be ignored: inner_batch_size (used by reptile, not maml)"),
    (["--set", "backend=loop", "--set", "chunk_size=4"],
     "these settings would be ignored: chunk_size (used by backend='vmap', not 'loop')"),
    (["--device", "nonsense"], "--device 'nonsense'"),
]


@pytest.mark.parametrize("extra, message", BAD_SETTINGS)
def test_bad_settings_exit_2_with_one_line_before_data_is_read(extra, message, no_data, tmp_path, capsys):
    assert main(["train", "--preset", "cpu", "--out", str(tmp_path / "run"), "--quiet", *extra]) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, message", [
    (["train", "--preset", "nope"], "preset = 'nope' is not allowed"),
    (["train", "--preset", "reptile-5w1s", "--set", "backend=loop"],
     "backend (used by maml, fomaml, metasgd, anil, maml++, protomaml, not reptile)"),
    (["train", "--preset", "sinusoid", "--set", "n_way=5"], "n_way (used by the omniglot task, not sinusoid)"),
    (["evaluate", "missing.pt"], "checkpoint 'missing.pt' does not exist"),
])
def test_command_line_errors_exit_2_with_one_line(argv, message, no_data, capsys):
    assert main(argv) == 2
    assert message in one_line_error(capsys)


def test_corrupt_and_foreign_checkpoints_exit_2(tmp_path, capsys):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    assert main(["evaluate", str(tmp_path / "bad.pt")]) == 2
    assert "could not be read" in one_line_error(capsys)
    torch.save({"learner": {}}, tmp_path / "foreign.pt")
    assert main(["evaluate", str(tmp_path / "foreign.pt")]) == 2
    assert "is not an mmtl_lib checkpoint" in one_line_error(capsys)


def test_command_line_trains_and_evaluates_the_sinusoid(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--preset", "sinusoid", "--iterations", "20", "--out", str(out), "--quiet",
            "--set", "val_every=10", "--set", "val_tasks=10", "--set", "test_tasks=20"]
    assert main(argv) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["iterations"] == 20 and trained["tasks"] == 20 and trained["inner_steps"] == 10
    assert json.loads((out / "config.json").read_text()) == {
        **ml.preset("sinusoid", iterations=20, val_every=10, val_tasks=10, test_tasks=20).to_dict(), "world_size": 1}
    assert json.loads((out / "result.json").read_text()) == trained
    assert main(["evaluate", str(out / "checkpoint.pt"), "--tasks", "30", "--seed", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"mse", "ci95", "pre_adaptation_mse", "n_way", "k_shot", "tasks", "inner_steps"} <= set(result)
    assert result["tasks"] == 30 and result["seed"] == 3
    assert main(["evaluate", str(out / "checkpoint.pt"), "--tasks", "30", "--seed", "3", "--inner-steps", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["inner_steps"] == 2
    assert main(["evaluate", str(out / "checkpoint.pt"), "--tasks", "0"]) == 2
    assert "tasks = 0 is not allowed" in one_line_error(capsys)
    # resuming under another configuration is refused
    assert main([*argv, "--resume", "--set", "inner_lr=0.02"]) == 2
    assert "--resume" in one_line_error(capsys)


def test_presets_lists_every_preset(capsys):
    assert main(["presets"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert list(listed) == list(mmtl_lib.config.PRESETS) and listed["sinusoid"] == "maml sinusoid K=10"


def test_a_user_error_raised_after_validation_is_still_one_line(monkeypatch, tmp_path, capsys):
    def refuse(*args, **kwargs):
        raise ml.ConfigError("boom")

    monkeypatch.setattr(mmtl_lib.config, "build_learner", refuse)
    argv = ["train", "--preset", "sinusoid", "--iterations", "1", "--out", str(tmp_path), "--quiet"]
    assert main(argv) == 2
    assert one_line_error(capsys) == "error: boom\n"
    # a plain ValueError is not the user's: it goes through
    monkeypatch.setattr(mmtl_lib.config, "build_learner", lambda *a, **k: int("boom"))
    with pytest.raises(ValueError, match="boom"):
        main(argv)


def test_a_library_bug_exits_1_with_its_traceback(tmp_path):
    code = f"""
import sys

import mmtl_lib.config
from mmtl_lib.__main__ import main


def broken(*args, **kwargs):
    raise ValueError("boom")


mmtl_lib.config.build_learner = broken
sys.exit(main(["train", "--preset", "sinusoid", "--iterations", "1", "--out", {str(tmp_path)!r}, "--quiet"]))
"""
    env = {**os.environ, "MMTL_THREADS": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=300)
    assert done.returncode == 1, done.stderr
    assert "Traceback" in done.stderr and "ValueError: boom" in done.stderr
    assert "error: boom" not in done.stderr


@needs_omniglot
def test_short_cpu_training_run_is_well_above_chance(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MMTL_DATA", str(DATA))
    argv = ["train", "--preset", "cpu", "--iterations", "150", "--out", str(tmp_path), "--quiet",
            "--set", "filters=16", "--set", "meta_batch_size=4", "--set", "val_every=1000",
            "--set", "val_tasks=20", "--set", "test_tasks=100"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert abs(result["pre_adaptation_accuracy"] - 0.2) < 0.06
    assert result["accuracy"] > 2 * 0.2  # twice chance after a few seconds of training
