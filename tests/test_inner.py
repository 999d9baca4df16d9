"""The inner loop and the MAML meta-gradient against independent references.

References: the closed form of MAML on linear regression, float64 central finite differences,
and hand-written autograd. Each test also checks that the reference can tell second-order from
first-order, so a silently first-order inner loop fails here.
"""

import pytest
import torch
from torch import nn

import mmtl_lib as ml

torch.set_default_dtype(torch.float32)


def sse_mean(pred, y):
    return ((pred - y) ** 2).mean()


def linear_problem(d=4, n_s=6, n_q=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(d, 1, bias=False).double()
    w0 = torch.randn(1, d, generator=g, dtype=torch.float64, requires_grad=True)
    xs, xq = (torch.randn(n, d, generator=g, dtype=torch.float64) for n in (n_s, n_q))
    ys, yq = (torch.randn(n, 1, generator=g, dtype=torch.float64) for n in (n_s, n_q))
    return model, w0, (xs, ys), (xq, yq)


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_second_order_meta_gradient_matches_closed_form(steps):
    # L(w) = mean((x w - y)^2) has gradient A w - b with A = 2 X^T X / n, b = 2 X^T y / n, so
    # k inner steps give dw_k/dw_0 = M^k, M = I - alpha A_s, and the meta-gradient is
    # M^k (A_q w_k - b_q); first-order MAML keeps only A_q w_k - b_q.
    model, w0, (xs, ys), (xq, yq) = linear_problem()
    alpha = 0.1
    a_s, b_s = 2 * xs.T @ xs / len(xs), 2 * xs.T @ ys / len(xs)
    a_q, b_q = 2 * xq.T @ xq / len(xq), 2 * xq.T @ yq / len(xq)
    m = torch.eye(4, dtype=torch.float64) - alpha * a_s
    w = w0.detach().T
    for _ in range(steps):
        w = w - alpha * (a_s @ w - b_s)
    want = (torch.linalg.matrix_power(m, steps) @ (a_q @ w - b_q)).T
    want_first_order = (a_q @ w - b_q).T

    def meta_gradient(first_order):
        adapted = ml.adapt(model, {"weight": w0}, (xs, ys), sse_mean, steps=steps, inner_lr=alpha,
                           first_order=first_order)
        loss = sse_mean(ml.forward(model, adapted, xq), yq)
        return torch.autograd.grad(loss, w0)[0]

    got, got_first_order = meta_gradient(False), meta_gradient(True)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    assert torch.allclose(got_first_order, want_first_order, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(got, got_first_order, rtol=1e-3)


def tanh_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 1)).double()


def meta_objective(model, params, tasks, steps, alpha=0.3):
    losses, _ = ml.meta_loss(model, params, tasks, sse_mean, steps=steps, inner_lr=alpha)
    return losses.mean()


def small_tasks(n_tasks=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tasks, 9, 2, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(-1, keepdim=True)) + 0.1 * torch.randn(n_tasks, 9, 1, generator=g, dtype=torch.float64)
    return ml.TaskBatch((x[:, :4], y[:, :4]), (x[:, 4:], y[:, 4:]))


@pytest.mark.parametrize("steps", [1, 3])
def test_meta_gradient_matches_central_finite_differences(steps):
    model, tasks = tanh_mlp(), small_tasks()
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    grads = torch.autograd.grad(meta_objective(model, params, tasks, steps), list(params.values()))
    eps = 1e-6
    for (name, p), g in zip(params.items(), grads):
        numeric = torch.zeros_like(p)
        for i in range(p.numel()):
            shifted = []
            for sign in (1, -1):
                q = {k: v.detach().clone() for k, v in params.items()}
                q[name].view(-1)[i] += sign * eps
                shifted.append(meta_objective(model, q, tasks, steps).item())
            numeric.view(-1)[i] = (shifted[0] - shifted[1]) / (2 * eps)
        assert torch.allclose(g, numeric, rtol=1e-6, atol=1e-8), name


def test_finite_differences_tell_first_order_apart():
    model, tasks = tanh_mlp(), small_tasks()
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    second = torch.autograd.grad(meta_objective(model, params, tasks, 3), list(params.values()))
    losses, _ = ml.meta_loss(model, params, tasks, sse_mean, steps=3, inner_lr=0.3, first_order=True)
    first = torch.autograd.grad(losses.mean(), list(params.values()))
    assert max((a - b).abs().max().item() for a, b in zip(second, first)) > 1e-3


def test_adapt_without_steps_taken_is_identity_on_unadapted_parameters():
    model = tanh_mlp()
    params = dict(model.named_parameters())
    tasks = small_tasks()
    adapted = ml.adapt(model, params, (tasks.support[0][0], tasks.support[1][0]), sse_mean,
                       steps=2, inner_lr=0.1, adapt_names=["2.weight", "2.bias"])
    assert adapted["0.weight"] is params["0.weight"] and adapted["0.bias"] is params["0.bias"]
    assert not torch.equal(adapted["2.weight"], params["2.weight"])


def test_meta_sgd_learning_rate_gradient_is_minus_support_times_query_gradient():
    # phi = theta - lr * g_s, so dL_q(phi)/dlr = -g_s * grad L_q(phi), elementwise.
    model, tasks = tanh_mlp(), small_tasks(n_tasks=1)
    task = tasks.task(0)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    lrs = {k: torch.full_like(v, 0.2).requires_grad_() for k, v in params.items()}
    adapted = ml.adapt(model, params, task.support, sse_mean, steps=1, inner_lr=lrs)
    got = torch.autograd.grad(sse_mean(ml.forward(model, adapted, task.query[0]), task.query[1]),
                              list(lrs.values()))
    p = {k: v.clone().requires_grad_() for k, v in params.items()}
    g_s = torch.autograd.grad(sse_mean(model_call(model, p, task.support[0]), task.support[1]), list(p.values()))
    phi = {k: (v - 0.2 * g).detach().requires_grad_() for (k, v), g in zip(params.items(), g_s)}
    g_q = torch.autograd.grad(sse_mean(model_call(model, phi, task.query[0]), task.query[1]), list(phi.values()))
    for a, gs, gq in zip(got, g_s, g_q):
        assert torch.allclose(a, -gs * gq, rtol=1e-10, atol=1e-14)


def model_call(model, params, x):
    return torch.func.functional_call(model, params, (x,))


@pytest.mark.parametrize("optimizer", ["sgd"])
def test_reptile_sgd_displacement_is_inner_lr_times_sum_of_inner_gradients(optimizer):
    model, tasks = tanh_mlp(), small_tasks(n_tasks=1)
    data = tasks.task(0).support
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    phi = ml.reptile_adapt(model, params, data, sse_mean, steps=4, inner_lr=0.05, inner_optimizer=optimizer)
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    current = {k: v.clone() for k, v in params.items()}
    for _ in range(4):
        p = {k: v.clone().requires_grad_() for k, v in current.items()}
        grads = torch.autograd.grad(sse_mean(model_call(model, p, data[0]), data[1]), list(p.values()))
        for (k, v), g in zip(current.items(), grads):
            total[k] += g
            current[k] = v - 0.05 * g
    for k in params:
        assert torch.allclose(params[k] - phi[k], 0.05 * total[k], rtol=1e-10, atol=1e-14)


def test_reptile_adam_first_step_moves_every_entry_by_inner_lr():
    # Adam's first bias-corrected step is lr * g / (|g| + eps): each entry moves by ~lr.
    model, tasks = tanh_mlp(), small_tasks(n_tasks=1)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    phi = ml.reptile_adapt(model, params, tasks.task(0).support, sse_mean, steps=1, inner_lr=0.01,
                           inner_optimizer="adam", eps=1e-12)
    for k in params:
        assert torch.allclose((params[k] - phi[k]).abs(), torch.full_like(phi[k], 0.01), rtol=1e-6)


def test_reptile_meta_gradient_averages_task_displacements():
    model, tasks = tanh_mlp(), small_tasks(n_tasks=3)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    data = list(zip(*tasks.support))
    direction, phis = ml.reptile_meta_gradient(model, params, data, sse_mean, steps=2, inner_lr=0.1)
    for k in params:
        want = torch.stack([params[k] - phi[k] for phi in phis]).mean(0)
        assert torch.allclose(direction[k], want, rtol=1e-12)
    # With one inner step Reptile's direction is alpha times the joint-training gradient.
    direction, _ = ml.reptile_meta_gradient(model, params, data, sse_mean, steps=1, inner_lr=0.1)
    p = {k: v.clone().requires_grad_() for k, v in params.items()}
    joint = sum(sse_mean(model_call(model, p, x), y) for x, y in data) / len(data)
    for (k, _), g in zip(p.items(), torch.autograd.grad(joint, list(p.values()))):
        assert torch.allclose(direction[k], 0.1 * g, rtol=1e-10, atol=1e-14)
