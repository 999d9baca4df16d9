"""Fault injection for training and checkpoints: a run killed with SIGKILL resumes to the result
of an uninterrupted one, bit for bit; a crash while saving keeps the previous checkpoint; a run
folder is not replaced silently; a resume with other settings or other data is refused, saying
what differs; a diverging or out-of-memory run stops in one line with its last good state saved;
a bad checkpoint (another version, no configuration, weights that do not fit, truncated, foreign)
is one line and status 2; and what the command line writes is strict JSON.

Each fault is injected for real where that is fast (a killed process, a truncated file, an
allocation the machine cannot make), and by a stand-in otherwise (a CUDA out-of-memory error)."""

import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import assert_identical

import mmtl_lib as ml
import mmtl_lib.config as configs
from mmtl_lib import data
from mmtl_lib.__main__ import main

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MMTL_DATA", REPO.parent / "shared/data/omniglot"))
needs_omniglot = pytest.mark.skipif(not (DATA / "omniglot-py").is_dir(), reason=f"no Omniglot at {DATA}")

# The sinusoid preset made small: a run of 60 iterations takes well under a second.
SMALL = ["--preset", "sinusoid", "--device", "cpu", "--quiet", "--set", "meta_batch_size=4",
         "--set", "val_every=40", "--set", "val_tasks=5", "--set", "test_tasks=5", "--set", "checkpoint_every=10"]


def one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def train(out, *extra, iterations=20) -> int:
    return main(["train", *SMALL, "--iterations", str(iterations), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run of the small sinusoid preset: its folder (read it, copy it, do not change it)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert train(out) == 0
    return out


# --- a killed run, a crash while saving ---------------------------------------------------------------------

def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_result_bit_for_bit(tmp_path, capsys):
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    argv = ["train", *SMALL, "--iterations", "60"]
    # `python -m mmtl_lib train`, each meta-iteration 10 ms slower (a sleep changes no number), so
    # that it is surely still training when its first checkpoint appears and the kill comes.
    slowed = ("import runpy, time, mmtl_lib.train as t; step = t.Trainer.step; "
              "t.Trainer.step = lambda self: (time.sleep(0.01), step(self))[1]; "
              "runpy.run_module('mmtl_lib', run_name='__main__')")
    env = {**os.environ, "MMTL_THREADS": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", slowed, *argv, "--out", str(killed)], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoint.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, stderr.decode()
    at = ml.load_checkpoint(killed / "checkpoint.pt")["iteration"]
    assert 10 <= at < 60 and not (killed / "result.json").exists()

    assert main([*argv, "--out", str(killed), "--resume"]) == 0
    assert main([*argv, "--out", str(straight)]) == 0
    capsys.readouterr()
    resumed, uninterrupted = (ml.load_checkpoint(out / "checkpoint.pt") for out in (killed, straight))
    assert resumed["iteration"] == 60
    assert_identical(resumed, uninterrupted)  # weights, optimizer, generator, history (its open window too)
    assert_identical(*(json.loads((out / "history.json").read_text()) for out in (killed, straight)))
    results = [json.loads((out / "result.json").read_text()) for out in (killed, straight)]
    assert_identical(*({**result, "checkpoint": None} for result in results))


def test_a_crash_while_saving_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    trainer = ml.build_trainer(ml.preset("sinusoid", meta_batch_size=4), *_sinusoid_parts(), validate=False)
    trainer.fit(2, checkpoint=tmp_path / "checkpoint.pt", progress=False)
    saved = (tmp_path / "checkpoint.pt").read_bytes(), (tmp_path / "history.json").read_bytes()

    def power_cut(fd):
        raise OSError("the disk went away")

    monkeypatch.setattr(os, "fsync", power_cut)
    with pytest.raises(OSError, match="the disk went away"):
        trainer.fit(4, checkpoint=tmp_path / "checkpoint.pt", progress=False)
    assert ((tmp_path / "checkpoint.pt").read_bytes(), (tmp_path / "history.json").read_bytes()) == saved
    assert ml.load_checkpoint(tmp_path / "checkpoint.pt")["iteration"] == 2


def _sinusoid_parts():
    config = ml.preset("sinusoid", meta_batch_size=4)
    learner = ml.build_learner(config, torch.device("cpu"))
    return learner, ml.samplers(config, torch.device("cpu"))


# --- run folders --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("held", ["checkpoint.pt", "config.json"])
def test_a_new_run_into_a_folder_that_holds_one_is_refused_naming_it(trained, held, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / held).write_bytes((trained / held).read_bytes())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert train(out) == 2
    err = one_line_error(capsys)
    assert f"--out {str(out)!r} already holds a run: pass --resume to continue it, or --overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_overwrite_replaces_the_run_and_its_stale_files(trained, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("checkpoint.pt", "config.json", "history.json", "result.json"):
        (out / name).write_bytes((trained / name).read_bytes())
    assert train(out, "--overwrite", "--set", "seed=1", iterations=10) == 0
    result = json.loads(capsys.readouterr().out)
    assert json.loads((out / "result.json").read_text()) == result and result["iterations"] == 10
    assert ml.load_checkpoint(out / "checkpoint.pt")["config"]["seed"] == 1
    assert json.loads((out / "config.json").read_text())["seed"] == 1
    with pytest.raises(SystemExit) as exit_:  # argparse: the two flags exclude each other
        train(out, "--overwrite", "--resume")
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_resume_of_a_folder_without_a_checkpoint_is_refused(tmp_path, capsys):
    assert train(tmp_path / "empty", "--resume") == 2
    assert "checkpoint.pt' does not exist" in one_line_error(capsys)


def test_resume_with_other_settings_names_each_key_old_and_new(trained, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("checkpoint.pt", "config.json"):
        (out / name).write_bytes((trained / name).read_bytes())
    assert train(out, "--resume", "--set", "inner_lr=0.02", iterations=30) == 2
    err = one_line_error(capsys)
    assert "--resume:" in err and "was trained with another configuration: " in err
    assert "iterations 20 -> 30" in err and "inner_lr 0.01 -> 0.02" in err and "seed" not in err
    # when to checkpoint is not what is computed: it may change
    assert train(out, "--resume", "--set", "checkpoint_every=7") == 0


# --- divergence and memory ----------------------------------------------------------------------------------

def test_a_diverging_run_saves_its_last_good_state_and_exits_2_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    # inner_lr = 3e5 on this preset: the loss grows for a score of iterations (21 on the machine
    # this was written on), then overflows
    assert train(out, "--set", "inner_lr=3e5", iterations=60) == 2
    err = one_line_error(capsys)
    failed = re.search(r"meta-loss is (nan|inf) at iteration (\d+): lower outer_lr or inner_lr", err)
    assert failed, err
    at = int(failed[2])
    assert 10 < at < 60 and f"the last good state (iteration {at}) is saved in {out / 'checkpoint.pt'}" in err
    state = ml.load_checkpoint(out / "checkpoint.pt")
    assert state["iteration"] == at and all(t.isfinite().all() for t in state["learner"]["model"].values())
    assert json.loads((out / "history.json").read_text()) == state["history"]
    # it is that iteration's state exactly (task generator included): continued, it fails on the same draw
    config = configs.checkpoint_config(state, out / "checkpoint.pt")
    learner = ml.build_learner(config, torch.device("cpu"))
    trainer = ml.build_trainer(config, learner, ml.samplers(config, torch.device("cpu")))
    trainer.load_state_dict(state)
    with pytest.raises(ml.NonFiniteLossError, match=f"at iteration {at}:"):
        trainer.step()
    assert trainer.iteration == at
    assert main(["evaluate", str(out / "checkpoint.pt"), "--tasks", "5", "--device", "cpu"]) == 0


def test_a_meta_batch_the_cpu_cannot_allocate_is_a_config_error_naming_it(tmp_path, capsys):
    # 10^15 tasks: far beyond any address space, so the allocation fails at once, whatever the
    # machine's overcommit policy
    assert train(tmp_path / "run", "--set", f"meta_batch_size={10**15}") == 2
    err = one_line_error(capsys)
    assert f"meta_batch_size = {10**15} does not fit in memory at iteration 0" in err
    assert "can't allocate memory" in err and "lower meta_batch_size" in err


def test_cuda_out_of_memory_is_a_config_error_and_other_runtime_errors_pass(tmp_path, monkeypatch, capsys):
    def out_of_memory(self, tasks):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 96.00 GiB\n(more lines from torch)")

    monkeypatch.setattr(ml.MAML, "meta_backward", out_of_memory)
    assert train(tmp_path / "run", "--set", "meta_batch_size=4096") == 2
    err = one_line_error(capsys)
    assert "meta_batch_size = 4096 does not fit in memory at iteration 0 (CUDA out of memory. Tried" in err

    def bug(self, tasks):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(ml.MAML, "meta_backward", bug)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        train(tmp_path / "other", "--set", "meta_batch_size=4096")


@pytest.mark.parametrize("setting, message", [
    ("final_lr_fraction=-0.1", "final_lr_fraction = -0.1 is not allowed: it must lie in [0, 1]"),
    ("outer_grad_clip=-1", "outer_grad_clip = -1 is not allowed"),
    ("outer_grad_clip=0", "outer_grad_clip = 0 is not allowed"),
    ("amp=maybe", "amp = 'maybe' is not allowed"),
    ("inner_lr=1e999", "inner_lr = inf is not allowed"),
    ("seed=1.5", "seed = 1.5 is not allowed"),
    ("checkpoint_every=0", "checkpoint_every = 0 is not allowed"),
    ("checkpoint_minutes=0", "checkpoint_minutes = 0 is not allowed"),
])
def test_harmful_settings_are_refused_before_anything_is_written(setting, message, no_data, tmp_path, capsys):
    # once accepted: gradient ascent, a flipped or zeroed meta-gradient, a torch traceback
    assert train(tmp_path / "run", "--set", setting) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


# --- bad checkpoints ----------------------------------------------------------------------------------------

def _edit_config(**changes):
    def edit(state):
        for key, value in changes.items():
            if value is None:
                del state["config"][key]
            else:
                state["config"][key] = value
    return edit


def _other_weights(state):
    state["learner"]["model"] = ml.MLP(1, (16,), 1).state_dict()


BAD_CHECKPOINTS = [
    ("config lacks a key (an older version)", _edit_config(checkpoint_minutes=None),
     "was written by another version of mmtl_lib: its configuration lacks the keys ['checkpoint_minutes']; "
     "train it again", True),
    ("config has an unknown key (a newer version)", _edit_config(colour="red"),
     "its configuration has the unknown keys ['colour']; train it again", True),
    ("config lacks one key and has another", _edit_config(checkpoint_minutes=None, colour="red"),
     "its configuration lacks the keys ['checkpoint_minutes'] and has the unknown keys ['colour']", True),
    ("config holds a value not allowed", _edit_config(inner_lr=-1.0),
     "holds a configuration that is not allowed: inner_lr = -1.0 is not allowed", True),
    ("no config (Trainer.save)", lambda state: state.pop("config"), "holds no configuration", True),
    ("no data identity", lambda state: state.pop("data"), "records no data identity", True),
    ("weights of another size", _other_weights,
     "holds weights that do not fit its configuration (RuntimeError: Error(s) in loading state_dict", True),
    ("config of another algorithm", _edit_config(algorithm="metasgd"),
     "holds weights that do not fit its configuration (KeyError: 'inner_lrs')", False),
    ("not a trainer's state", lambda state: state.pop("optimizer"),
     "is not an mmtl_lib checkpoint of this version: it lacks ['optimizer']", True),
]


@pytest.mark.parametrize("fault, edit, message, resumable", BAD_CHECKPOINTS, ids=[b[0] for b in BAD_CHECKPOINTS])
def test_a_bad_checkpoint_is_one_line_and_status_2(trained, fault, edit, message, resumable, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    state = ml.load_checkpoint(trained / "checkpoint.pt")
    edit(state)
    torch.save(state, out / "checkpoint.pt")
    assert main(["evaluate", str(out / "checkpoint.pt"), "--tasks", "5"]) == 2
    assert message in one_line_error(capsys)
    if resumable:  # a fault that --resume sees as such (another algorithm is a configuration that differs)
        assert train(out, "--resume") == 2
        assert message in one_line_error(capsys)


@pytest.mark.parametrize("fault", ["truncated", "empty", "text", "foreign"])
def test_an_unreadable_or_foreign_file_is_one_line_and_status_2(trained, fault, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    whole = (trained / "checkpoint.pt").read_bytes()
    path = out / "checkpoint.pt"
    if fault == "foreign":
        torch.save({"weights": torch.zeros(2)}, path)
    else:
        path.write_bytes({"truncated": whole[: len(whole) // 2], "empty": b"", "text": b"no checkpoint"}[fault])
    message = "is not an mmtl_lib checkpoint" if fault == "foreign" else "could not be read"
    assert main(["evaluate", str(path)]) == 2
    assert message in one_line_error(capsys)
    assert train(out, "--resume") == 2
    assert message in one_line_error(capsys)


# --- data that is not what the checkpoint was trained on ----------------------------------------------------

def test_other_sinusoid_tasks_are_refused_on_evaluate_and_resume(trained, tmp_path, monkeypatch, capsys):
    build = configs.samplers

    def narrower(config, device):
        samplers = build(config, device)
        samplers["test"] = ml.Sinusoid(config.k_shot, config.n_query, amplitude=(0.1, 4.0), device=device)
        return samplers

    monkeypatch.setattr(configs, "samplers", narrower)
    assert main(["evaluate", str(trained / "checkpoint.pt")]) == 2
    expected = ("the test data differ from those it was trained with: amplitude [0.1, 5.0] (checkpoint) "
                "vs [0.1, 4.0] (now)")
    assert expected in one_line_error(capsys)
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes((trained / "checkpoint.pt").read_bytes())
    assert train(out, "--resume") == 2
    assert expected in one_line_error(capsys)


@needs_omniglot
def test_an_alphabet_missing_from_the_data_folder_is_refused_on_evaluate_and_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MMTL_DATA", str(DATA))
    # read once: each of train, evaluate and resume would load it three times (train, val, test)
    load = functools.cache(data.load_omniglot)
    monkeypatch.setattr(data, "load_omniglot", load)
    out = tmp_path / "run"
    argv = ["train", "--preset", "cpu", "--device", "cpu", "--iterations", "1", "--out", str(out), "--quiet",
            "--set", "filters=4", "--set", "meta_batch_size=1", "--set", "val_tasks=2", "--set", "test_tasks=2"]
    assert main(argv) == 0
    capsys.readouterr()

    def without_one_alphabet(*args, **kwargs):  # as if its folder had been deleted
        full = load(*args, **kwargs)
        keep = [i for i, name in enumerate(full.characters) if not name.startswith("Braille/")]
        return data.OmniglotImages(full.images[keep], tuple(full.characters[i] for i in keep),
                                   sum(i < full.n_background for i in keep))

    monkeypatch.setattr(data, "load_omniglot", without_one_alphabet)
    assert main(["evaluate", str(out / "checkpoint.pt"), "--tasks", "2", "--device", "cpu"]) == 2
    err = one_line_error(capsys)
    assert "the train data differ from those it was trained with: classes_sha256 '" in err
    assert "the test data differ from those it was trained with: n_classes 423 (checkpoint) vs 397 (now), " \
        "classes_sha256 '" in err
    assert main([*argv, "--resume"]) == 2
    assert "the test data differ" in one_line_error(capsys)


# --- strict JSON --------------------------------------------------------------------------------------------

def strict_json(text: str):
    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_one_test_task_writes_strict_json_with_a_null_interval(trained, tmp_path, capsys):
    assert main(["evaluate", str(trained / "checkpoint.pt"), "--tasks", "1"]) == 0
    result = strict_json(capsys.readouterr().out)
    assert result["tasks"] == 1 and result["ci95"] is None and result["mse"] > 0
    out = tmp_path / "run"
    assert train(out, "--set", "test_tasks=1", "--set", "val_tasks=1", iterations=5) == 0
    assert strict_json(capsys.readouterr().out)["ci95"] is None
    assert strict_json((out / "result.json").read_text())["ci95"] is None
    assert strict_json((out / "history.json").read_text())[-1]["val_ci95"] is None
