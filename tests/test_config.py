"""The configuration: every bad field refused by name before any data is read, the papers'
presets, round trips, and the builders."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

import mmtl_lib as ml
from mmtl_lib import config as configs


def test_the_guard_catches_a_read(no_data):
    # the proof below is only as good as the guard: a valid configuration does reach the loader
    with pytest.raises(pytest.fail.Exception, match="Omniglot was read"):
        ml.samplers(ml.preset("cpu"), torch.device("cpu"))


BAD = [
    (dict(backend="warp"), r"backend = 'warp' is not allowed"),
    (dict(outer_optimizer="sgdd"), r"outer_optimizer = 'sgdd' is not allowed"),
    (dict(schedule="sometimes"), r"schedule = 'sometimes' is not allowed"),
    (dict(inner_optimizer="lbfgs"), r"inner_optimizer = 'lbfgs' is not allowed"),
    (dict(amp="perhaps"), r"amp = 'perhaps' is not allowed"),
    (dict(tf32="yes"), r"tf32 = 'yes' is not allowed"),
    (dict(split="bogus"), r"split = 'bogus' is not allowed"),
    (dict(rotation="maybe"), r"rotation = 'maybe' is not allowed"),
    (dict(n_way=0), r"n_way = 0 is not allowed"),
    (dict(seed=1.5), r"seed = 1.5 is not allowed"),
    (dict(seed=-1), r"seed = -1 is not allowed"),
    (dict(final_lr_fraction=-0.1), r"final_lr_fraction = -0.1 is not allowed"),
    (dict(final_lr_fraction=1.5), r"final_lr_fraction = 1.5 is not allowed"),
    (dict(inner_lr=float("inf")), r"inner_lr = inf is not allowed"),
    (dict(outer_grad_clip=0), r"outer_grad_clip = 0 is not allowed"),
    (dict(outer_grad_clip=-1), r"outer_grad_clip = -1 is not allowed"),
    (dict(time_budget=0), r"time_budget = 0 is not allowed"),
    (dict(k_shot=10, n_query=15), r"k_shot \+ n_query = 25 exceeds the 20 drawers .*k_shot = 10, n_query = 15"),
    (dict(train_n_query=0), r"train_n_query = 0 is not allowed"),
    (dict(head_init="ones"), r"head_init = 'ones' is not allowed"),
    (dict(inner_steps=0), r"inner_steps = 0 is not allowed"),
    (dict(algorithm="mamal"), r"algorithm = 'mamal' is not allowed"),
    (dict(task="imagenet"), r"task = 'imagenet' is not allowed"),
    (dict(iterations=True), r"iterations = True is not allowed"),
    (dict(checkpoint_every=0), r"checkpoint_every = 0 is not allowed"),
    (dict(checkpoint_every=2.5), r"checkpoint_every = 2.5 is not allowed"),
    (dict(checkpoint_minutes=0), r"checkpoint_minutes = 0 is not allowed"),
    (dict(checkpoint_minutes=float("nan")), r"checkpoint_minutes = nan is not allowed"),
    (dict(amp="maybe"), r"amp = 'maybe' is not allowed"),
    (dict(outer_grad_clip=float("nan")), r"outer_grad_clip = nan is not allowed"),
]


@pytest.mark.parametrize("kw, match", BAD)
def test_config_refuses_each_bad_field_by_name_before_data_is_read(kw, match, no_data):
    with pytest.raises(ml.ConfigError, match=match):
        ml.Config(**kw)


@pytest.mark.parametrize("kw, match", BAD)
def test_preset_refuses_each_bad_override_by_name_before_data_is_read(kw, match, no_data):
    with pytest.raises(ml.ConfigError, match=match):
        ml.preset("cpu", **kw)
    with pytest.raises(ml.ConfigError, match=match):
        ml.preset("maml-5w1s").replace(**kw)


IGNORED = [
    ("maml-5w1s", dict(inner_batch_size=10), r"inner_batch_size \(used by reptile, not maml\)"),
    ("reptile-5w1s", dict(backend="loop"), r"backend \(used by maml, fomaml, .*, protomaml, not reptile\)"),
    ("reptile-5w1s", dict(inner_grad_clip=1.0), r"inner_grad_clip \(used by .*, not reptile\)"),
    ("maml-5w1s", dict(backend="loop", chunk_size=4), r"chunk_size \(used by backend='vmap', not 'loop'\)"),
    ("sinusoid", dict(n_way=5), r"n_way \(used by the omniglot task, not sinusoid\)"),
    ("sinusoid", dict(rotation="none"), r"rotation \(used by the omniglot task, not sinusoid\)"),
    ("maml-5w1s", dict(algorithm="pretrain", inner_steps=3), r"inner_steps \(used by .*, not pretrain\)"),
]


@pytest.mark.parametrize("name, kw, match", IGNORED)
def test_preset_refuses_overrides_the_algorithm_would_ignore(name, kw, match, no_data):
    with pytest.raises(ml.ConfigError, match=r"these settings would be ignored: " + match):
        ml.preset(name, **kw)


def test_unknown_keys_and_presets_are_refused_by_name(no_data):
    with pytest.raises(ml.ConfigError, match=r"unknown configuration keys \['colour'\]"):
        ml.Config.from_dict({"colour": "red"})
    with pytest.raises(ml.ConfigError, match=r"unknown configuration keys \['lr'\]"):
        ml.preset("cpu", lr=0.1)
    with pytest.raises(ml.ConfigError, match=r"unknown configuration keys \['steps'\]"):  # the old name
        ml.preset("maml-5w1s").replace(steps=3)
    with pytest.raises(ml.ConfigError, match=r"preset = 'nope' is not allowed"):
        ml.preset("nope")
    with pytest.raises(ml.ConfigError, match=r"preset = 'nope' is not allowed"):
        ml.Config(preset="nope")


@pytest.mark.parametrize("name", list(configs.PRESETS))
def test_every_preset_is_a_valid_config_that_round_trips_and_builds_without_data(name, no_data, tmp_path):
    config = ml.preset(name)
    assert isinstance(config, ml.Config) and config.preset == name
    values = config.to_dict()
    assert ml.Config.from_dict(values) == config
    assert ml.Config.from_dict(json.loads(json.dumps(values))) == config
    torch.save({"config": values}, tmp_path / "c.pt")
    assert ml.Config.from_dict(torch.load(tmp_path / "c.pt", weights_only=True)["config"]) == config
    learner = ml.build_learner(config, torch.device("cpu"))
    assert learner.name == config.algorithm
    assert learner.test_inner_steps == config.test_inner_steps and learner.inner_lr == config.inner_lr
    assert config.describe() and config.metric() is (F.mse_loss if config.task == "sinusoid" else ml.accuracy)


def test_config_is_frozen_and_replace_makes_a_checked_copy():
    config = ml.preset("sinusoid")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.inner_lr = 0.1
    other = config.replace(inner_lr=0.1)
    assert (config.inner_lr, other.inner_lr) == (0.01, 0.1) and other.preset == "sinusoid"
    assert other.to_dict() == {**config.to_dict(), "inner_lr": 0.1}


def test_presets_follow_the_papers():
    maml = ml.preset("maml-20w1s")
    assert (maml.inner_lr, maml.inner_steps, maml.meta_batch_size, maml.iterations) == (0.1, 5, 16, 60_000)
    assert ml.preset("maml-5w5s").inner_lr == 0.4 and ml.preset("maml-5w1s").test_inner_steps == 3
    reptile = ml.preset("reptile-5w1s")
    assert (reptile.inner_optimizer, reptile.inner_lr, reptile.inner_steps, reptile.inner_batch_size) == \
        ("adam", 1e-3, 5, 10)
    assert (reptile.outer_lr, reptile.outer_optimizer, reptile.schedule, reptile.test_inner_steps) == \
        (1.0, "sgd", "linear", 50)
    sine = ml.preset("sinusoid")
    assert (sine.k_shot, sine.inner_lr, sine.inner_steps, sine.meta_batch_size) == (10, 0.01, 1, 25)


def test_every_preset_trains_a_fixed_number_of_iterations_not_seconds():
    # The book's rule: a run is a fixed number of iterations, the same on every machine; a time
    # budget is the command line's --time-budget, never a preset's.
    assert all(ml.preset(name).time_budget is None for name in configs.PRESETS)
    assert ml.preset("cpu").iterations == 6_800  # what benchmarks/cpu_budget.py's 5 minutes made
    assert ml.preset("cpu", time_budget=120).time_budget == 120.0


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "metasgd", "anil", "reptile"])
def test_build_learner_makes_the_configured_algorithm(algorithm):
    config = ml.preset("maml-5w1s").replace(algorithm=algorithm, inner_optimizer="adam")
    learner = ml.build_learner(config, torch.device("cpu"))
    assert learner.name == algorithm and learner.inner_optimizer.name == "adam"
    if algorithm == "reptile":
        assert isinstance(learner, ml.Reptile) and learner.generator is not None
    else:
        assert learner.backend == "vmap" and learner.first_order == (algorithm == "fomaml")


def test_build_learner_for_the_pretrain_baselines():
    joint = ml.build_learner(ml.preset("sinusoid", algorithm="pretrain"), torch.device("cpu"))
    assert isinstance(joint, ml.JointTraining)
    config = ml.preset("maml-5w1s", algorithm="pretrain")
    with pytest.raises(ml.ConfigError, match="n_classes"):
        ml.build_learner(config, torch.device("cpu"))
    pretrain = ml.build_learner(config, torch.device("cpu"), n_classes=30)
    assert isinstance(pretrain, ml.PretrainClassifier) and pretrain.pretrain_head.out_features == 30


def test_build_trainer_runs_the_configured_outer_loop():
    config = ml.preset("sinusoid", schedule="cosine", final_lr_fraction=0.1, outer_optimizer="sgd", outer_lr=0.5,
                       outer_grad_clip=2.0)
    samplers = ml.samplers(config, torch.device("cpu"))
    learner = ml.build_learner(config, torch.device("cpu"))
    trainer = ml.build_trainer(config, learner, samplers)
    assert isinstance(trainer.optimizer, torch.optim.SGD) and trainer.val_sampler is samplers["val"]
    assert (trainer.schedule, trainer.final_lr_fraction, trainer.outer_lr) == ("cosine", 0.1, 0.5)
    assert trainer.outer_grad_clip == 2.0 and trainer.metric is F.mse_loss
    assert ml.build_trainer(config, learner, samplers, validate=False).val_sampler is None


def test_train_shots_and_queries_size_training_tasks_only():
    config = ml.preset("sinusoid", k_shot=5, n_query=7, train_k_shot=3, train_n_query=2)
    samplers = ml.samplers(config, torch.device("cpu"))
    train, test = samplers["train"].sample(4), samplers["test"].sample(4)
    assert train.support[0].shape[1] == 3 and train.query[0].shape[1] == 2
    assert test.support[0].shape[1] == 5 and test.query[0].shape[1] == 7


def test_iterations_per_second():
    assert configs.iterations_per_second([{"iteration": 10, "seconds": 2.0}]) == 5.0
    assert configs.iterations_per_second([]) != configs.iterations_per_second([])  # NaN


def test_data_identity_records_each_sampler_in_plain_values():
    config = ml.preset("sinusoid", train_k_shot=5)
    identity = configs.data_identity(ml.samplers(config, torch.device("cpu")))
    assert identity["train"] == {"dataset": "sinusoid", "k_shot": 5, "n_query": 10, "amplitude": [0.1, 5.0],
                                 "phase": [0.0, pytest.approx(3.14159265)], "x_range": [-5.0, 5.0]}
    assert identity["test"]["k_shot"] == 10 and set(identity) == {"train", "val", "test"}
    assert json.loads(json.dumps(identity)) == identity


def test_data_identity_uses_the_episode_samplers_own(monkeypatch):
    images = torch.zeros(6, 20, 4, 4, dtype=torch.uint8)
    sampler = ml.EpisodeSampler(images, torch.arange(6), 2, 1, 1)
    assert configs.data_identity({"test": sampler}) == {"test": sampler.identity()}
    assert sampler.identity()["dataset"] == "omniglot"


def test_check_data_says_what_differs_per_subset():
    config = ml.preset("sinusoid")
    samplers = ml.samplers(config, torch.device("cpu"))
    state = {"data": configs.data_identity(samplers)}
    configs.check_data(state, samplers, "c.pt")  # the same data: nothing to say
    state["data"]["val"] = {**state["data"]["val"], "k_shot": 3, "retired": True}
    with pytest.raises(ml.DataError, match=r"checkpoint 'c.pt': the val data differ from those it was trained with: "
                                           r"k_shot 3 \(checkpoint\) vs 10 \(now\), retired True \(checkpoint\) "
                                           r"vs None \(now\)$"):
        configs.check_data(state, samplers, "c.pt")
