"""The trainer and its checkpoints: exact resumption, history, budgets, schedules, clipping, scoped
precision, no global side effects, and bad settings refused by name."""

import json
import platform

import pytest
import torch
import torch.nn.functional as F

import mmtl_lib as ml
from mmtl_lib.runtime import keep_freed_memory


def sinusoid_trainer(seed=0, init_seed=0, **kw):
    torch.manual_seed(init_seed)
    learner = ml.MAML(ml.MLP(1, (16,), 1), F.mse_loss, inner_lr=0.01, inner_steps=1, backend="vmap")
    sampler = ml.Sinusoid(5, 5)
    return ml.Trainer(learner, sampler, **{"meta_batch_size": 4, "outer_lr": 1e-3, "val_sampler": sampler,
                                           "val_every": 4, "val_tasks": 8, "metric": F.mse_loss, "seed": seed,
                                           **kw})


def reptile_trainer(seed=0, init_seed=0):
    torch.manual_seed(init_seed)
    learner = ml.Reptile(ml.MLP(1, (16,), 1), F.mse_loss, inner_lr=0.01, inner_steps=3,
                         inner_optimizer=ml.adam(betas=(0.0, 0.999)), inner_batch_size=4,
                         generator=ml.generator(init_seed))
    return ml.Trainer(learner, ml.Sinusoid(10, 5), meta_batch_size=3, outer_lr=0.5, optimizer="sgd", seed=seed)


def test_resumed_training_continues_identically(tmp_path):
    straight = sinusoid_trainer()
    straight.fit(10, log_every=5, progress=False)
    first = sinusoid_trainer()
    first.fit(5, checkpoint=tmp_path / "ckpt.pt", checkpoint_every=5, log_every=5, progress=False)
    resumed = sinusoid_trainer(seed=99, init_seed=99)  # different state until loaded
    resumed.load_state_dict(ml.load_checkpoint(tmp_path / "ckpt.pt"))
    resumed.fit(10, log_every=5, progress=False)
    for a, b in zip(straight.learner.meta_parameters(), resumed.learner.meta_parameters()):
        assert torch.equal(a, b)
    assert [r["loss"] for r in straight.history] == [r["loss"] for r in resumed.history]
    assert json.loads((tmp_path / "history.json").read_text())[0]["iteration"] == 5


def test_a_checkpoint_inside_a_log_window_resumes_the_same_history(tmp_path):
    # Saved at iteration 6 of windows of 4: the records of iterations 5 and 6 travel in the
    # checkpoint, so the resumed run logs iteration 8 as the mean of 5..8, like the straight one.
    straight = sinusoid_trainer()
    straight.fit(10, log_every=4, progress=False)
    first = sinusoid_trainer()
    step = first.step

    def crash_after_6():
        if first.iteration == 7:
            raise KeyboardInterrupt
        return step()

    first.step = crash_after_6
    with pytest.raises(KeyboardInterrupt):
        first.fit(10, checkpoint=tmp_path / "ckpt.pt", checkpoint_every=3, log_every=4, progress=False)
    state = ml.load_checkpoint(tmp_path / "ckpt.pt")
    assert state["iteration"] == 6 and [r["iteration"] for r in state["window"]] == [5, 6]
    resumed = sinusoid_trainer(seed=99, init_seed=99)
    resumed.load_state_dict(state)
    resumed.fit(10, log_every=4, progress=False)
    drop_time = [{k: v for k, v in r.items() if k != "seconds"} for r in straight.history]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in resumed.history] == drop_time
    assert [r["iteration"] for r in resumed.history] == [4, 8, 10]


def test_checkpoints_every_n_iterations_every_few_minutes_and_at_the_end(tmp_path, monkeypatch):
    saved = []
    save = ml.Trainer.save

    def spy(self, path, **extra):
        saved.append((self.iteration, extra))
        save(self, path, **extra)

    monkeypatch.setattr(ml.Trainer, "save", spy)
    trainer = sinusoid_trainer(val_sampler=None)
    trainer.fit(25, checkpoint=tmp_path / "ckpt.pt", checkpoint_every=10, checkpoint_extra={"note": "hi"},
                progress=False)
    assert saved == [(10, {"note": "hi"}), (20, {"note": "hi"}), (25, {"note": "hi"})]
    assert ml.load_checkpoint(tmp_path / "ckpt.pt")["note"] == "hi"
    saved.clear()
    # a fraction of a microsecond: every iteration is past it, whatever checkpoint_every says
    sinusoid_trainer(val_sampler=None).fit(3, checkpoint=tmp_path / "ckpt.pt", checkpoint_minutes=1e-9,
                                           progress=False)
    assert [i for i, _ in saved] == [1, 2, 3]
    assert not list(tmp_path.glob("*.tmp"))


def test_a_finished_run_does_not_train_further():
    trainer = sinusoid_trainer(val_sampler=None)
    trainer.fit(4, progress=False)
    history = list(trainer.history)
    assert trainer.fit(4, progress=False) == history and trainer.iteration == 4
    budgeted = sinusoid_trainer(val_sampler=None)
    budgeted.fit(10**6, time_budget=0.2, progress=False)
    done = budgeted.iteration
    budgeted.fit(10**6, time_budget=0.2, progress=False)
    assert budgeted.iteration == done


def test_resumed_reptile_with_mini_batches_continues_identically(tmp_path):
    # Reptile's mini-batches come from the learner's own generator: the checkpoint must carry it.
    straight = reptile_trainer()
    straight.fit(10, log_every=5, progress=False)
    first = reptile_trainer()
    first.fit(5, checkpoint=tmp_path / "ckpt.pt", checkpoint_every=5, log_every=5, progress=False)
    state = ml.load_checkpoint(tmp_path / "ckpt.pt")
    assert "generator" in state["learner"]
    resumed = reptile_trainer(seed=99, init_seed=99)
    resumed.load_state_dict(state)
    resumed.fit(10, log_every=5, progress=False)
    for a, b in zip(straight.learner.meta_parameters(), resumed.learner.meta_parameters()):
        assert torch.equal(a, b)
    assert [r["loss"] for r in straight.history] == [r["loss"] for r in resumed.history]
    # without the learner's generator the continuation differs: the test can fail
    del state["learner"]["generator"]
    forgetful = reptile_trainer(seed=99, init_seed=99)
    forgetful.load_state_dict(state)
    forgetful.fit(10, log_every=5, progress=False)
    assert not torch.equal(forgetful.learner.model.head.weight, straight.learner.model.head.weight)


def test_history_records_validation_and_time():
    trainer = sinusoid_trainer()
    history = trainer.fit(8, log_every=4, progress=False)
    assert [r["iteration"] for r in history] == [4, 8] and trainer.iterations == 8
    assert all("val_metric" in r and "val_ci95" in r and "metric" in r and r["seconds"] >= 0 for r in history)


def test_time_budget_stops_training():
    trainer = sinusoid_trainer()
    trainer.fit(100_000, time_budget=0.5, progress=False)
    assert 0 < trainer.iteration < 100_000


def test_schedule_anneals_over_the_time_budget():
    trainer = sinusoid_trainer(schedule="cosine", final_lr_fraction=0.1)
    trainer.fit(10**6, time_budget=0.5, progress=False)
    lr = trainer.optimizer.param_groups[0]["lr"]
    assert trainer.iteration < 10**6 and lr < 0.2 * trainer.outer_lr


@pytest.mark.parametrize("schedule, want", [("constant", 1.0), ("linear", 0.55), ("cosine", 0.55)])
def test_schedules_at_half_way(schedule, want):
    trainer = sinusoid_trainer(schedule=schedule, final_lr_fraction=0.1, val_sampler=None)
    trainer.fit(4, progress=False)
    trainer.iterations, trainer.iteration = 8, 4
    trainer.step()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(want * 1e-3)


def test_non_finite_loss_stops_with_the_iteration_named():
    torch.manual_seed(0)
    learner = ml.MAML(ml.MLP(1, (16,), 1), F.mse_loss, inner_lr=1e6, inner_steps=3)
    trainer = ml.Trainer(learner, ml.Sinusoid(5, 5), meta_batch_size=4, outer_lr=1.0)
    with pytest.raises(ml.NonFiniteLossError, match=r"meta-loss is (nan|inf) at iteration \d+") as error:
        trainer.fit(50, progress=False)
    assert isinstance(error.value, ml.ConfigError)


def test_a_failed_step_leaves_the_trainer_as_after_the_last_good_iteration(tmp_path):
    trainer = sinusoid_trainer(val_sampler=None)
    trainer.fit(3, progress=False)
    before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in trainer.state_dict().items()
              if k in ("generator", "iteration")}
    weights = [p.detach().clone() for p in trainer.learner.meta_parameters()]
    meta_backward = trainer.learner.meta_backward

    def nan_loss(tasks):
        losses, predictions = meta_backward(tasks)
        return losses * float("nan"), predictions

    trainer.learner.meta_backward = nan_loss
    with pytest.raises(ml.NonFiniteLossError, match=r"at iteration 3: .*; the last good state \(iteration 3\) "
                                                     r"is saved in .*ckpt\.pt"):
        trainer.fit(10, checkpoint=tmp_path / "ckpt.pt", progress=False)
    assert trainer.iteration == before["iteration"] and torch.equal(trainer.generator.get_state(), before["generator"])
    assert all(torch.equal(p, w) for p, w in zip(trainer.learner.meta_parameters(), weights))
    state = ml.load_checkpoint(tmp_path / "ckpt.pt")
    assert state["iteration"] == 3 and torch.equal(state["generator"], before["generator"])
    # without a checkpoint path nothing is written and the message says nothing of one
    with pytest.raises(ml.NonFiniteLossError) as error:
        trainer.fit(10, progress=False)
    assert "saved" not in str(error.value)


def test_outer_grad_clip_bounds_the_meta_step():
    # float64 and SGD: the step is outer_lr times the clipped meta-gradient, whose norm is the clip
    # (up to clip_grad_norm_'s 1e-6 added to the norm).
    def moved(outer_grad_clip):
        torch.manual_seed(0)
        learner = ml.MAML(ml.MLP(1, (16,), 1).double(), F.mse_loss, inner_lr=0.01, inner_steps=1)
        trainer = ml.Trainer(learner, ml.Sinusoid(5, 5, dtype=torch.float64), meta_batch_size=4, outer_lr=0.1,
                             optimizer="sgd", outer_grad_clip=outer_grad_clip)
        before = [p.detach().clone() for p in learner.meta_parameters()]
        trainer.step()
        return torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(learner.meta_parameters(), before))).item()

    assert moved(1e-4) == pytest.approx(0.1 * 1e-4, rel=1e-6)
    assert moved(None) > 10 * 0.1 * 1e-4


def test_checkpoints_refuse_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ml.DataError, match="does not exist"):
        ml.load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ml.DataError, match="could not be read"):
        ml.load_checkpoint(tmp_path / "bad.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(ml.DataError, match="not an mmtl_lib checkpoint"):
        ml.load_checkpoint(tmp_path / "foreign.pt")
    sinusoid_trainer().save(tmp_path / "ckpt.pt")
    state = ml.load_checkpoint(tmp_path / "ckpt.pt")
    del state["window"]  # as written before checkpoints carried the open log window
    torch.save(state, tmp_path / "old.pt")
    with pytest.raises(ml.DataError, match=r"not an mmtl_lib checkpoint of this version: it lacks \['window'\]"):
        ml.load_checkpoint(tmp_path / "old.pt")


def test_trainer_and_build_learner_leave_the_global_random_state_alone():
    state = torch.get_rng_state()
    config = ml.preset("sinusoid")
    learner = ml.build_learner(config, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), state)
    trainer = ml.build_trainer(config, learner, ml.samplers(config, torch.device("cpu")))
    assert torch.equal(torch.get_rng_state(), state)
    trainer.fit(2, progress=False)
    trainer.validate()
    assert torch.equal(torch.get_rng_state(), state)
    # the seed still decides the model: the same config gives the same weights whatever the global state
    torch.manual_seed(123)
    again = ml.build_learner(config, torch.device("cpu"))
    other = ml.build_learner(config.replace(seed=1), torch.device("cpu"))
    fresh = ml.build_learner(config, torch.device("cpu"))
    assert torch.equal(again.model.head.weight, fresh.model.head.weight)
    assert not torch.equal(other.model.head.weight, fresh.model.head.weight)


@pytest.mark.parametrize("tf32", [True, False])
def test_tf32_is_allowed_inside_the_training_step_only(tf32):
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = matmul.allow_tf32, cudnn.allow_tf32
    try:
        matmul.allow_tf32 = cudnn.allow_tf32 = False
        trainer = sinusoid_trainer(tf32=tf32, val_sampler=None)
        seen = []
        meta_backward = trainer.learner.meta_backward

        def spy(tasks):
            seen.append((matmul.allow_tf32, cudnn.allow_tf32))
            return meta_backward(tasks)

        trainer.learner.meta_backward = spy
        trainer.step()
        assert seen == [(tf32, tf32)]
        assert (matmul.allow_tf32, cudnn.allow_tf32) == (False, False)
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved


def test_tf32_flags_are_restored_when_the_step_fails():
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        trainer = sinusoid_trainer(tf32=True, val_sampler=None)

        def fail(tasks):
            raise RuntimeError("inside the step")

        trainer.learner.meta_backward = fail
        with pytest.raises(RuntimeError, match="inside the step"):
            trainer.step()
        assert matmul.allow_tf32 is False
    finally:
        matmul.allow_tf32 = saved


@pytest.mark.parametrize("kw, match", [
    (dict(meta_batch_size=0), r"meta_batch_size = 0 is not allowed"),
    (dict(outer_lr=0), r"outer_lr = 0 is not allowed"),
    (dict(outer_lr=float("inf")), r"outer_lr = inf is not allowed"),
    (dict(optimizer="sgdd"), r"optimizer = 'sgdd' is not allowed"),
    (dict(schedule="sometimes"), r"schedule = 'sometimes' is not allowed"),
    (dict(final_lr_fraction=1.5), r"final_lr_fraction = 1.5 is not allowed"),
    (dict(final_lr_fraction=-0.1), r"final_lr_fraction = -0.1 is not allowed"),
    (dict(val_every=0), r"val_every = 0 is not allowed"),
    (dict(val_tasks=0), r"val_tasks = 0 is not allowed"),
    (dict(seed=-1), r"seed = -1 is not allowed"),
    (dict(outer_grad_clip=0), r"outer_grad_clip = 0 is not allowed"),
    (dict(val_sampler=ml.Sinusoid(5, 5).sample), r"val_sampler = method is not allowed"),
])
def test_trainer_refuses_bad_settings_by_name(kw, match):
    with pytest.raises(ml.ConfigError, match=match):
        sinusoid_trainer(**kw)


def test_trainer_refuses_what_it_cannot_train():
    with pytest.raises(ml.ConfigError, match=r"sampler = method is not allowed"):
        ml.Trainer(sinusoid_trainer().learner, ml.Sinusoid(5, 5).sample, meta_batch_size=2, outer_lr=0.1)
    scratch = ml.Scratch(ml.MLP(1, (8,), 1), F.mse_loss, inner_lr=0.01, test_inner_steps=1)
    with pytest.raises(ml.ConfigError, match="Scratch has no meta-parameters"):
        ml.Trainer(scratch, ml.Sinusoid(5, 5), meta_batch_size=2, outer_lr=0.1)
    with pytest.raises(ml.ConfigError, match="learner = MLP is not allowed"):
        ml.Trainer(ml.MLP(), ml.Sinusoid(5, 5), meta_batch_size=2, outer_lr=0.1)
    trainer = sinusoid_trainer()
    for kw, match in ((dict(iterations=0), "iterations = 0"), (dict(iterations=5, time_budget=0), "time_budget = 0"),
                      (dict(iterations=5, log_every=0), "log_every = 0")):
        with pytest.raises(ml.ConfigError, match=match):
            trainer.fit(progress=False, **kw)
    assert trainer.iteration == 0


def test_keep_freed_memory_applies_on_linux_glibc():
    applied = keep_freed_memory()
    assert applied == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
