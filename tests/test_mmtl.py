"""Meta multi-task learning (mmtl_lib.mmtl) against closed forms, finite differences and brute force.

The Reptile-as-joint-training bridge is tested in
``tests/test_inner.py::test_reptile_meta_gradient_averages_task_displacements``.
"""

import importlib.util
import math
import pathlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmtl_lib as ml
from mmtl_lib import mmtl

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def grads(loss, params):
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


def dot(a, b):
    return sum((a[k] * b[k]).sum() for k in a)


# --- 1. lookahead task weights ----------------------------------------------------------------


def multitask_problem(n_tasks=3, seed=0, hidden=(6,)):
    """A float64 multi-head regressor ``MLP(3, hidden, T)``, a training batch of every task and
    held-out examples of task 0."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ml.MLP(3, hidden, n_tasks).double()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    task = torch.arange(30) % n_tasks
    x = torch.randn(30, 3, generator=g, dtype=torch.float64)
    train = (x, mmtl.pack_targets(torch.randn(30, generator=g, dtype=torch.float64), task, n_tasks))
    xv = torch.randn(8, 3, generator=g, dtype=torch.float64)
    val = (xv, mmtl.pack_targets(torch.randn(8, generator=g, dtype=torch.float64), torch.zeros(8, dtype=torch.long),
                                 n_tasks))
    return model, params, train, val


def test_task_losses_score_each_example_with_its_own_head_only():
    prediction = torch.tensor([[1.0, 5.0], [2.0, 7.0], [9.0, 3.0]])
    packed = mmtl.pack_targets(torch.tensor([0.0, 1.0, 1.0]), torch.tensor([0, 0, 1]), 2)
    assert packed.shape == (3, 3)
    want = torch.tensor([(1.0 + 1.0) / 2, 4.0])  # task 0: (1-0)^2, (2-1)^2; task 1: (3-1)^2
    assert torch.equal(mmtl.task_losses(prediction, packed), want)
    # a task without examples in the batch contributes 0, not NaN
    assert torch.equal(mmtl.task_losses(prediction[:2], packed[:2]), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="task ids span"):
        mmtl.pack_targets(torch.zeros(2), torch.tensor([0, 2]), 2)


def test_one_step_hypergradient_is_minus_alpha_val_gradient_dot_task_gradient():
    # d L_val(theta') / d lambda_j = -alpha grad L_val(theta') . grad L_j(theta),
    # theta' = theta - alpha grad sum_t lambda_t L_t(theta)
    model, params, train, val = multitask_problem()
    alpha = 0.3
    weights = torch.tensor([0.7, 0.2, 1.3], dtype=torch.float64, requires_grad=True)
    loss = mmtl.lookahead_loss(model, params, weights, train, val, steps=1, inner_lr=alpha)
    (got,) = torch.autograd.grad(loss, weights)

    adapted = ml.adapt(model, params, train, mmtl.weighted_loss(weights.detach()), steps=1, inner_lr=alpha)
    adapted = {k: v.detach().requires_grad_() for k, v in adapted.items()}
    g_val = grads(mmtl.task_losses(ml.forward(model, adapted, val[0]), val[1])[0], adapted)
    theta = {k: v.clone().requires_grad_() for k, v in params.items()}
    g_task = [grads(mmtl.task_losses(ml.forward(model, theta, train[0]), train[1])[j], theta) for j in range(3)]
    want = torch.stack([-alpha * dot(g_val, g) for g in g_task])
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-14)

    # the validation gradient must be taken after the step: at theta itself the rule is off
    g_val_before = grads(mmtl.task_losses(ml.forward(model, theta, val[0]), val[1])[0], theta)
    at_theta = torch.stack([-alpha * dot(g_val_before, g) for g in g_task])
    assert not torch.allclose(got, at_theta, rtol=1e-3)


def test_multi_step_hypergradient_matches_central_finite_differences():
    model, params, train, val = multitask_problem(seed=1)
    weights = torch.tensor([0.5, 0.9, 0.1], dtype=torch.float64, requires_grad=True)

    def loss(w):
        return mmtl.lookahead_loss(model, params, w, train, val, steps=3, inner_lr=0.2)

    (got,) = torch.autograd.grad(loss(weights), weights)
    eps = 1e-6
    want = torch.stack([(loss(weights.detach() + eps * e) - loss(weights.detach() - eps * e)) / (2 * eps)
                        for e in torch.eye(3, dtype=torch.float64)])
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-10)


class SharedOutput(nn.Module):
    """One output copied to every task's column: a task with the primary's function then has the
    primary's gradient exactly, whatever the weights."""

    def __init__(self, n_tasks):
        super().__init__()
        self.net, self.n_tasks = ml.MLP(4, (16,), 1), n_tasks

    def forward(self, x):
        return self.net(x).expand(-1, self.n_tasks)


def test_lookahead_weights_follow_a_copy_of_the_primary_and_drop_a_noise_task():
    g = torch.Generator().manual_seed(1)
    W, v = torch.randn(4, 4, generator=g), torch.randn(4, generator=g)
    x = [torch.randn(n, 4, generator=g) for n in (40, 100, 100)]
    y = [torch.tanh(x[0] @ W) @ v, torch.tanh(x[1] @ W) @ v, 3 * torch.randn(100, generator=g)]
    task = torch.cat([torch.full((n,), t) for t, n in enumerate((20, 100, 100))])
    train = (torch.cat([x[0][:20], x[1], x[2]]), mmtl.pack_targets(torch.cat([y[0][:20], y[1], y[2]]), task, 3))
    val = (x[0][20:], mmtl.pack_targets(y[0][20:], torch.zeros(20, dtype=torch.long), 3))
    torch.manual_seed(1)
    model = SharedOutput(3)
    weights = mmtl.LookaheadWeights(3, init=0.1, lr=0.01, steps=1, inner_lr=0.1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    params = dict(model.named_parameters())
    for _ in range(50):
        hypergradient = weights.update(model, params, train, val)
        optimizer.zero_grad()
        weights.loss_fn()(model(train[0]), train[1]).backward()
        optimizer.step()
    w = weights.weights.detach()
    assert hypergradient.shape == (3,) and (w >= 0).all()
    assert w[1] > 0.4 and abs(w[1] - w[0]) < 0.1  # the copy rises with the primary
    assert w[2] < 0.02  # the noise task is switched off


def test_lookahead_weights_reject_bad_arguments():
    with pytest.raises(ValueError, match="must be >= 0"):
        mmtl.LookaheadWeights(2, init=[0.1, -0.1])
    with pytest.raises(ValueError, match="primary = 3"):
        mmtl.LookaheadWeights(2, primary=3)


# --- 2. TR-MAML -------------------------------------------------------------------------------


def bisection_projection(v, iterations=200):
    """The projection by another route: find tau with sum(max(v - tau, 0)) = 1 by bisection."""
    low, high = v.min() - 1, v.max()
    for _ in range(iterations):
        tau = (low + high) / 2
        low, high = (tau, high) if (v - tau).clamp(min=0).sum() > 1 else (low, tau)
    return (v - (low + high) / 2).clamp(min=0)


def test_project_simplex_lands_on_the_simplex_and_is_idempotent():
    v = torch.randn(50, 7, dtype=torch.float64) * 3
    p = mmtl.project_simplex(v)
    assert (p >= 0).all() and torch.allclose(p.sum(-1), torch.ones(50, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(mmtl.project_simplex(p), p, atol=1e-12)


@pytest.mark.parametrize("v, want", [
    ([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]),  # already on the simplex
    ([2.0, 0.0], [1.0, 0.0]),
    ([0.7, 0.6], [0.55, 0.45]),
    ([-1.0, -1.0, -1.0], [1 / 3, 1 / 3, 1 / 3]),
    ([5.0, 1.0, 4.6], [0.7, 0.0, 0.3]),
])
def test_project_simplex_known_cases(v, want):
    got = mmtl.project_simplex(torch.tensor(v, dtype=torch.float64))
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-12)


def test_project_simplex_is_the_nearest_point_of_the_simplex():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        v = torch.randn(6, generator=g, dtype=torch.float64) * 2
        p = mmtl.project_simplex(v)
        assert torch.allclose(p, bisection_projection(v), atol=1e-12)
        # no other point of the simplex is closer (random points from a Dirichlet(1) distribution)
        others = -torch.rand(2000, 6, generator=g, dtype=torch.float64).log()
        others = others / others.sum(1, keepdim=True)
        assert ((others - v).norm(dim=1) >= (p - v).norm() - 1e-12).all()


def test_project_simplex_is_invariant_to_adding_a_constant():
    v = torch.randn(4, 9, dtype=torch.float64)
    assert torch.allclose(mmtl.project_simplex(v + 3.7), mmtl.project_simplex(v), atol=1e-12)


def sine_learners(n_tasks=100):
    torch.manual_seed(0)
    maml_model = ml.MLP(1, (8, 8), 1)
    tr_model = ml.MLP(1, (8, 8), 1)
    tr_model.load_state_dict(maml_model.state_dict())
    kw = dict(inner_lr=0.01, steps=1)
    return ml.MAML(maml_model, F.mse_loss, **kw), mmtl.TRMAML(tr_model, F.mse_loss, n_tasks=n_tasks, p_lr=0.01, **kw)


def test_tr_maml_at_uniform_weights_takes_maml_gradient_then_raises_weight_of_worst_task():
    task_set = mmtl.SinusoidTaskSet.imbalanced()
    tasks = task_set.sample(8, 5, 5, generator=ml.generator(0))
    maml, tr = sine_learners(task_set.n_tasks)
    losses, _ = maml.meta_backward(tasks)
    tr_losses, _ = tr.meta_backward(tasks)
    assert torch.allclose(losses, tr_losses)
    for p, q in zip(maml.model.parameters(), tr.model.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    assert torch.allclose(tr.p.sum(), torch.tensor(1.0)) and (tr.p >= 0).all()
    ids = tasks.info["task_id"]
    worst = ids[losses.argmax()]
    assert tr.p[worst] == tr.p.max() > 1 / task_set.n_tasks
    unseen = torch.ones(task_set.n_tasks, dtype=torch.bool)
    unseen[ids] = False
    assert (tr.p[unseen] < 1 / task_set.n_tasks).all()  # the projection shifts weight away from them
    state = tr.state_dict()
    _, fresh = sine_learners(task_set.n_tasks)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.p, tr.p)


def test_imbalanced_task_set_has_95_easy_and_5_rare_hard_tasks():
    task_set = mmtl.SinusoidTaskSet.imbalanced()
    assert task_set.n_tasks == 100
    assert torch.allclose(task_set.bands[:95].flatten().aminmax()[0], torch.tensor(0.1, dtype=torch.float64))
    assert task_set.bands[94, 1].item() == pytest.approx(1.05) and task_set.bands[95, 0].item() == pytest.approx(4.05)
    tasks = task_set.sample(500, 3, 2, generator=ml.generator(1))
    ids, amplitude = tasks.info["task_id"], tasks.info["amplitude"].double()
    assert ((amplitude >= task_set.bands[ids, 0] - 1e-6) & (amplitude <= task_set.bands[ids, 1] + 1e-6)).all()
    assert tasks.support[0].shape == (500, 3, 1) and tasks.query[1].shape == (500, 2, 1)
    assert torch.allclose(tasks.support[1], tasks.info["amplitude"][:, None, None]
                          * torch.sin(tasks.support[0] - tasks.info["phase"][:, None, None]))


def test_binned_means_averages_each_bin_and_marks_empty_ones():
    values = torch.tensor([1.0, 3.0, 10.0, 7.0])
    keys = torch.tensor([0.1, 0.4, 2.0, 3.0])
    got = mmtl.binned_means(values, keys, torch.tensor([0.0, 1.0, 2.0, 3.0]))
    assert torch.equal(got[[0, 2]], torch.tensor([2.0, 8.5])) and math.isnan(got[1])


# --- 3. MMAML ---------------------------------------------------------------------------------


def mmaml_setup(dtype=torch.float32):
    torch.manual_seed(0)
    model = mmtl.FiLMMLP(1, (8, 8), 1).to(dtype)
    encoder = mmtl.SetEncoder(1, 1, model.modulation_shapes(), hidden=8).to(dtype)
    tasks = mmtl.MultimodalFunctions().sample(4, 5, 6, generator=ml.generator(0), dtype=dtype)
    return model, encoder, tasks


def test_film_at_initialisation_equals_the_unmodulated_network_exactly():
    model, encoder, tasks = mmaml_setup()
    plain = ml.MLP(1, (8, 8), 1)
    plain.load_state_dict(model.state_dict())
    modulation = encoder(*tasks.support)
    assert set(modulation) == {"film.0.gamma", "film.0.beta", "film.1.gamma", "film.1.beta"}
    for name, m in modulation.items():
        assert m.shape == (4, 8) and torch.equal(m, torch.full_like(m, 1.0 if name.endswith("gamma") else 0.0))
    x = tasks.query[0][0]
    params = dict(model.named_parameters())
    assert torch.equal(ml.forward(model, params, x, {k: v[0] for k, v in modulation.items()}), plain(x))
    assert torch.equal(model(x), plain(x))
    # and a modulation away from the identity does change the function
    shifted = {k: v[0] + 0.5 for k, v in modulation.items()}
    assert not torch.allclose(ml.forward(model, params, x, shifted), plain(x))


def test_modulated_meta_loss_loop_and_vmap_agree_in_values_and_gradients():
    model, encoder, tasks = mmaml_setup()
    with torch.no_grad():  # a modulation away from the identity, so that it matters
        encoder.out.bias.normal_(0, 0.3)
    results = []
    for backend in ("loop", "vmap"):
        params = dict(model.named_parameters())
        modulation = encoder(*tasks.support)
        losses, predictions = mmtl.modulated_meta_loss(model, params, modulation, tasks, F.mse_loss, steps=2,
                                                       inner_lr=0.01, grad_clip=5.0, backend=backend)
        g = torch.autograd.grad(losses.mean(), [*params.values(), *encoder.parameters()])
        results.append((losses, predictions, g))
    (l1, p1, g1), (l2, p2, g2) = results
    assert torch.allclose(l1, l2, rtol=1e-5) and torch.allclose(p1, p2, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_meta_gradient_reaches_the_modulation_through_the_inner_loop():
    model, encoder, tasks = mmaml_setup(torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}
    base = {k: v.detach() + 0.1 * torch.randn_like(v) for k, v in encoder(*tasks.support).items()}
    gamma = base["film.0.gamma"].clone().requires_grad_()

    def loss(gamma):
        modulation = {**base, "film.0.gamma": gamma}
        return mmtl.modulated_meta_loss(model, params, modulation, tasks, F.mse_loss, steps=2, inner_lr=0.05,
                                        backend="loop")[0].sum()

    (got,) = torch.autograd.grad(loss(gamma), gamma)
    eps = 1e-6
    want = torch.zeros_like(gamma)
    for i in range(gamma.shape[0]):
        for j in range(gamma.shape[1]):
            e = torch.zeros_like(gamma)
            e[i, j] = eps
            want[i, j] = (loss(gamma.detach() + e) - loss(gamma.detach() - e)) / (2 * eps)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-9)


def test_mmaml_trains_its_encoder_and_adapts_with_the_modulation_fixed():
    model, encoder, tasks = mmaml_setup()
    learner = mmtl.MMAML(model, encoder, F.mse_loss, inner_lr=0.01, steps=2, grad_clip=10.0)
    assert len(learner.meta_parameters()) == len(list(model.parameters())) + len(list(encoder.parameters()))
    learner.meta_backward(tasks)
    assert encoder.out.weight.grad is not None and encoder.out.weight.grad.abs().sum() > 0
    support = tasks.task(0).support
    adapted = learner.adapt(support)
    modulation = encoder(support[0][None], support[1][None])
    for k in learner.names:
        assert torch.equal(adapted[k], modulation[k][0].detach())
    assert not torch.equal(adapted["head.weight"], model.head.weight)
    result = ml.evaluate(learner, tasks, steps=[0, 2])
    assert result[2].shape == (4,) and torch.isfinite(result[2]).all()
    state = learner.state_dict()
    assert set(state) == {"model", "encoder"}


def test_multimodal_functions_hit_the_ends_of_the_papers_ranges():
    x = torch.linspace(-5, 5, 11)[None, :, None]
    zeros, ones = torch.zeros(1, 3), torch.ones(1, 3)
    target = mmtl.MultimodalFunctions.target
    assert torch.allclose(target(x, torch.tensor([0]), zeros), 0.1 * torch.sin(x))
    assert torch.allclose(target(x, torch.tensor([0]), ones), 5.0 * torch.sin(x - math.pi))
    assert torch.allclose(target(x, torch.tensor([1]), zeros), -3 * x - 3)
    assert torch.allclose(target(x, torch.tensor([1]), ones), 3 * x + 3)
    half = torch.full((1, 3), 0.5)
    assert torch.allclose(target(x, torch.tensor([2]), zeros), -0.15 * (x + 3) ** 2 - 3)
    assert torch.allclose(target(x, torch.tensor([2]), half), 0.02 * x**2)  # |a| >= 0.02 even at the middle
    tasks = mmtl.MultimodalFunctions(modes=("linear",), noise_std=0.0).sample(3, 4, 2, generator=ml.generator(0))
    assert (tasks.info["mode"] == 1).all() and tasks.support[0].shape == (3, 4, 1)


# --- benchmarks, smoke versions -----------------------------------------------------------------


def load_benchmark(name):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def finite(pair):
    return all(math.isfinite(v) for v in pair)


def test_lookahead_benchmark_smoke(capsys):
    bench = load_benchmark("mmtl_lookahead")
    report = bench.main(["--seeds", "1", "--steps", "5", "--n-aux", "30", "--n-test", "50", "--log-every", "2"])
    rows = {"single-task", "equal", "MAML + fine-tune", "learned k=1", "learned k=1 + refit", "learned k=3",
            "learned k=3 + refit", "oracle"}
    assert set(report["summary"]) == rows
    assert all(finite(row["mse"]) for row in report["summary"].values())
    assert len(report["per_seed"][0]["weight_history"]["learned k=3"]) == 3
    assert "primary test MSE" in capsys.readouterr().out


def test_tr_maml_benchmark_smoke(capsys):
    bench = load_benchmark("tr_maml")
    report = bench.main(["--seeds", "1", "--iterations", "5", "--test-tasks", "30", "--test-steps", "2"])
    assert set(report["summary"]) == {"MAML", "TR-MAML", "MTL pretrain"}
    for row in report["summary"].values():
        assert finite(row["mean_mse"]) and finite(row["worst_bin_mse"]) and len(row["bin_mse"]) == 10
    assert 0 <= report["summary"]["TR-MAML"]["p_hard"][0] <= 1
    assert "worst-bin MSE" in capsys.readouterr().out


def test_mmaml_benchmark_smoke(capsys):
    bench = load_benchmark("mmaml")
    report = bench.main(["--seeds", "1", "--iterations", "5", "--test-tasks", "12", "--steps", "2"])
    assert set(report["summary"]) == {"MMAML", "MAML", "MTL pretrain"}
    for row in report["summary"].values():
        assert finite(row["mse"]) and all(finite(row[f"mse_{m}"]) for m in ("sine", "linear", "quadratic"))
    assert "quadratic" in capsys.readouterr().out
