"""Task weights learned by looking ahead (mmtl_lib.lookahead) against a closed form, finite
differences and a problem whose answer is known."""

import pytest
import torch
from torch import nn

import mmtl_lib as ml


def grads(loss, params):
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


def dot(a, b):
    return sum((a[k] * b[k]).sum() for k in a)


def multitask_problem(n_tasks=3, seed=0, hidden=(6,)):
    """A float64 multi-head regressor ``MLP(3, hidden, T)``, a training batch of every task and
    held-out examples of task 0."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ml.MLP(3, hidden, n_tasks).double()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    task = torch.arange(30) % n_tasks
    x = torch.randn(30, 3, generator=g, dtype=torch.float64)
    train = (x, ml.pack_targets(torch.randn(30, generator=g, dtype=torch.float64), task, n_tasks))
    xv = torch.randn(8, 3, generator=g, dtype=torch.float64)
    val = (xv, ml.pack_targets(torch.randn(8, generator=g, dtype=torch.float64), torch.zeros(8, dtype=torch.long),
                               n_tasks))
    return model, params, train, val


def test_task_losses_score_each_example_with_its_own_head_only():
    prediction = torch.tensor([[1.0, 5.0], [2.0, 7.0], [9.0, 3.0]])
    packed = ml.pack_targets(torch.tensor([0.0, 1.0, 1.0]), torch.tensor([0, 0, 1]), 2)
    assert packed.shape == (3, 3)
    want = torch.tensor([(1.0 + 1.0) / 2, 4.0])  # task 0: (1-0)^2, (2-1)^2; task 1: (3-1)^2
    assert torch.equal(ml.task_losses(prediction, packed), want)
    # a task without examples in the batch contributes 0, not NaN
    assert torch.equal(ml.task_losses(prediction[:2], packed[:2]), torch.tensor([1.0, 0.0]))
    with pytest.raises(ml.ConfigError, match="task ids span"):
        ml.pack_targets(torch.zeros(2), torch.tensor([0, 2]), 2)


def test_one_step_hypergradient_is_minus_alpha_val_gradient_dot_task_gradient():
    # d L_val(theta') / d lambda_j = -alpha grad L_val(theta') . grad L_j(theta),
    # theta' = theta - alpha grad sum_t lambda_t L_t(theta)
    model, params, train, val = multitask_problem()
    alpha = 0.3
    weights = torch.tensor([0.7, 0.2, 1.3], dtype=torch.float64, requires_grad=True)
    loss = ml.lookahead_loss(model, params, weights, train, val, inner_steps=1, inner_lr=alpha)
    (got,) = torch.autograd.grad(loss, weights)

    adapted = ml.adapt(model, params, train, ml.weighted_loss(weights.detach()), inner_steps=1, inner_lr=alpha)
    adapted = {k: v.detach().requires_grad_() for k, v in adapted.items()}
    g_val = grads(ml.task_losses(ml.forward(model, adapted, val[0]), val[1])[0], adapted)
    theta = {k: v.clone().requires_grad_() for k, v in params.items()}
    g_task = [grads(ml.task_losses(ml.forward(model, theta, train[0]), train[1])[j], theta) for j in range(3)]
    want = torch.stack([-alpha * dot(g_val, g) for g in g_task])
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-14)

    # the validation gradient must be taken after the step: at theta itself the rule is off
    g_val_before = grads(ml.task_losses(ml.forward(model, theta, val[0]), val[1])[0], theta)
    at_theta = torch.stack([-alpha * dot(g_val_before, g) for g in g_task])
    assert not torch.allclose(got, at_theta, rtol=1e-3)


def test_multi_step_hypergradient_matches_central_finite_differences():
    model, params, train, val = multitask_problem(seed=1)
    weights = torch.tensor([0.5, 0.9, 0.1], dtype=torch.float64, requires_grad=True)

    def loss(w):
        return ml.lookahead_loss(model, params, w, train, val, inner_steps=3, inner_lr=0.2)

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
    train = (torch.cat([x[0][:20], x[1], x[2]]), ml.pack_targets(torch.cat([y[0][:20], y[1], y[2]]), task, 3))
    val = (x[0][20:], ml.pack_targets(y[0][20:], torch.zeros(20, dtype=torch.long), 3))
    torch.manual_seed(1)
    model = SharedOutput(3)
    weights = ml.LookaheadWeights(3, init=0.1, lr=0.01, inner_steps=1, inner_lr=0.1)
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
    with pytest.raises(ml.ConfigError, match="must be >= 0"):
        ml.LookaheadWeights(2, init=[0.1, -0.1])
    with pytest.raises(ml.ConfigError, match="primary = 3"):
        ml.LookaheadWeights(2, primary=3)
    for kw, name in ((dict(lr=0), "lr = 0"), (dict(inner_steps=0), "inner_steps = 0"),
                     (dict(inner_lr=float("inf")), "inner_lr = inf"), (dict(inner_grad_clip=0), "inner_grad_clip = 0"),
                     (dict(n_tasks=0), "n_tasks = 0")):
        with pytest.raises(ml.ConfigError, match=name):
            ml.LookaheadWeights(**{"n_tasks": 2, **kw})
