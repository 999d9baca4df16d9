"""Backends agree, adaptation is pure, learners do what their papers say, bad input is refused."""

import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmtl_lib as ml


def image_tasks(n_tasks=4, n_way=3, k_shot=1, n_query=2, size=14, seed=0):
    g = torch.Generator().manual_seed(seed)
    def labels(k):
        return torch.arange(n_way).repeat_interleave(k).expand(n_tasks, -1).clone()
    sx = torch.rand(n_tasks, n_way * k_shot, 1, size, size, generator=g)
    qx = torch.rand(n_tasks, n_way * n_query, 1, size, size, generator=g)
    return ml.TaskBatch((sx, labels(k_shot)), (qx, labels(n_query)))


def conv4(n_way=3, **kw):
    torch.manual_seed(0)
    return ml.Conv4(n_way, filters=4, image_size=14, **kw)


@pytest.mark.parametrize("variant", [
    dict(),
    dict(first_order=True),
    dict(steps=3),
    dict(anil=True),
    dict(meta_sgd=True),
])
def test_loop_and_vmap_backends_agree_on_losses_and_meta_gradients(variant):
    # float64, so that agreement is exact up to summation order and any real difference shows.
    variant = dict(variant)
    model, tasks = conv4().double(), image_tasks()
    tasks = ml.TaskBatch((tasks.support[0].double(), tasks.support[1]), (tasks.query[0].double(), tasks.query[1]))
    params = dict(model.named_parameters())
    kw = dict(steps=variant.pop("steps", 1), inner_lr=0.4, first_order=variant.pop("first_order", False))
    if variant.pop("anil", False):
        kw["adapt_names"] = ml.head_names(model)
    if variant.pop("meta_sgd", False):
        kw["inner_lr"] = {k: torch.full_like(v, 0.4, requires_grad=True) for k, v in params.items()}
    results = {}
    for backend, chunk in (("loop", None), ("vmap", None), ("vmap", 3)):
        losses, preds = ml.meta_loss(model, params, tasks, F.cross_entropy, backend=backend,
                                     chunk_size=chunk, **kw)
        wrt = list(params.values()) + (list(kw["inner_lr"].values()) if isinstance(kw["inner_lr"], dict) else [])
        grads = torch.autograd.grad(losses.mean(), wrt)
        results[(backend, chunk)] = (losses, preds, grads)
    ref = results[("loop", None)]
    for key, (losses, preds, grads) in results.items():
        assert torch.allclose(losses, ref[0], rtol=1e-10), key
        assert torch.allclose(preds, ref[1], rtol=1e-10, atol=1e-12), key
        for a, b in zip(grads, ref[2]):
            assert torch.allclose(a, b, rtol=1e-8, atol=1e-12), key


def test_adaptation_leaves_batchnorm_running_statistics_untouched():
    torch.manual_seed(0)
    model = ml.Conv4(3, filters=4, image_size=14, batch_norm="running").train()
    before = {k: v.clone() for k, v in model.named_buffers()}
    tasks = image_tasks()
    learner = ml.MAML(model, F.cross_entropy, inner_lr=0.4, steps=2)
    learner.meta_backward(tasks)
    ml.evaluate(learner, tasks, steps=[0, 2], metric=ml.accuracy)
    for k, v in model.named_buffers():
        assert torch.equal(v, before[k]), k
    # The forward pass would have changed them: the check above can fail.
    model(tasks.support[0][0])
    assert not torch.equal(model.get_buffer("body.0.1.running_mean"), before["body.0.1.running_mean"])


def test_transductive_conv4_has_no_buffers_to_mutate():
    assert list(conv4().named_buffers()) == []


def live_tensors():
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_evaluation_time_adaptation_keeps_no_graph_alive():
    model, tasks = conv4(), image_tasks(n_tasks=2)
    learner = ml.MAML(model, F.cross_entropy, inner_lr=0.4, steps=1, test_steps=3)
    adapted = learner.adapt(tasks.task(0).support)
    assert all(v.grad_fn is None and not v.requires_grad for v in adapted.values())
    ml.evaluate(learner, tasks, steps=[0, 3])
    baseline = live_tensors()
    for _ in range(30):
        ml.evaluate(learner, tasks, steps=[0, 3], metric=ml.accuracy)
    assert live_tensors() - baseline <= 2


def test_meta_sgd_learns_its_inner_learning_rates():
    model, tasks = conv4(), image_tasks()
    learner = ml.meta_sgd(model, F.cross_entropy, inner_lr=0.4, steps=1)
    assert len(learner.meta_parameters()) == 2 * len(list(model.parameters()))
    learner.meta_backward(tasks)
    assert all(lr.grad is not None and lr.grad.abs().sum() > 0 for lr in learner.inner_lrs.values())
    state = learner.state_dict()
    assert set(state["inner_lrs"]) == {n for n, _ in model.named_parameters()}


def test_anil_adapts_only_the_head():
    model, tasks = conv4(), image_tasks()
    learner = ml.anil(model, F.cross_entropy, inner_lr=0.4, steps=2)
    adapted = learner.adapt(tasks.task(0).support)
    for name, p in model.named_parameters():
        changed = not torch.equal(adapted[name], p.detach())
        assert changed == name.startswith("head."), name


def test_maml_training_reduces_the_sinusoid_query_loss():
    torch.manual_seed(0)
    g = ml.generator(0)
    model = ml.MLP(1, (40, 40), 1)
    learner = ml.MAML(model, F.mse_loss, inner_lr=0.01, steps=1, backend="vmap")
    opt = torch.optim.Adam(learner.meta_parameters(), 1e-3)
    test = ml.Sinusoid().sample(100, 10, 10, generator=ml.generator(1))
    before = ml.evaluate(learner, test, steps=[1])[1].mean()
    for _ in range(300):
        opt.zero_grad()
        learner.meta_backward(ml.Sinusoid().sample(25, 10, 10, generator=g))
        opt.step()
    after = ml.evaluate(learner, test, steps=[1])[1].mean()
    assert after < 0.7 * before


def test_reptile_learner_writes_displacement_into_grad():
    model, tasks = conv4(), image_tasks()
    learner = ml.Reptile(model, F.cross_entropy, inner_lr=0.01, steps=2, inner_optimizer="adam")
    losses, preds = learner.meta_backward(tasks)
    assert losses.shape == (4,) and preds.shape == (4, 6, 3)
    assert all(p.grad is not None for p in model.parameters())


def test_joint_training_and_scratch_baselines():
    torch.manual_seed(0)
    model = ml.MLP(1, (8,), 1)
    tasks = ml.Sinusoid().sample(4, 5, 5, generator=ml.generator(0))
    joint = ml.JointTraining(model, F.mse_loss, test_lr=0.01, test_steps=2)
    losses, _ = joint.meta_backward(tasks)
    assert losses.shape == (4,) and model.head.weight.grad is not None
    scratch = ml.Scratch(ml.MLP(1, (8,), 1), F.mse_loss, test_lr=0.01, test_steps=5)
    assert scratch.meta_parameters() == []
    result = ml.evaluate(scratch, tasks, steps=[0, 5])
    assert result[5].mean() < result[0].mean()
    with pytest.raises(RuntimeError, match="nothing to meta-train|no meta-parameters"):
        scratch.meta_backward(tasks)


def test_evaluate_reports_every_requested_step_count():
    model, tasks = conv4(), image_tasks()
    learner = ml.MAML(model, F.cross_entropy, inner_lr=0.4, steps=1)
    result = ml.evaluate(learner, tasks, steps=[0, 1, 3], metric=ml.accuracy)
    assert set(result) == {0, 1, 3} and all(v.shape == (4,) for v in result.values())
    direct = learner.adapt(tasks.task(1).support, steps=3)
    want = ml.accuracy(learner.predict(direct, tasks.query[0][1]), tasks.query[1][1])
    assert result[3][1] == want


def test_gaussian_ci95():
    mean, half = ml.gaussian_ci95(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert mean == pytest.approx(2.5)
    assert half == pytest.approx(1.96 * torch.tensor([1.0, 2.0, 3.0, 4.0]).std().item() / 2)


class TestBadInput:
    def setup_method(self):
        self.model = nn.Linear(2, 1)
        self.params = dict(self.model.named_parameters())
        self.support = (torch.randn(3, 2), torch.randn(3, 1))

    def adapt(self, **kw):
        args = dict(model=self.model, params=self.params, support=self.support, loss_fn=F.mse_loss,
                    steps=1, inner_lr=0.1)
        args.update(kw)
        return ml.adapt(args.pop("model"), args.pop("params"), args.pop("support"), args.pop("loss_fn"), **args)

    @pytest.mark.parametrize("steps", [0, -1, 1.5, True])
    def test_steps(self, steps):
        with pytest.raises(ValueError, match=rf"steps = {steps!r} .* integer >= 1"):
            self.adapt(steps=steps)

    @pytest.mark.parametrize("lr", [0, -0.1, float("nan")])
    def test_inner_lr(self, lr):
        with pytest.raises(ValueError, match=r"inner_lr = .* number > 0"):
            self.adapt(inner_lr=lr)

    def test_empty_support(self):
        with pytest.raises(ValueError, match=r"support is empty: x has shape \(0, 2\)"):
            self.adapt(support=(torch.randn(0, 2), torch.randn(0, 1)))

    def test_mismatched_support(self):
        with pytest.raises(ValueError, match=r"support x and y disagree: x has shape \(3, 2\) and y \(4, 1\)"):
            self.adapt(support=(torch.randn(3, 2), torch.randn(4, 1)))

    def test_support_not_a_pair(self):
        with pytest.raises(ValueError, match="support must be a tuple"):
            self.adapt(support=torch.randn(3, 2))

    def test_unknown_adapt_names(self):
        with pytest.raises(ValueError, match=r"adapt_names names parameters that are not in params: \['head.weight'\]"):
            self.adapt(adapt_names=["head.weight"])

    def test_unknown_inner_lr_names(self):
        with pytest.raises(ValueError, match=r"inner_lr names parameters that are not in params: \['wieght'\]"):
            self.adapt(inner_lr={"wieght": torch.tensor(0.1)})

    def test_inner_lr_shape(self):
        with pytest.raises(ValueError, match=r"inner_lr\['weight'\] has shape \(3,\)"):
            self.adapt(inner_lr={"weight": torch.ones(3), "bias": torch.ones(1)}, adapt_names=["weight"])

    def test_empty_params(self):
        with pytest.raises(ValueError, match="params is empty"):
            self.adapt(params={})

    def test_backend(self):
        tasks = ml.Sinusoid().sample(2, 3, 3)
        with pytest.raises(ValueError, match=r"backend = 'jit' is not allowed: it must be one of \['loop', 'vmap'\]"):
            ml.meta_loss(ml.MLP(), dict(ml.MLP().named_parameters()), tasks, F.mse_loss, steps=1,
                         inner_lr=0.1, backend="jit")

    def test_sinusoid_sizes(self):
        with pytest.raises(ValueError, match=r"k_shot = 0 is not allowed"):
            ml.Sinusoid().sample(2, 0, 3)

    def test_conv4_batch_norm_mode(self):
        with pytest.raises(ValueError, match=r"batch_norm = 'batch' is not allowed"):
            ml.Conv4(5, batch_norm="batch")

    def test_evaluate_negative_steps(self):
        learner = ml.MAML(ml.MLP(), F.mse_loss, inner_lr=0.1, steps=1)
        with pytest.raises(ValueError, match=r"steps = \[-1, 1\] is not allowed"):
            ml.evaluate(learner, ml.Sinusoid().sample(2, 3, 3), steps=[1, -1])


def test_maml_meta_backward_equals_gradient_of_mean_query_loss_for_both_backends():
    model, tasks = conv4().double(), image_tasks()
    tasks = ml.TaskBatch((tasks.support[0].double(), tasks.support[1]), (tasks.query[0].double(), tasks.query[1]))
    params = dict(model.named_parameters())
    losses, _ = ml.meta_loss(model, params, tasks, F.cross_entropy, steps=2, inner_lr=0.4)
    want = torch.autograd.grad(losses.mean(), list(params.values()))
    for backend in ("loop", "vmap"):
        model.zero_grad()
        got_losses, _ = ml.MAML(model, F.cross_entropy, inner_lr=0.4, steps=2, backend=backend).meta_backward(tasks)
        assert torch.allclose(got_losses, losses.detach(), rtol=1e-12)
        for p, w in zip(model.parameters(), want):
            assert torch.allclose(p.grad, w, rtol=1e-9, atol=1e-12), backend


@pytest.mark.parametrize("make", ["maml", "metasgd", "pretrain", "reptile"])
def test_evaluate_loop_and_vmap_agree(make):
    model, tasks = conv4(), image_tasks()
    learner = {
        "maml": lambda: ml.MAML(model, F.cross_entropy, inner_lr=0.4, steps=1),
        "metasgd": lambda: ml.meta_sgd(model, F.cross_entropy, inner_lr=0.4, steps=1),
        "pretrain": lambda: ml.algorithms.PretrainClassifier(model, 10, test_lr=0.1, test_steps=3),
        "reptile": lambda: ml.Reptile(model, F.cross_entropy, inner_lr=0.01, steps=2, inner_optimizer="adam"),
    }[make]()
    loop = ml.evaluate(learner, tasks, steps=[0, 1, 3], backend="loop")
    vmapped = ml.evaluate(learner, tasks, steps=[0, 1, 3], backend="vmap", chunk_size=3)
    for s in loop:
        assert torch.allclose(loop[s], vmapped[s], rtol=1e-4, atol=1e-5), s


def test_test_time_fine_tuning_clips_like_training():
    torch.manual_seed(0)
    model = ml.MLP(1, (8,), 1)
    tasks = ml.Sinusoid().sample(2, 5, 5, generator=ml.generator(0))

    def moved(grad_clip):
        learner = ml.MAML(model, F.mse_loss, inner_lr=0.1, steps=1, grad_clip=grad_clip)
        params = learner.adapt(tasks.task(0).support, steps=1)
        return torch.sqrt(sum(((params[k] - p.detach()) ** 2).sum() for k, p in model.named_parameters()))

    assert moved(1e-3) == pytest.approx(0.1 * 1e-3, rel=1e-3)  # float32
    assert moved(None) > 10 * 0.1 * 1e-3
