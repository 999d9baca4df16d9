"""The MAML variants of the variants chapter: MAML++'s stabilisers (multi-step loss, per-step
learning rates, derivative-order annealing, per-step BatchNorm) and Proto-MAML's head.

Each option is checked against the plain algorithm it must reduce to, in float64, and each
test can tell the option from plain MAML where they should differ.
"""

import pytest
import torch
import torch.nn.functional as F

import mmtl_lib as ml
from mmtl_lib.models import step_buffers


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def mlp(seed=0, **kw):
    torch.manual_seed(seed)
    return ml.MLP(1, (8, 8), 1, **kw).double()


def sine_tasks(n=3, seed=1):
    return _double(ml.Sinusoid(5, 5).sample(n, generator=torch.Generator().manual_seed(seed)))


def _double(tasks):
    (sx, sy), (qx, qy) = tasks.support, tasks.query
    return ml.TaskBatch((sx.double(), sy.double()), (qx.double(), qy.double()))


def class_tasks(n_tasks=2, n_way=3, k_shot=2, n_query=2, dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_tasks, n_way, dim, generator=g) * 2

    def draw(k):
        y = torch.arange(n_way).repeat_interleave(k).expand(n_tasks, -1)
        x = centres.gather(1, y[..., None].expand(-1, -1, dim)) + torch.randn(n_tasks, n_way * k, dim, generator=g)
        return x, y

    return ml.TaskBatch(draw(k_shot), draw(n_query))


def grads_of(model, losses):
    params = dict(model.named_parameters())
    return torch.autograd.grad(losses.sum(), list(params.values()))


def meta(model, tasks, **kw):
    inner = dict(inner_steps=3, inner_lr=0.05) | kw
    return ml.meta_loss(model, dict(model.named_parameters()), tasks, F.mse_loss, **inner)


# --- multi-step loss --------------------------------------------------------------------------------


def test_msl_weights_follow_the_papers_annealing():
    assert ml.msl_weights(5, 0.0) == pytest.approx([0.2] * 5)
    assert ml.msl_weights(5, 0.5) == pytest.approx([0.1] * 4 + [0.6])
    assert ml.msl_weights(4, 0.99) == pytest.approx([0.03 / 4] * 3 + [1 - 3 * 0.03 / 4])  # the floor
    assert ml.msl_weights(5, 1.0) == [0.0, 0.0, 0.0, 0.0, 1.0]
    for p in (0.0, 0.3, 0.7, 0.999):
        assert sum(ml.msl_weights(3, p)) == pytest.approx(1.0)
    with pytest.raises(ml.ConfigError, match="progress = -0.1"):
        ml.msl_weights(3, -0.1)


def test_msl_with_weight_only_on_the_last_step_is_plain_maml_bit_exact():
    model, tasks = mlp(), sine_tasks()
    plain, _ = meta(model, tasks)
    last, _ = meta(model, tasks, step_weights=[0, 0, 1])
    assert torch.equal(plain, last)
    for a, b in zip(grads_of(model, plain), grads_of(model, last)):
        assert torch.equal(a, b)


def test_msl_is_the_weighted_sum_of_the_j_step_maml_losses():
    model, tasks = mlp(), sine_tasks()
    weights = [0.2, 0.3, 0.5]
    msl, _ = meta(model, tasks, step_weights=weights)
    by_steps = [meta(model, tasks, inner_steps=j)[0] for j in (1, 2, 3)]
    want = sum(w * loss for w, loss in zip(weights, by_steps))
    assert torch.allclose(msl, want, rtol=1e-12)
    for a, b in zip(grads_of(model, msl), grads_of(model, want)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(msl, by_steps[-1], rtol=1e-3)  # the test can tell MSL from MAML


def test_msl_refuses_a_weight_count_that_is_not_the_step_count():
    with pytest.raises(ml.ConfigError, match="step_weights has 2 entries, but inner_steps = 3"):
        meta(mlp(), sine_tasks(), step_weights=[0.5, 0.5])


# --- per-step learning rates (LSLR) ----------------------------------------------------------------


def test_per_step_rates_all_equal_to_alpha_are_maml():
    model, tasks = mlp(), sine_tasks()
    names = [n for n, _ in model.named_parameters()]
    rates = [{n: torch.tensor(0.05) for n in names} for _ in range(3)]
    plain, _ = meta(model, tasks)
    lslr, _ = meta(model, tasks, inner_lr=rates)
    assert torch.allclose(plain, lslr, rtol=1e-13)
    for a, b in zip(grads_of(model, plain), grads_of(model, lslr)):
        assert torch.allclose(a, b, rtol=1e-11, atol=1e-13)


def test_per_step_rates_take_step_j_with_rate_j():
    model, tasks = mlp(), sine_tasks()
    params = dict(model.named_parameters())
    support = (tasks.support[0][0], tasks.support[1][0])
    got = ml.adapt(model, params, support, F.mse_loss, inner_steps=2, inner_lr=[0.1, 0.02])
    step1 = ml.adapt(model, params, support, F.mse_loss, inner_steps=1, inner_lr=0.1)
    want = ml.adapt(model, step1, support, F.mse_loss, inner_steps=1, inner_lr=0.02)
    for n in params:
        assert torch.allclose(got[n], want[n], rtol=1e-13)
    swapped = ml.adapt(model, params, support, F.mse_loss, inner_steps=2, inner_lr=[0.02, 0.1])
    assert not torch.allclose(got["head.weight"], swapped["head.weight"], rtol=1e-4)


def test_per_step_rates_refuse_a_list_of_the_wrong_length():
    model, tasks = mlp(), sine_tasks()
    with pytest.raises(ml.ConfigError, match="list of 2 per-step rates, but inner_steps = 3"):
        meta(model, tasks, inner_lr=[0.1, 0.1])


def test_lslr_meta_gradient_matches_finite_differences():
    model, tasks = mlp(), sine_tasks(n=2)
    learner = ml.MAML(model, F.mse_loss, inner_lr=0.05, inner_steps=2, learn_step_lrs=True)
    assert learner.name == "maml++" and len(learner.meta_parameters()) == 2 * len(learner.params())
    learner.meta_backward(tasks)
    rates = learner.step_lrs["body.1.weight"]
    analytic = rates.grad.clone()

    def objective():
        with torch.no_grad():
            losses, _ = ml.meta_loss(model, learner.params(), tasks, F.mse_loss, inner_steps=2,
                                     inner_lr=learner.inner_rates())
        return losses.mean().item()

    eps = 1e-6
    for j in range(2):
        with torch.no_grad():
            rates[j] += eps
        up = objective()
        with torch.no_grad():
            rates[j] -= 2 * eps
        down = objective()
        with torch.no_grad():
            rates[j] += eps
        assert analytic[j].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-10)
    assert analytic.abs().min() > 0  # the rates do receive a meta-gradient


def test_lslr_reuses_the_last_rate_beyond_the_training_steps():
    learner = ml.MAML(mlp(), F.mse_loss, inner_lr=0.05, inner_steps=2, learn_step_lrs=True)
    with torch.no_grad():
        learner.step_lrs["head.bias"].copy_(torch.tensor([0.1, 0.3]))
    rates = learner.inner_rates(4)
    assert [r["head.bias"].item() for r in rates] == pytest.approx([0.1, 0.3, 0.3, 0.3])
    state = learner.state_dict()
    other = ml.MAML(mlp(), F.mse_loss, inner_lr=0.05, inner_steps=2, learn_step_lrs=True)
    other.load_state_dict(state)
    assert torch.equal(other.step_lrs["head.bias"], learner.step_lrs["head.bias"])


def test_meta_sgd_and_lslr_are_refused_together():
    with pytest.raises(ml.ConfigError, match="learn_inner_lr .* and learn_step_lrs"):
        ml.MAML(mlp(), F.mse_loss, inner_lr=0.05, inner_steps=2, learn_inner_lr=True, learn_step_lrs=True)


# --- derivative-order annealing ---------------------------------------------------------------------


def meta_grads(learner, tasks):
    for p in learner.meta_parameters():
        p.grad = None
    learner.meta_backward(tasks)
    return [None if p.grad is None else p.grad.clone() for p in learner.meta_parameters()]


def test_derivative_order_annealing_is_first_order_then_second_order():
    tasks = sine_tasks()
    annealed = ml.MAML(mlp(), F.mse_loss, inner_lr=0.05, inner_steps=2, first_order_iterations=2)
    first = ml.MAML(mlp(), F.mse_loss, inner_lr=0.05, inner_steps=2, first_order=True)
    second = ml.MAML(mlp(), F.mse_loss, inner_lr=0.05, inner_steps=2)
    fo, so = meta_grads(first, tasks), meta_grads(second, tasks)
    assert any(not torch.allclose(a, b, rtol=1e-3) for a, b in zip(fo, so))  # the two differ here
    for iteration in range(3):
        got = meta_grads(annealed, tasks)
        want = fo if iteration < 2 else so
        assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-14) for a, b in zip(got, want)), iteration
    assert annealed.meta_iteration == 3 and annealed.state_dict()["meta_iteration"] == 3


def test_msl_learner_anneals_to_plain_maml():
    tasks = sine_tasks()
    learner = ml.MAML(mlp(), F.mse_loss, inner_lr=0.05, inner_steps=3, msl_iterations=2)
    assert learner.step_weights() == pytest.approx([1 / 3] * 3)
    learner.meta_backward(tasks)
    assert learner.step_weights() == pytest.approx(ml.msl_weights(3, 0.5))
    learner.meta_backward(tasks)
    assert learner.step_weights() is None
    plain = ml.MAML(mlp(), F.mse_loss, inner_lr=0.05, inner_steps=3)
    assert all(torch.equal(a, b) for a, b in zip(meta_grads(learner, tasks), meta_grads(plain, tasks)))


def nan_switch():
    """A loss that turns NaN while ``on["nan"]`` is set: a step the trainer must reject."""
    on = {"nan": False}

    def loss_fn(prediction, y):
        loss = F.mse_loss(prediction, y)
        return loss * float("nan") if on["nan"] else loss
    return on, loss_fn


def test_annealing_counts_applied_meta_updates_not_rejected_steps(tmp_path):
    # MAML++'s schedules advance with the meta-updates the trainer applies: a step rejected for
    # a non-finite loss leaves the counter, the checkpoint and the next step's weights as after
    # the last good iteration.
    on, loss_fn = nan_switch()
    learner = ml.MAML(mlp(), loss_fn, inner_lr=0.05, inner_steps=2, msl_iterations=4, first_order_iterations=2)
    trainer = ml.Trainer(learner, ml.Sinusoid(5, 5, dtype=torch.float64), meta_batch_size=3, outer_lr=1e-3)
    trainer.fit(1, progress=False)
    on["nan"] = True
    for _ in range(2):
        with pytest.raises(ml.NonFiniteLossError):
            trainer.fit(5, checkpoint=tmp_path / "ckpt.pt", progress=False)
    assert trainer.iteration == 1 and learner.meta_iteration == 1
    assert ml.load_checkpoint(tmp_path / "ckpt.pt")["learner"]["meta_iteration"] == 1
    assert learner.step_weights() == pytest.approx(ml.msl_weights(2, 1 / 4))
    on["nan"] = False
    trainer.step()
    assert trainer.iteration == learner.meta_iteration == 2
    # called directly, meta_backward does not count a meta-batch whose loss is not finite
    on["nan"] = True
    learner.meta_backward(sine_tasks())
    assert learner.meta_iteration == 2


def test_a_step_rejected_after_the_meta_gradient_is_not_counted():
    # The trainer rejects the step after meta_backward returned (the loss it reports is NaN):
    # the learner's count is taken back with it.
    learner = ml.MAML(mlp(), F.mse_loss, inner_lr=0.05, inner_steps=2, first_order_iterations=2)
    trainer = ml.Trainer(learner, ml.Sinusoid(5, 5, dtype=torch.float64), meta_batch_size=3, outer_lr=1e-3)
    meta_backward = learner.meta_backward

    def nan_loss(tasks):
        losses, predictions = meta_backward(tasks)
        return losses * float("nan"), predictions

    learner.meta_backward = nan_loss
    with pytest.raises(ml.NonFiniteLossError):
        trainer.step()
    assert trainer.iteration == 0 and learner.meta_iteration == 0


# --- per-step BatchNorm ------------------------------------------------------------------------------


def bn_model(steps=3):
    torch.manual_seed(0)
    model = ml.MLP(1, (8,), 1, batch_norm="transductive", bn_steps=steps).double()
    with torch.no_grad():  # distinct rows, so that using the wrong one shows
        for name, p in model.named_parameters():
            if name.startswith("body.2."):
                p.copy_(torch.randn_like(p))
    return model


def test_per_step_batch_norm_step_j_changes_only_row_j():
    model, tasks = bn_model(), sine_tasks()
    params = dict(model.named_parameters())
    support = (tasks.support[0][0], tasks.support[1][0])
    phis = list(ml.inner_loop(model, params, support, F.mse_loss, inner_steps=3, inner_lr=0.1,
                              step_buffers=step_buffers(model)))
    for j in range(3):
        moved = (phis[j + 1]["body.2.weight"] - phis[j]["body.2.weight"]).abs().sum(-1)
        assert moved[j] > 0 and torch.all(moved[torch.arange(3) != j] == 0), j
    without = list(ml.inner_loop(model, params, support, F.mse_loss, inner_steps=3, inner_lr=0.1))
    assert torch.all(without[3]["body.2.weight"][1:] == params["body.2.weight"][1:])  # row 0 only


def test_per_step_batch_norm_scores_the_query_with_the_last_steps_row():
    model, tasks = bn_model(), sine_tasks()
    hook = step_buffers(model)
    losses, predictions = ml.meta_loss(model, dict(model.named_parameters()), tasks, F.mse_loss, inner_steps=2,
                                       inner_lr=0.1, step_buffers=hook)
    phi = ml.adapt(model, dict(model.named_parameters()), (tasks.support[0][0], tasks.support[1][0]), F.mse_loss,
                   inner_steps=2, inner_lr=0.1, step_buffers=hook)
    assert torch.allclose(predictions[0], ml.forward(model, phi, tasks.query[0][0], hook(1)), rtol=1e-13)
    assert not torch.allclose(predictions[0], ml.forward(model, phi, tasks.query[0][0], hook(0)), rtol=1e-3)
    assert hook(7)["body.2.step"].item() == 2  # beyond the rows: the last one


def test_per_step_batch_norm_learner_adapts_at_test_time_as_in_training():
    model, tasks = bn_model(steps=2), sine_tasks()
    learner = ml.MAML(model, F.mse_loss, inner_lr=0.1, inner_steps=2)
    assert learner.name == "maml++"
    _, predictions = learner.meta_backward(tasks)
    adapted = learner.adapt((tasks.support[0][0], tasks.support[1][0]))
    assert adapted.buffers["body.2.step"].item() == 1
    assert torch.allclose(learner.predict(adapted, tasks.query[0][0]), predictions[0], rtol=1e-12)


# --- Proto-MAML ---------------------------------------------------------------------------------------


def test_prototype_head_is_the_protonet_classifier():
    g = torch.Generator().manual_seed(0)
    features, labels = torch.randn(12, 5, generator=g), torch.arange(4).repeat(3)
    query = torch.randn(7, 5, generator=g)
    weight, bias = ml.prototype_head(features, labels, 4)
    prototypes = torch.stack([features[labels == n].mean(0) for n in range(4)])
    logits = query @ weight.T + bias
    distances = torch.cdist(query, prototypes) ** 2
    assert torch.allclose(logits, -distances + (query ** 2).sum(-1, keepdim=True), rtol=1e-12, atol=1e-12)
    assert torch.allclose(logits.softmax(-1), (-distances).softmax(-1), rtol=1e-12)
    batched = torch.func.vmap(ml.prototype_head, in_dims=(0, 0, None))(features[None], labels[None], 4)
    assert torch.allclose(batched[0][0], weight) and torch.allclose(batched[1][0], bias)


def proto_learner(backend="loop", steps=1):
    torch.manual_seed(0)
    model = ml.MLP(6, (16,), 3).double()
    return ml.MAML(model, F.cross_entropy, inner_lr=0.1, inner_steps=steps, proto_head=True, backend=backend)


def test_proto_maml_starts_every_task_at_its_prototype_classifier():
    learner, tasks = proto_learner(), class_tasks()
    assert learner.name == "protomaml"
    support = (tasks.support[0][0], tasks.support[1][0])
    start = learner.adapt(support, inner_steps=0)
    features = learner.model.body(support[0])
    weight, bias = ml.prototype_head(features, support[1], 3)
    assert torch.allclose(start.params["head.weight"], weight) and torch.allclose(start.params["head.bias"], bias)
    assert not torch.allclose(start.params["head.weight"], learner.model.head.weight, atol=1e-2)


def test_proto_maml_meta_gradient_reaches_the_body_through_the_prototypes_and_vmap_agrees():
    tasks = class_tasks()
    loop, vmap = proto_learner(), proto_learner("vmap")
    g_loop, g_vmap = meta_grads(loop, tasks), meta_grads(vmap, tasks)
    for a, b in zip(g_loop, g_vmap):
        assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    names = list(loop.params())
    assert loop.model.head.weight.grad is None  # the head is replaced, never used
    assert all(g.abs().sum() > 0 for n, g in zip([n for n in names if n.startswith("body")], g_loop))


def test_proto_head_needs_a_linear_head():
    model = ml.FiLMMLP(1, (4,), 1)
    model.head = torch.nn.Identity()
    with pytest.raises(ml.ConfigError, match="proto_head needs a model with a 'body' and a linear 'head'"):
        ml.MAML(model, F.mse_loss, inner_lr=0.1, inner_steps=1, proto_head=True)


# --- everything at once, and the configurations -------------------------------------------------------


def test_all_stabilisers_together_give_the_same_meta_gradient_with_loop_and_vmap():
    tasks = sine_tasks()

    def build(backend):
        return ml.MAML(bn_model(steps=3), F.mse_loss, inner_lr=0.05, inner_steps=3, learn_step_lrs=True,
                       msl_iterations=10, first_order_iterations=0, backend=backend)

    a, b = meta_grads(build("loop"), tasks), meta_grads(build("vmap"), tasks)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, rtol=1e-9, atol=1e-12)


def test_presets_build_maml_plus_plus_and_proto_maml():
    config = ml.preset("maml++-5w1s", iterations=150)
    learner = ml.build_learner(config, torch.device("cpu"))
    assert learner.name == "maml++" and learner.step_lrs is not None
    assert learner.msl_iterations == 15 and learner.first_order_iterations == 80
    assert step_buffers(learner.model)(4)["body.0.1.step"].item() == 4
    assert ml.build_learner(ml.preset("protomaml-5w1s"), torch.device("cpu")).name == "protomaml"
    with pytest.raises(ml.ConfigError, match="algorithm = 'protomaml' is not allowed for task = 'sinusoid'"):
        ml.preset("sinusoid", algorithm="protomaml")
