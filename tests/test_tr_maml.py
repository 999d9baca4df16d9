"""Task-robust MAML (mmtl_lib.tr_maml): the simplex projection against brute force, TR-MAML
against MAML at uniform weights, and its finite task set."""

import pytest
import torch
import torch.nn.functional as F

import mmtl_lib as ml


def bisection_projection(v, iterations=200):
    """The projection by another route: find tau with sum(max(v - tau, 0)) = 1 by bisection."""
    low, high = v.min() - 1, v.max()
    for _ in range(iterations):
        tau = (low + high) / 2
        low, high = (tau, high) if (v - tau).clamp(min=0).sum() > 1 else (low, tau)
    return (v - (low + high) / 2).clamp(min=0)


def test_project_simplex_lands_on_the_simplex_and_is_idempotent():
    v = torch.randn(50, 7, dtype=torch.float64, generator=ml.generator(0)) * 3
    p = ml.project_simplex(v)
    assert (p >= 0).all() and torch.allclose(p.sum(-1), torch.ones(50, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(ml.project_simplex(p), p, atol=1e-12)


@pytest.mark.parametrize("v, want", [
    ([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]),  # already on the simplex
    ([2.0, 0.0], [1.0, 0.0]),
    ([0.7, 0.6], [0.55, 0.45]),
    ([-1.0, -1.0, -1.0], [1 / 3, 1 / 3, 1 / 3]),
    ([5.0, 1.0, 4.6], [0.7, 0.0, 0.3]),
])
def test_project_simplex_known_cases(v, want):
    got = ml.project_simplex(torch.tensor(v, dtype=torch.float64))
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-12)


def test_project_simplex_is_the_nearest_point_of_the_simplex():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        v = torch.randn(6, generator=g, dtype=torch.float64) * 2
        p = ml.project_simplex(v)
        assert torch.allclose(p, bisection_projection(v), atol=1e-12)
        # no other point of the simplex is closer (random points from a Dirichlet(1) distribution)
        others = -torch.rand(2000, 6, generator=g, dtype=torch.float64).log()
        others = others / others.sum(1, keepdim=True)
        assert ((others - v).norm(dim=1) >= (p - v).norm() - 1e-12).all()


def test_project_simplex_is_invariant_to_adding_a_constant():
    v = torch.randn(4, 9, dtype=torch.float64, generator=ml.generator(1))
    assert torch.allclose(ml.project_simplex(v + 3.7), ml.project_simplex(v), atol=1e-12)


def test_project_simplex_refuses_an_empty_vector():
    with pytest.raises(ml.ConfigError, match=r"v has shape \(0,\)"):
        ml.project_simplex(torch.zeros(0))


def sine_learners(n_tasks=100, **kw):
    torch.manual_seed(0)
    maml_model = ml.MLP(1, (8, 8), 1)
    tr_model = ml.MLP(1, (8, 8), 1)
    tr_model.load_state_dict(maml_model.state_dict())
    kw = {"inner_lr": 0.01, "inner_steps": 1, **kw}
    return ml.MAML(maml_model, F.mse_loss, **kw), ml.TRMAML(tr_model, F.mse_loss, n_tasks=n_tasks, p_lr=0.01, **kw)


@pytest.mark.parametrize("backend", ["loop", "vmap"])
def test_tr_maml_at_uniform_weights_takes_maml_gradient_then_raises_weight_of_worst_task(backend):
    # 8 tasks out of N = 64: the weights (N / |B|) p_i = 8 * 2^-6 are 1 / |B| exactly in floating
    # point, so TR-MAML's first step is MAML's to the last bit.
    task_set = ml.SinusoidTaskSet.imbalanced(5, 5, n_easy=60, n_hard=4)
    tasks = task_set.sample(8, generator=ml.generator(0))
    maml, tr = sine_learners(task_set.n_tasks, backend=backend)
    assert torch.equal(tr.task_weights(tasks), maml.task_weights(tasks))
    losses, _ = maml.meta_backward(tasks)
    tr_losses, _ = tr.meta_backward(tasks)
    assert torch.equal(losses, tr_losses)
    for p, q in zip(maml.model.parameters(), tr.model.parameters()):
        assert torch.equal(p.grad, q.grad)
    assert torch.allclose(tr.p.sum(), torch.tensor(1.0)) and (tr.p >= 0).all()
    ids = tasks.info["task_id"]
    worst = ids[losses.argmax()]
    assert tr.p[worst] == tr.p.max() > 1 / task_set.n_tasks
    unseen = torch.ones(task_set.n_tasks, dtype=torch.bool)
    unseen[ids] = False
    assert (tr.p[unseen] < 1 / task_set.n_tasks).all()  # the projection shifts weight away from them
    # the next meta-batch is weighted by the new p: TR-MAML and MAML part ways
    maml.model.zero_grad()
    tr.model.zero_grad()
    maml.meta_backward(tasks)
    tr.meta_backward(tasks)
    assert not torch.allclose(maml.model.head.weight.grad, tr.model.head.weight.grad, rtol=1e-3)
    state = tr.state_dict()
    _, fresh = sine_learners(task_set.n_tasks)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.p, tr.p)


def test_tr_maml_needs_task_ids():
    _, tr = sine_learners(4)
    with pytest.raises(ml.ConfigError, match="task_id"):
        tr.meta_backward(ml.Sinusoid(5, 5).sample(2))


def test_imbalanced_task_set_has_95_easy_and_5_rare_hard_tasks():
    task_set = ml.SinusoidTaskSet.imbalanced(3, 2)
    assert task_set.n_tasks == 100
    assert torch.allclose(task_set.bands[:95].flatten().aminmax()[0], torch.tensor(0.1, dtype=torch.float64))
    assert task_set.bands[94, 1].item() == pytest.approx(1.05) and task_set.bands[95, 0].item() == pytest.approx(4.05)
    tasks = task_set.sample(500, generator=ml.generator(1))
    ids, amplitude = tasks.info["task_id"], tasks.info["amplitude"].double()
    assert ((amplitude >= task_set.bands[ids, 0] - 1e-6) & (amplitude <= task_set.bands[ids, 1] + 1e-6)).all()
    assert tasks.support[0].shape == (500, 3, 1) and tasks.query[1].shape == (500, 2, 1)
    assert torch.allclose(tasks.support[1], tasks.info["amplitude"][:, None, None]
                          * torch.sin(tasks.support[0] - tasks.info["phase"][:, None, None]))


def test_task_set_refuses_bad_bands():
    with pytest.raises(ml.ConfigError, match="amplitude_bands"):
        ml.SinusoidTaskSet(torch.tensor([[2.0, 1.0]]), 3, 2)
    with pytest.raises(ml.ConfigError, match="n_easy = 0"):
        ml.SinusoidTaskSet.imbalanced(3, 2, n_easy=0)


def test_tr_maml_keeps_its_weights_when_the_meta_loss_is_not_finite():
    # The trainer stops on a non-finite loss and saves the last good state; p is part of it.
    task_set = ml.SinusoidTaskSet.imbalanced(5, 5)
    _, tr = sine_learners(task_set.n_tasks, inner_lr=1e30)
    before = tr.p.clone()
    losses, _ = tr.meta_backward(task_set.sample(8, generator=ml.generator(0)))
    assert not torch.isfinite(losses).all()
    assert torch.equal(tr.p, before)
