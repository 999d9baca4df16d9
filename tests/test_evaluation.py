"""The evaluation: one adaptation per task scored after each step count, the same numbers by
either backend and from a sampler or by hand, 95% intervals, and bad input refused by name."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import conv4, double, image_tasks

import mmtl_lib as ml


def sine_maml(**kw):
    torch.manual_seed(0)
    return ml.MAML(ml.MLP(1, (8,), 1), F.mse_loss, **{"inner_lr": 0.01, "inner_steps": 2, **kw})


def test_evaluate_reports_every_requested_step_count_and_before_adaptation():
    model, tasks = conv4(), image_tasks()
    learner = ml.MAML(model, F.cross_entropy, inner_lr=0.4, inner_steps=1)
    result = ml.evaluate(learner, tasks, inner_steps=[3, 1], metric=ml.accuracy)
    assert isinstance(result, ml.Evaluation)
    assert result.inner_steps == [0, 1, 3] and set(result.scores) == {0, 1, 3}
    assert all(v.shape == (4,) for v in result.scores.values()) and result.n_tasks == 4
    direct = learner.adapt(tasks.task(1).support, inner_steps=3)
    want = ml.accuracy(learner.predict(direct, tasks.query[0][1]), tasks.query[1][1])
    assert result[3][1] == want
    before = ml.accuracy(learner.predict(learner.adapt(tasks.task(1).support, 0), tasks.query[0][1]),
                         tasks.query[1][1])
    assert result[0][1] == before


def test_evaluate_defaults_to_the_learners_test_steps_and_loss():
    learner = sine_maml(test_inner_steps=4)
    tasks = ml.Sinusoid(5, 5).sample(3, generator=ml.generator(0))
    result = ml.evaluate(learner, tasks)
    assert result.inner_steps == [0, 4]
    task = tasks.task(2)
    assert result[4][2] == F.mse_loss(learner.predict(learner.adapt(task.support, 4), task.query[0]), task.query[1])
    assert ml.evaluate(learner, tasks, inner_steps=2).inner_steps == [0, 2]


def test_gaussian_ci95():
    mean, half = ml.gaussian_ci95(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert mean == pytest.approx(2.5)
    assert half == pytest.approx(1.96 * torch.tensor([1.0, 2.0, 3.0, 4.0]).std().item() / 2)
    with pytest.raises(ml.ConfigError, match="values is empty"):
        ml.gaussian_ci95(torch.tensor([]))


def test_one_task_has_a_mean_and_an_undefined_interval():
    assert ml.gaussian_ci95(torch.tensor([0.5]))[0] == 0.5 and math.isnan(ml.gaussian_ci95(torch.tensor([0.5]))[1])
    result = ml.evaluate(sine_maml(), ml.Sinusoid(5, 5), n_tasks=1)
    summary = result.summary()
    assert summary["tasks"] == 1 and math.isfinite(summary["metric"]) and math.isfinite(summary["pre_metric"])
    assert math.isnan(summary["ci95"]) and math.isnan(summary["pre_ci95"]) and math.isnan(result.ci95())


def test_summary_holds_the_final_and_pre_adaptation_means_with_intervals():
    learner = sine_maml()
    result = ml.evaluate(learner, ml.Sinusoid(5, 5), n_tasks=30, inner_steps=[1, 3], batch_size=7)
    summary = result.summary()
    assert set(summary) == {"metric", "ci95", "pre_metric", "pre_ci95", "tasks", "inner_steps"}
    assert summary["tasks"] == 30 and summary["inner_steps"] == 3
    assert (summary["metric"], summary["ci95"]) == ml.gaussian_ci95(result[3])
    assert (summary["pre_metric"], summary["pre_ci95"]) == ml.gaussian_ci95(result[0])
    assert result.mean() == summary["metric"] and result.mean(1) == ml.gaussian_ci95(result[1])[0]
    assert result.ci95(0) == summary["pre_ci95"]
    assert summary["metric"] < summary["pre_metric"]  # three steps of adaptation help


def test_evaluate_on_a_sampler_equals_evaluate_on_the_same_tasks_drawn_by_hand():
    learner = sine_maml()
    sampler = ml.Sinusoid(5, 4)
    got = ml.evaluate(learner, sampler, n_tasks=10, seed=3, batch_size=4, inner_steps=[1, 2])
    g = torch.Generator().manual_seed(3)
    parts = [ml.evaluate(learner, sampler.sample(n, generator=g), inner_steps=[1, 2]) for n in (4, 4, 2)]
    assert got.n_tasks == 10
    for k in (0, 1, 2):
        assert torch.equal(got[k], torch.cat([part[k] for part in parts])), k
    other = ml.evaluate(learner, sampler, n_tasks=10, seed=4, batch_size=4, inner_steps=[1, 2])
    assert not torch.equal(other[2], got[2])


def mmaml():
    torch.manual_seed(0)
    model = ml.FiLMMLP(1, (8, 8), 1)
    encoder = ml.SetEncoder(1, 1, model.modulation_shapes(), hidden=8)
    with torch.no_grad():  # a modulation away from the identity, so that it matters
        encoder.out.weight.normal_(0, 0.3)
    return ml.MMAML(model, encoder, F.mse_loss, inner_lr=0.01, inner_steps=2, inner_grad_clip=5.0)


@pytest.mark.parametrize("make", ["maml", "metasgd", "pretrain", "reptile-adam", "mmaml"])
def test_evaluate_loop_and_vmap_agree(make):
    # Adam with betas[0] = 0 takes a step of about inner_lr * sign(g) at first, so an entry whose
    # gradient is rounding noise (a conv bias, which BatchNorm cancels) moves by a sign that differs
    # between the fused BatchNorm of the loop and the formula under vmap: float64 for that one.
    model = conv4().double() if make == "reptile-adam" else conv4()
    learner = {
        "maml": lambda: ml.MAML(model, F.cross_entropy, inner_lr=0.4, inner_steps=1),
        "metasgd": lambda: ml.meta_sgd(model, F.cross_entropy, inner_lr=0.4, inner_steps=1),
        "pretrain": lambda: ml.PretrainClassifier(model, 10, inner_lr=0.1, test_inner_steps=3),
        "reptile-adam": lambda: ml.Reptile(model, F.cross_entropy, inner_lr=0.01, inner_steps=2,
                                           inner_optimizer=ml.adam(betas=(0.0, 0.999))),
        "mmaml": mmaml,
    }[make]()
    if make == "mmaml":
        tasks = ml.MultimodalFunctions(5, 6).sample(4, generator=ml.generator(0))
    else:
        tasks = double(image_tasks()) if make == "reptile-adam" else image_tasks()
    loop = ml.evaluate(learner, tasks, inner_steps=[0, 1, 3], backend="loop")
    vmapped = ml.evaluate(learner, tasks, inner_steps=[0, 1, 3], backend="vmap", chunk_size=3)
    assert loop.inner_steps == vmapped.inner_steps == [0, 1, 3]
    for s in loop.inner_steps:
        assert torch.allclose(loop[s], vmapped[s], rtol=1e-4, atol=1e-5), s
    assert not torch.allclose(loop[3], loop[0], rtol=1e-4, atol=1e-5)  # adaptation changed the scores


def test_untrained_learner_scores_chance_before_adaptation():
    torch.manual_seed(0)
    model = ml.Conv4(5, filters=8, image_size=14)
    learner = ml.MAML(model, F.cross_entropy, inner_lr=0.4, inner_steps=1)

    class RandomEpisodes:
        def sample(self, n, *, generator=None):
            x = torch.rand(n, 5 * 2, 1, 14, 14, generator=generator)
            y = torch.stack([torch.randperm(5, generator=generator).repeat_interleave(2) for _ in range(n)])
            return ml.TaskBatch((x[:, :5], y[:, ::2]), (x[:, 5:], y[:, 1::2]))

    result = ml.evaluate(learner, RandomEpisodes(), n_tasks=300, metric=ml.accuracy).summary()
    assert abs(result["pre_metric"] - 0.2) < 0.05


def test_binned_means_averages_each_bin_and_marks_empty_ones():
    values = torch.tensor([1.0, 3.0, 10.0, 7.0])
    keys = torch.tensor([0.1, 0.4, 2.0, 3.0])
    got = ml.binned_means(values, keys, torch.tensor([0.0, 1.0, 2.0, 3.0]))
    assert torch.equal(got[[0, 2]], torch.tensor([2.0, 8.5])) and math.isnan(got[1])


def empty_tasks():
    return ml.TaskBatch((torch.zeros(0, 3, 1), torch.zeros(0, 3, 1)), (torch.zeros(0, 2, 1), torch.zeros(0, 2, 1)))


def mismatched_tasks():
    tasks = ml.Sinusoid(3, 2).sample(3)
    return ml.TaskBatch(tasks.support, (tasks.query[0][:2], tasks.query[1][:2]))


@pytest.mark.parametrize("tasks, kw, match", [
    ("batch", dict(inner_steps=[]), r"inner_steps = \[\] is not allowed"),
    ("batch", dict(inner_steps=[1, -1]), r"inner_steps = -1 is not allowed"),
    ("batch", dict(inner_steps=-2), r"inner_steps = -2 is not allowed"),
    ("batch", dict(inner_steps=[1.5]), r"inner_steps = 1.5 is not allowed"),
    ("sampler", dict(n_tasks=-5), r"n_tasks = -5 is not allowed"),
    ("sampler", dict(n_tasks=0), r"n_tasks = 0 is not allowed"),
    ("sampler", dict(batch_size=0), r"batch_size = 0 is not allowed"),
    ("batch", dict(n_tasks=3), r"n_tasks is for a sampler"),
    ("empty", {}, r"tasks is empty"),
    ("mismatched", {}, r"tasks disagree on meta_batch_size: support x/y and query x/y have 3, 3, 2, 2 tasks"),
    ("list", {}, r"tasks = list is not allowed"),
    ("batch", dict(backend="jit"), r"backend = 'jit' is not allowed"),
    ("batch", dict(chunk_size=0), r"chunk_size = 0 is not allowed"),
])
def test_evaluate_refuses_bad_input_by_name(tasks, kw, match):
    tasks = {"batch": lambda: ml.Sinusoid(3, 2).sample(2), "sampler": lambda: ml.Sinusoid(3, 2),
             "empty": empty_tasks, "mismatched": mismatched_tasks, "list": lambda: [1, 2]}[tasks]()
    with pytest.raises(ml.ConfigError, match=match):
        ml.evaluate(sine_maml(), tasks, **kw)
