"""The trainer, checkpoints and the command line."""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mmtl_lib as ml
from mmtl_lib import experiment
from mmtl_lib.__main__ import main
from mmtl_lib.train import NonFiniteLossError, Trainer, evaluate_learner, load_checkpoint

DATA = Path(os.environ.get("MMTL_DATA", Path(__file__).resolve().parents[2] / "shared/data/omniglot"))
needs_omniglot = pytest.mark.skipif(not (DATA / "omniglot-py").is_dir(), reason=f"no Omniglot at {DATA}")


def sinusoid_trainer(seed=0, init_seed=0):
    torch.manual_seed(init_seed)
    learner = ml.MAML(ml.MLP(1, (16,), 1), F.mse_loss, inner_lr=0.01, steps=1, backend="vmap")
    sampler = experiment.SinusoidSampler(5, 5)
    return Trainer(learner, sampler.sample, meta_batch_size=4, outer_lr=1e-3, val_sample=sampler.sample,
                   val_every=4, val_tasks=8, metric=F.mse_loss, seed=seed)


def test_resumed_training_continues_identically(tmp_path):
    straight = sinusoid_trainer()
    straight.fit(10, log_every=5, progress=False)
    first = sinusoid_trainer()
    first.fit(5, checkpoint=tmp_path / "ckpt.pt", checkpoint_every=5, log_every=5, progress=False)
    resumed = sinusoid_trainer(seed=99, init_seed=99)  # different state until loaded
    resumed.load_state_dict(load_checkpoint(tmp_path / "ckpt.pt"))
    resumed.fit(10, log_every=5, progress=False)
    for a, b in zip(straight.learner.meta_parameters(), resumed.learner.meta_parameters()):
        assert torch.equal(a, b)
    assert [r["loss"] for r in straight.history] == [r["loss"] for r in resumed.history]
    assert json.loads((tmp_path / "history.json").read_text())[0]["iteration"] == 5


def test_history_records_validation_and_time():
    trainer = sinusoid_trainer()
    history = trainer.fit(8, log_every=4, progress=False)
    assert [r["iteration"] for r in history] == [4, 8]
    assert all("val_metric" in r and r["seconds"] >= 0 for r in history)


def test_time_budget_stops_training():
    trainer = sinusoid_trainer()
    trainer.fit(100_000, time_budget=0.5, progress=False)
    assert 0 < trainer.iteration < 100_000


def test_non_finite_loss_stops_with_the_iteration_named():
    torch.manual_seed(0)
    learner = ml.MAML(ml.MLP(1, (16,), 1), F.mse_loss, inner_lr=1e6, steps=3)
    trainer = Trainer(learner, experiment.SinusoidSampler(5, 5).sample, meta_batch_size=4, outer_lr=1.0)
    with pytest.raises(NonFiniteLossError, match=r"meta-loss is (nan|inf) at iteration \d+"):
        trainer.fit(50, progress=False)


def test_checkpoints_refuse_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be read"):
        load_checkpoint(tmp_path / "bad.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not an mmtl_lib checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_untrained_learner_scores_chance_before_adaptation():
    torch.manual_seed(0)
    model = ml.Conv4(5, filters=8, image_size=14)
    learner = ml.MAML(model, F.cross_entropy, inner_lr=0.4, steps=1)

    def sample(n, generator=None):
        x = torch.rand(n, 5 * 2, 1, 14, 14, generator=generator)
        y = torch.stack([torch.randperm(5, generator=generator).repeat_interleave(2) for _ in range(n)])
        return ml.TaskBatch((x[:, :5], y[:, ::2]), (x[:, 5:], y[:, 1::2]))

    result = evaluate_learner(learner, sample, tasks=300, metric=ml.accuracy)
    assert abs(result["pre_metric"] - 0.2) < 0.05


@pytest.mark.parametrize("argv, message", [
    (["train", "--preset", "nope"], "preset = 'nope' is not allowed"),
    (["train", "--preset", "sinusoid", "--set", "colour=red"], "--set colour: unknown key"),
    (["train", "--preset", "sinusoid", "--set", "steps"], "is not KEY=VALUE"),
    (["train", "--preset", "sinusoid", "--set", "steps=0"], "steps = 0 is not allowed"),
    (["train", "--preset", "sinusoid", "--set", "algorithm=mamal"], "algorithm = 'mamal' is not allowed"),
    (["evaluate", "missing.pt"], "checkpoint 'missing.pt' does not exist"),
])
def test_command_line_errors_exit_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_command_line_trains_and_evaluates_the_sinusoid(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--preset", "sinusoid", "--iterations", "20", "--out", str(out), "--quiet",
            "--set", "val_every=10", "--set", "val_tasks=10", "--set", "test_tasks=20"]
    assert main(argv) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["iterations"] == 20 and trained["tasks"] == 20
    assert main(["evaluate", str(out / "checkpoint.pt"), "--tasks", "30", "--seed", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"mse", "ci95", "n_way", "k_shot", "tasks"} <= set(result) and result["tasks"] == 30
    assert main(["evaluate", str(out / "checkpoint.pt"), "--tasks", "0"]) == 2


def test_presets_follow_the_papers():
    maml = experiment.preset("maml-20w1s")
    assert (maml["inner_lr"], maml["steps"], maml["meta_batch_size"], maml["iterations"]) == (0.1, 5, 16, 60_000)
    assert experiment.preset("maml-5w5s")["inner_lr"] == 0.4 and experiment.preset("maml-5w1s")["test_steps"] == 3
    with pytest.raises(ValueError, match=r"unknown configuration keys \['lr'\]"):
        experiment.preset("cpu", lr=0.1)


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


def test_schedule_anneals_over_the_time_budget():
    trainer = sinusoid_trainer()
    trainer.schedule, trainer.final_lr_fraction = "cosine", 0.1
    trainer.fit(10**6, time_budget=0.5, progress=False)
    lr = trainer.optimizer.param_groups[0]["lr"]
    assert trainer.iteration < 10**6 and lr < 0.2 * trainer.outer_lr


def test_build_trainer_runs_the_configured_outer_loop():
    config = experiment.preset("sinusoid", schedule="cosine", final_lr_fraction=0.1, optimizer="sgd", outer_lr=0.5)
    samplers = experiment.samplers(config, torch.device("cpu"))
    learner = experiment.build_learner(config, torch.device("cpu"))
    trainer = experiment.build_trainer(config, learner, samplers)
    assert isinstance(trainer.optimizer, torch.optim.SGD) and trainer.val_sample == samplers["val"].sample
    assert (trainer.schedule, trainer.final_lr_fraction, trainer.outer_lr) == ("cosine", 0.1, 0.5)
    assert experiment.build_trainer(config, learner, samplers, validate=False).val_sample is None


def test_train_shots_and_queries_size_training_tasks_only():
    config = experiment.preset("sinusoid", k_shot=5, n_query=7, train_k_shot=3, train_n_query=2)
    samplers = experiment.samplers(config, torch.device("cpu"))
    train, test = samplers["train"].sample(4), samplers["test"].sample(4)
    assert train.support[0].shape[1] == 3 and train.query[0].shape[1] == 2
    assert test.support[0].shape[1] == 5 and test.query[0].shape[1] == 7
    with pytest.raises(ValueError, match="train_n_query"):
        experiment.preset("cpu", train_n_query=0)
    with pytest.raises(ValueError, match="head_init"):
        experiment.preset("cpu", head_init="ones")


def test_keep_freed_memory_applies_on_linux_glibc():
    import platform

    from mmtl_lib.runtime import keep_freed_memory

    applied = keep_freed_memory()
    assert applied == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")


@needs_omniglot
def test_cpu_budget_benchmark_trains_scores_and_reports(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setenv("MMTL_DATA", str(DATA))
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import cpu_budget

    out = tmp_path / "budget.json"
    rows = cpu_budget.main(["--budget", "1", "--tasks", "5", "--only", "cpu", "--json", str(out)])
    assert rows[0]["iterations"] > 0 and 0 <= rows[0]["accuracy"] <= 1
    assert json.loads(out.read_text())["runs"][0]["name"] == "cpu"
    with pytest.raises(SystemExit):
        cpu_budget.main(["--only", "cpu,fastest"])
    assert "'fastest'" in capsys.readouterr().err
    sys.modules.pop("cpu_budget")
