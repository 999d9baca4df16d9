"""The learner contract, backends that agree, pure adaptation, learners that do what their papers
say, and bad input refused by name."""

import gc
import inspect

import pytest
import torch
import torch.nn.functional as F
from helpers import conv4, double, image_tasks
from torch import nn

import mmtl_lib as ml


def mlp(hidden=(8,)):
    torch.manual_seed(0)
    return ml.MLP(1, hidden, 1)


@pytest.mark.parametrize("variant", [
    dict(),
    dict(first_order=True),
    dict(inner_steps=3),
    dict(anil=True),
    dict(meta_sgd=True),
])
def test_loop_and_vmap_backends_agree_on_losses_and_meta_gradients(variant):
    # float64, so that agreement is exact up to summation order and any real difference shows.
    variant = dict(variant)
    model, tasks = conv4().double(), double(image_tasks())
    params = dict(model.named_parameters())
    kw = dict(inner_steps=variant.pop("inner_steps", 1), inner_lr=0.4, first_order=variant.pop("first_order", False))
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


def test_loop_and_vmap_backends_agree_through_an_adam_inner_loop():
    # A tanh network: no inner gradient entry is exactly zero, which Adam's second order cannot
    # take yet (tests/test_inner.py::test_second_order_adam_survives_a_zero_gradient_entry).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    tasks = ml.Sinusoid(5, 6, dtype=torch.float64).sample(4, generator=ml.generator(0))
    params = dict(model.named_parameters())
    results = []
    for backend, chunk in (("loop", None), ("vmap", None), ("vmap", 3)):
        losses, preds = ml.meta_loss(model, params, tasks, F.mse_loss, backend=backend, chunk_size=chunk,
                                     inner_steps=3, inner_lr=0.01, optimizer=ml.adam(betas=(0.5, 0.99)))
        results.append((losses, preds, torch.autograd.grad(losses.mean(), list(params.values()))))
    (l0, p0, g0), *others = results
    assert all(torch.isfinite(g).all() for g in g0)
    for losses, preds, grads in others:
        assert torch.allclose(losses, l0, rtol=1e-10) and torch.allclose(preds, p0, rtol=1e-10, atol=1e-12)
        for a, b in zip(grads, g0):
            assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)


def test_maml_meta_backward_equals_gradient_of_mean_query_loss_for_both_backends():
    model, tasks = conv4().double(), double(image_tasks())
    params = dict(model.named_parameters())
    losses, _ = ml.meta_loss(model, params, tasks, F.cross_entropy, inner_steps=2, inner_lr=0.4)
    want = torch.autograd.grad(losses.mean(), list(params.values()))
    for backend in ("loop", "vmap"):
        model.zero_grad()
        learner = ml.MAML(model, F.cross_entropy, inner_lr=0.4, inner_steps=2, backend=backend)
        got_losses, _ = learner.meta_backward(tasks)
        assert torch.allclose(got_losses, losses.detach(), rtol=1e-12)
        for p, w in zip(model.parameters(), want):
            assert torch.allclose(p.grad, w, rtol=1e-9, atol=1e-12), backend


# The compile backend on a CPU: Inductor compiles each graph once (about a minute on a 2-core
# machine), then reuses it from its cache on disk; tracing alone takes seconds.


@pytest.fixture
def traced_only(monkeypatch):
    """The compile backend's traced graph run without compiling it: the plumbing, in seconds."""
    monkeypatch.setattr(ml.compiled, "COMPILER", None)


@pytest.mark.parametrize("variant", [dict(), dict(meta_sgd=True)])
def test_compiled_backend_agrees_with_loop_on_losses_and_meta_gradients(variant):
    # float64 and Inductor: the compiled graph computes the loop's meta-gradient, task weights and
    # Meta-SGD's learned rates included.
    model, tasks = conv4().double(), double(image_tasks())
    params = dict(model.named_parameters())
    rates = {k: torch.full_like(v, 0.4, requires_grad=True) for k, v in params.items()}
    inner_lr = rates if variant.get("meta_sgd") else 0.4
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    results = {}
    for backend in ("loop", "compile"):
        losses, preds = ml.meta_loss(model, params, tasks, F.cross_entropy, backend=backend, inner_steps=1,
                                     inner_lr=inner_lr)
        wrt = list(params.values()) + (list(rates.values()) if variant.get("meta_sgd") else [])
        results[backend] = losses, preds, torch.autograd.grad((weights * losses).sum(), wrt)
    (l0, p0, g0), (l1, p1, g1) = results["loop"], results["compile"]
    assert torch.allclose(l1, l0, rtol=1e-10) and torch.allclose(p1, p0, rtol=1e-10, atol=1e-12)
    for a, b in zip(g1, g0):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)
    assert not p1.requires_grad


@pytest.mark.parametrize("variant", [
    dict(first_order=True),
    dict(inner_steps=2, step_weights=[0.3, 0.7], adapt_names="head"),
    dict(inner_steps=2, optimizer="adam", inner_grad_clip=1.0),
])
def test_compiled_backends_traced_graph_agrees_with_loop(traced_only, variant):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    tasks = ml.Sinusoid(5, 6, dtype=torch.float64).sample(3, generator=ml.generator(0))
    params = dict(model.named_parameters())
    kw = {"inner_steps": 1, "inner_lr": 0.05, **variant}
    if kw.get("adapt_names") == "head":
        kw["adapt_names"] = ["2.weight", "2.bias"]
    if kw.get("optimizer") == "adam":
        kw["optimizer"] = ml.adam(betas=(0.5, 0.99))
    results = []
    for backend in ("loop", "compile"):
        losses, _ = ml.meta_loss(model, params, tasks, F.mse_loss, backend=backend, **kw)
        results.append((losses, torch.autograd.grad(losses.mean(), list(params.values()))))
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l1, l0, rtol=1e-10)
    for a, b in zip(g1, g0):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)


def test_compiled_backend_reuses_its_graph_and_follows_the_weights(traced_only):
    model = mlp().double()
    learner = ml.MAML(model, F.mse_loss, inner_lr=0.1, inner_steps=1, backend="compile")
    reference = ml.MAML(model, F.mse_loss, inner_lr=0.1, inner_steps=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(3):
        tasks = ml.Sinusoid(4, 4, dtype=torch.float64).sample(2, generator=ml.generator(i))
        model.zero_grad()
        reference.meta_backward(tasks)
        want = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        learner.meta_backward(tasks)
        assert all(torch.allclose(p.grad, w, rtol=1e-10, atol=1e-14) for p, w in zip(model.parameters(), want))
        opt.step()  # new weights: a graph that baked them in would now be wrong
    assert len(ml.compiled._CACHE[model]) == 1


def test_compiled_backend_falls_back_to_the_eager_graph_with_a_warning(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no working C++ compiler found\nsecond line")

    monkeypatch.setattr(torch, "compile", broken)
    model, tasks = mlp().double(), ml.Sinusoid(4, 4, dtype=torch.float64).sample(2, generator=ml.generator(0))
    params = dict(model.named_parameters())
    with pytest.warns(RuntimeWarning, match=r"backend='compile': torch.compile failed \(RuntimeError: no working "
                                            r"C\+\+ compiler found\); running the same computation eagerly"):
        losses, _ = ml.meta_loss(model, params, tasks, F.mse_loss, backend="compile", inner_steps=1, inner_lr=0.1)
    want, _ = ml.meta_loss(model, params, tasks, F.mse_loss, inner_steps=1, inner_lr=0.1)
    assert torch.allclose(losses, want, rtol=1e-12)
    got = torch.autograd.grad(losses.sum(), list(params.values()))
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-14)
               for a, b in zip(got, torch.autograd.grad(want.sum(), list(params.values()))))


def test_compiled_backend_refuses_what_it_cannot_compute():
    model, tasks = mlp(), ml.Sinusoid(4, 4).sample(2)
    params = dict(model.named_parameters())
    with pytest.raises(ml.ConfigError, match="inner_batch_size is not allowed with backend='compile'"):
        ml.meta_loss(model, params, tasks, F.mse_loss, backend="compile", inner_steps=1, inner_lr=0.1,
                     inner_batch_size=2)
    with pytest.raises(ml.ConfigError, match=r"backend='compile' treats the task buffers as constants"):
        ml.meta_loss(model, params, tasks, F.mse_loss, backend="compile", inner_steps=1, inner_lr=0.1,
                     task_buffers=lambda support: {"b": support[0].sum().requires_grad_()})
    with pytest.raises(ml.ConfigError, match="backend='compile' is not allowed for MMAML"):
        ml.MMAML(*film_pair(), F.mse_loss, inner_lr=0.1, inner_steps=1, backend="compile")
    with pytest.raises(ml.ConfigError, match=r"backend = 'compile' is not allowed: it must be one of "
                                             r"\['loop', 'vmap'\]"):
        ml.Reptile(mlp(), F.mse_loss, inner_lr=0.1, inner_steps=1, backend="compile")
    with pytest.raises(ml.ConfigError, match=r"backend = 'compile' is not allowed"):
        ml.evaluate(ml.MAML(model, F.mse_loss, inner_lr=0.1, inner_steps=1), tasks, backend="compile")


def test_adaptation_leaves_batchnorm_running_statistics_untouched():
    torch.manual_seed(0)
    model = ml.Conv4(3, filters=4, image_size=14, batch_norm="running").train()
    before = {k: v.clone() for k, v in model.named_buffers()}
    tasks = image_tasks()
    learner = ml.MAML(model, F.cross_entropy, inner_lr=0.4, inner_steps=2)
    learner.meta_backward(tasks)
    ml.evaluate(learner, tasks, inner_steps=[0, 2], metric=ml.accuracy)
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


@pytest.mark.filterwarnings("ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning")  # the gc scan
def test_evaluation_time_adaptation_keeps_no_graph_alive():
    model, tasks = conv4(), image_tasks(n_tasks=2)
    learner = ml.MAML(model, F.cross_entropy, inner_lr=0.4, inner_steps=1, test_inner_steps=3)
    adapted = learner.adapt(tasks.task(0).support)
    assert isinstance(adapted, ml.Adapted)
    assert all(v.grad_fn is None and not v.requires_grad for v in (*adapted.params.values(),
                                                                   *adapted.buffers.values()))
    ml.evaluate(learner, tasks, inner_steps=[0, 3])
    baseline = live_tensors()
    for _ in range(30):
        ml.evaluate(learner, tasks, inner_steps=[0, 3], metric=ml.accuracy)
    assert live_tensors() - baseline <= 2


def test_meta_sgd_learns_its_inner_learning_rates():
    model, tasks = conv4(), image_tasks()
    learner = ml.meta_sgd(model, F.cross_entropy, inner_lr=0.4, inner_steps=1)
    assert len(learner.meta_parameters()) == 2 * len(list(model.parameters()))
    assert learner.inner_lr == 0.4 and learner.inner_rates() is learner.inner_lrs
    learner.meta_backward(tasks)
    assert all(lr.grad is not None and lr.grad.abs().sum() > 0 for lr in learner.inner_lrs.values())
    state = learner.state_dict()
    assert set(state["inner_lrs"]) == {n for n, _ in model.named_parameters()}


def test_anil_adapts_only_the_head():
    model, tasks = conv4(), image_tasks()
    learner = ml.anil(model, F.cross_entropy, inner_lr=0.4, inner_steps=2)
    adapted = learner.adapt(tasks.task(0).support)
    for name, p in model.named_parameters():
        changed = not torch.equal(adapted.params[name], p.detach())
        assert changed == name.startswith("head."), name


def test_maml_training_reduces_the_sinusoid_query_loss():
    torch.manual_seed(0)
    g = ml.generator(0)
    model = ml.MLP(1, (40, 40), 1)
    learner = ml.MAML(model, F.mse_loss, inner_lr=0.01, inner_steps=1, backend="vmap")
    opt = torch.optim.Adam(learner.meta_parameters(), 1e-3)
    sampler = ml.Sinusoid(10, 10)
    test = sampler.sample(100, generator=ml.generator(1))
    before = ml.evaluate(learner, test, inner_steps=[1])[1].mean()
    for _ in range(300):
        opt.zero_grad()
        learner.meta_backward(sampler.sample(25, generator=g))
        opt.step()
    after = ml.evaluate(learner, test, inner_steps=[1])[1].mean()
    assert after < 0.7 * before


def test_reptile_learner_writes_the_mean_displacement_into_grad():
    model, tasks = conv4(), image_tasks()
    adam = ml.adam(betas=(0.0, 0.999))
    learner = ml.Reptile(model, F.cross_entropy, inner_lr=0.01, inner_steps=2, inner_optimizer=adam)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    direction, _ = ml.reptile_meta_gradient(model, params, zip(*tasks.support), F.cross_entropy, inner_steps=2,
                                            inner_lr=0.01, optimizer=adam)
    losses, preds = learner.meta_backward(tasks)
    assert losses.shape == (4,) and preds.shape == (4, 6, 3)
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, direction[name]), name


def test_reptile_checkpoints_its_mini_batch_generator():
    tasks = ml.Sinusoid(6, 4).sample(3, generator=ml.generator(0))

    def reptile(seed):
        return ml.Reptile(mlp(), F.mse_loss, inner_lr=0.01, inner_steps=3, inner_optimizer=ml.adam(),
                          inner_batch_size=2, generator=ml.generator(seed))

    first, second = reptile(0), reptile(1)
    first.meta_backward(tasks)  # advance the generator past its seed
    second.load_state_dict(first.state_dict())
    assert torch.equal(first.generator.get_state(), second.generator.get_state())
    first.model.zero_grad()
    first.meta_backward(tasks)
    second.meta_backward(tasks)
    for a, b in zip(first.model.parameters(), second.model.parameters()):
        assert torch.equal(a.grad, b.grad)


def test_joint_training_and_scratch_baselines():
    torch.manual_seed(0)
    model = ml.MLP(1, (8,), 1)
    tasks = ml.Sinusoid(5, 5).sample(4, generator=ml.generator(0))
    joint = ml.JointTraining(model, F.mse_loss, inner_lr=0.01, test_inner_steps=2)
    losses, _ = joint.meta_backward(tasks)
    assert losses.shape == (4,) and model.head.weight.grad is not None
    scratch = ml.Scratch(ml.MLP(1, (8,), 1), F.mse_loss, inner_lr=0.01, test_inner_steps=5)
    assert scratch.meta_parameters() == []
    result = ml.evaluate(scratch, tasks, inner_steps=[0, 5])
    assert result[5].mean() < result[0].mean()
    with pytest.raises(RuntimeError, match="no meta-parameters"):
        scratch.meta_backward(tasks)


def test_test_time_fine_tuning_clips_like_training():
    torch.manual_seed(0)
    model = ml.MLP(1, (8,), 1)
    tasks = ml.Sinusoid(5, 5).sample(2, generator=ml.generator(0))

    def moved(inner_grad_clip):
        learner = ml.MAML(model, F.mse_loss, inner_lr=0.1, inner_steps=1, inner_grad_clip=inner_grad_clip)
        params = learner.adapt(tasks.task(0).support, inner_steps=1).params
        return torch.sqrt(sum(((params[k] - p.detach()) ** 2).sum() for k, p in model.named_parameters()))

    assert moved(1e-3) == pytest.approx(0.1 * 1e-3, rel=1e-3)  # float32
    assert moved(None) > 10 * 0.1 * 1e-3


@pytest.mark.parametrize("make", ["reptile", "maml"])
def test_adaptation_with_adam_step_by_step_equals_one_run_of_k_steps(make):
    # Adam's moments must carry over between steps: the k-th state of one adaptation is the
    # result of k steps in one go, never k one-step runs that each restart the moments.
    model = mlp()
    adam = ml.adam(betas=(0.0, 0.999))
    learner = {
        "reptile": lambda: ml.Reptile(model, F.mse_loss, inner_lr=0.02, inner_steps=5, inner_optimizer=adam),
        "maml": lambda: ml.MAML(model, F.mse_loss, inner_lr=0.02, inner_steps=5, inner_optimizer=adam),
    }[make]()
    tasks = ml.Sinusoid(10, 10).sample(3, generator=ml.generator(2))
    support = tasks.task(0).support
    states = list(learner.adaptation(support, 5))
    assert len(states) == 6
    for k, state in enumerate(states):
        alone = learner.adapt(support, k)
        assert all(torch.equal(state.params[n], alone.params[n]) for n in alone.params), k
    restarted = states[0].params
    for _ in range(5):
        restarted = ml.adapt(model, restarted, support, F.mse_loss, inner_steps=1, inner_lr=0.02, optimizer=adam)
    assert not torch.allclose(restarted["head.weight"], states[5].params["head.weight"], rtol=1e-3)
    # evaluate reads every step count off one adaptation, and so agrees with separate ones
    result = ml.evaluate(learner, tasks, inner_steps=[1, 3, 5])
    for i in range(3):
        task = tasks.task(i)
        for k in (1, 3, 5):
            want = F.mse_loss(learner.predict(learner.adapt(task.support, k), task.query[0]), task.query[1])
            # evaluate may batch the tasks (vmap), which sums in another order than one task alone
            assert torch.allclose(result[k][i], want, rtol=1e-5, atol=1e-7), (i, k)


# --- the learner contract --------------------------------------------------------------------------


def film_pair():
    torch.manual_seed(0)
    model = ml.FiLMMLP(1, (8, 8), 1)
    return model, ml.SetEncoder(1, 1, model.modulation_shapes(), hidden=8)


BUILDERS = {
    "maml": lambda **kw: ml.MAML(mlp(), F.mse_loss, **{"inner_lr": 0.1, "inner_steps": 1, **kw}),
    "fomaml": lambda **kw: ml.first_order_maml(mlp(), F.mse_loss, **{"inner_lr": 0.1, "inner_steps": 1, **kw}),
    "metasgd": lambda **kw: ml.meta_sgd(mlp(), F.mse_loss, **{"inner_lr": 0.1, "inner_steps": 1, **kw}),
    "anil": lambda **kw: ml.anil(mlp(), F.mse_loss, **{"inner_lr": 0.1, "inner_steps": 1, **kw}),
    "reptile": lambda **kw: ml.Reptile(mlp(), F.mse_loss, **{"inner_lr": 0.1, "inner_steps": 1, **kw}),
    "joint-training": lambda **kw: ml.JointTraining(mlp(), F.mse_loss, **{"inner_lr": 0.1, "test_inner_steps": 1,
                                                                          **kw}),
    "pretrain": lambda **kw: ml.PretrainClassifier(conv4(), 10, **{"inner_lr": 0.1, "test_inner_steps": 1, **kw}),
    "scratch": lambda **kw: ml.Scratch(mlp(), F.mse_loss, **{"inner_lr": 0.1, "test_inner_steps": 1, **kw}),
    "tr-maml": lambda **kw: ml.TRMAML(mlp(), F.mse_loss, **{"n_tasks": 4, "p_lr": 0.1, "inner_lr": 0.1,
                                                           "inner_steps": 1, **kw}),
    "mmaml": lambda **kw: ml.MMAML(*film_pair(), F.mse_loss, **{"inner_lr": 0.1, "inner_steps": 1, **kw}),
}


# Learners without an inner loop (test_inner_steps = 0, no inner_lr): tests/test_metric.py checks them.
NO_INNER_LOOP = {
    "protonet": lambda: ml.ProtoNet(mlp()),
    "matching": lambda: ml.MatchingNet(mlp()),
}


def concrete_learner_classes(cls=ml.Learner):
    for sub in cls.__subclasses__():
        if sub.__module__.startswith("mmtl_lib."):
            if not inspect.isabstract(sub):
                yield sub
            yield from concrete_learner_classes(sub)


def test_learner_is_abstract():
    with pytest.raises(TypeError, match="abstract"):
        ml.Learner(mlp(), F.mse_loss, inner_lr=0.1, test_inner_steps=1)


def test_every_learner_has_a_unique_name_and_every_class_is_named_here():
    builders = {**BUILDERS, **NO_INNER_LOOP}
    learners = {key: build() for key, build in builders.items()}
    assert [learner.name for learner in learners.values()] == list(builders)
    assert len(set(builders)) == len(builders)
    covered = {type(learner) for learner in learners.values()}
    assert set(concrete_learner_classes()) <= covered  # a new learner class must be added above


def test_vmappable_means_no_running_statistics():
    assert ml.MAML(conv4(), F.cross_entropy, inner_lr=0.4, inner_steps=1).vmappable
    running = ml.MAML(conv4(batch_norm="running"), F.cross_entropy, inner_lr=0.4, inner_steps=1)
    assert not running.vmappable
    assert not ml.Reptile(ml.MLP(4, (8,), 2, batch_norm="running"), F.cross_entropy, inner_lr=0.1,
                          inner_steps=1).vmappable
    assert BUILDERS["mmaml"]().vmappable and BUILDERS["reptile"]().vmappable


COMMON_BAD = [
    (dict(inner_lr=0), r"inner_lr = 0 is not allowed"),
    (dict(inner_lr=-0.1), r"inner_lr = -0.1 is not allowed"),
    (dict(inner_lr=float("inf")), r"inner_lr = inf is not allowed"),
    (dict(inner_lr=float("nan")), r"inner_lr = nan is not allowed"),
    (dict(test_inner_steps=0), r"test_inner_steps = 0 is not allowed"),
    (dict(test_inner_steps=2.5), r"test_inner_steps = 2.5 is not allowed"),
]


@pytest.mark.parametrize("key", list(BUILDERS))
@pytest.mark.parametrize("kw, match", COMMON_BAD)
def test_every_learner_checks_its_fields_by_name(key, kw, match):
    with pytest.raises(ml.ConfigError, match=match):
        BUILDERS[key](**kw)


@pytest.mark.parametrize("key, kw, match", [
    *[(key, dict(adapt_names=["nope.weight"]), r"adapt_names names parameters that are not in params: "
                                               r"\['nope.weight'\]") for key in ("maml", "metasgd", "pretrain",
                                                                                 "scratch", "tr-maml")],
    ("maml", dict(adapt_names=[]), "adapt_names is empty"),
    ("maml", dict(inner_steps=0), r"inner_steps = 0 is not allowed"),
    ("reptile", dict(inner_steps=0), r"inner_steps = 0 is not allowed"),
    ("mmaml", dict(inner_steps=0), r"inner_steps = 0 is not allowed"),
    ("maml", dict(backend="jit"), r"backend = 'jit' is not allowed"),
    ("mmaml", dict(backend="jit"), r"backend = 'jit' is not allowed"),
    ("maml", dict(chunk_size=0), r"chunk_size = 0 is not allowed"),
    ("maml", dict(inner_optimizer="adam"), r"inner_optimizer = 'adam' is not allowed"),
    ("reptile", dict(inner_optimizer="adam"), r"inner_optimizer = 'adam' is not allowed"),
    ("maml", dict(inner_grad_clip=0), r"inner_grad_clip = 0 is not allowed"),
    ("mmaml", dict(inner_grad_clip=-1.0), r"inner_grad_clip = -1.0 is not allowed"),
    ("joint-training", dict(inner_grad_clip=float("inf")), r"inner_grad_clip = inf is not allowed"),
    ("reptile", dict(inner_batch_size=0), r"inner_batch_size = 0 is not allowed"),
    ("tr-maml", dict(n_tasks=0), r"n_tasks = 0 is not allowed"),
    ("tr-maml", dict(p_lr=0), r"p_lr = 0 is not allowed"),
])
def test_learner_constructors_refuse_bad_settings_by_name(key, kw, match):
    with pytest.raises(ml.ConfigError, match=match):
        BUILDERS[key](**kw)


def test_learners_refuse_what_is_not_a_model_or_a_class_count():
    with pytest.raises(ml.ConfigError, match="model = .* is not allowed"):
        ml.MAML(lambda x: x, F.mse_loss, inner_lr=0.1, inner_steps=1)
    with pytest.raises(ml.ConfigError, match="n_classes = 0 is not allowed"):
        ml.PretrainClassifier(conv4(), 0, inner_lr=0.1, test_inner_steps=1)


# --- bad input to the inner loop and the meta-objective -----------------------------------------------


class TestBadInput:
    def setup_method(self):
        self.model = nn.Linear(2, 1)
        self.params = dict(self.model.named_parameters())
        self.support = (torch.randn(3, 2), torch.randn(3, 1))

    def adapt(self, **kw):
        args = dict(model=self.model, params=self.params, support=self.support, loss_fn=F.mse_loss,
                    inner_steps=1, inner_lr=0.1)
        args.update(kw)
        return ml.adapt(args.pop("model"), args.pop("params"), args.pop("support"), args.pop("loss_fn"), **args)

    @pytest.mark.parametrize("inner_steps", [-1, 1.5, True])
    def test_inner_steps(self, inner_steps):
        with pytest.raises(ml.ConfigError, match=rf"inner_steps = {inner_steps!r} .* integer >= 0"):
            self.adapt(inner_steps=inner_steps)

    @pytest.mark.parametrize("lr", [0, -0.1, float("nan"), float("inf")])
    def test_inner_lr(self, lr):
        with pytest.raises(ml.ConfigError, match=r"inner_lr = .* number > 0"):
            self.adapt(inner_lr=lr)

    def test_inner_grad_clip(self):
        with pytest.raises(ml.ConfigError, match=r"inner_grad_clip = 0 is not allowed"):
            self.adapt(inner_grad_clip=0)

    def test_inner_batch_size(self):
        with pytest.raises(ml.ConfigError, match=r"inner_batch_size = 0 is not allowed"):
            self.adapt(inner_batch_size=0)

    def test_empty_support(self):
        with pytest.raises(ml.ConfigError, match=r"support is empty: x has shape \(0, 2\)"):
            self.adapt(support=(torch.randn(0, 2), torch.randn(0, 1)))

    def test_mismatched_support(self):
        with pytest.raises(ml.ConfigError,
                           match=r"support x and y disagree: x has shape \(3, 2\) and y \(4, 1\)"):
            self.adapt(support=(torch.randn(3, 2), torch.randn(4, 1)))

    def test_support_not_a_pair(self):
        with pytest.raises(ml.ConfigError, match="support must be a tuple"):
            self.adapt(support=torch.randn(3, 2))

    def test_unknown_adapt_names(self):
        with pytest.raises(ml.ConfigError,
                           match=r"adapt_names names parameters that are not in params: \['head.weight'\]"):
            self.adapt(adapt_names=["head.weight"])

    def test_unknown_inner_lr_names(self):
        with pytest.raises(ml.ConfigError,
                           match=r"inner_lr names parameters that are not in params: \['wieght'\]"):
            self.adapt(inner_lr={"wieght": torch.tensor(0.1)})

    def test_inner_lr_shape(self):
        with pytest.raises(ml.ConfigError, match=r"inner_lr\['weight'\] has shape \(3,\)"):
            self.adapt(inner_lr={"weight": torch.ones(3), "bias": torch.ones(1)}, adapt_names=["weight"])

    def test_empty_params(self):
        with pytest.raises(ml.ConfigError, match="params is empty"):
            self.adapt(params={})

    def meta_loss(self, tasks, **kw):
        model = ml.MLP()
        return ml.meta_loss(model, dict(model.named_parameters()), tasks, F.mse_loss,
                            **{"inner_steps": 1, "inner_lr": 0.1, **kw})

    def test_backend(self):
        with pytest.raises(ml.ConfigError,
                           match=r"backend = 'jit' is not allowed: it must be one of \['compile', 'loop', 'vmap'\]"):
            self.meta_loss(ml.Sinusoid(3, 3).sample(2), backend="jit")

    def test_chunk_size(self):
        with pytest.raises(ml.ConfigError, match=r"chunk_size = 0 is not allowed"):
            self.meta_loss(ml.Sinusoid(3, 3).sample(2), backend="vmap", chunk_size=0)

    def test_buffers_instead_of_task_buffers(self):
        with pytest.raises(ml.ConfigError, match="task_buffers"):
            self.meta_loss(ml.Sinusoid(3, 3).sample(2), buffers={})

    def test_tasks_that_disagree_on_their_count(self):
        tasks = ml.Sinusoid(3, 3).sample(2)
        bad = ml.TaskBatch(tasks.support, (tasks.query[0][:1], tasks.query[1][:1]))
        with pytest.raises(ml.ConfigError, match=r"tasks disagree on meta_batch_size: .* 2, 2, 1, 1 tasks"):
            self.meta_loss(bad)

    def test_sinusoid_sizes(self):
        with pytest.raises(ml.ConfigError, match=r"k_shot = 0 is not allowed"):
            ml.Sinusoid(0, 3)

    def test_conv4_batch_norm_mode(self):
        with pytest.raises(ml.ConfigError, match=r"batch_norm = 'batch' is not allowed"):
            ml.Conv4(5, batch_norm="batch")
