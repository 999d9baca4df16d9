"""The inner loop, its optimizers and the meta-gradients against independent references.

References: the closed form of MAML on linear regression, float64 central finite differences,
hand-written SGD and Adam, and hand-written autograd. Each test also checks that the reference can
tell second-order from first-order (or continued from restarted), so a silently wrong inner loop
fails here.
"""

import pytest
import torch
import torch.nn.functional as F
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


@pytest.mark.parametrize("inner_steps", [1, 2, 5])
def test_second_order_meta_gradient_matches_closed_form(inner_steps):
    # L(w) = mean((x w - y)^2) has gradient A w - b with A = 2 X^T X / n, b = 2 X^T y / n, so
    # k inner steps give dw_k/dw_0 = M^k, M = I - alpha A_s, and the meta-gradient is
    # M^k (A_q w_k - b_q); first-order MAML keeps only A_q w_k - b_q.
    model, w0, (xs, ys), (xq, yq) = linear_problem()
    alpha = 0.1
    a_s, b_s = 2 * xs.T @ xs / len(xs), 2 * xs.T @ ys / len(xs)
    a_q, b_q = 2 * xq.T @ xq / len(xq), 2 * xq.T @ yq / len(xq)
    m = torch.eye(4, dtype=torch.float64) - alpha * a_s
    w = w0.detach().T
    for _ in range(inner_steps):
        w = w - alpha * (a_s @ w - b_s)
    want = (torch.linalg.matrix_power(m, inner_steps) @ (a_q @ w - b_q)).T
    want_first_order = (a_q @ w - b_q).T

    def meta_gradient(first_order):
        adapted = ml.adapt(model, {"weight": w0}, (xs, ys), sse_mean, inner_steps=inner_steps, inner_lr=alpha,
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


def meta_objective(model, params, tasks, inner_steps, alpha=0.3, **inner):
    losses, _ = ml.meta_loss(model, params, tasks, sse_mean, inner_steps=inner_steps, inner_lr=alpha, **inner)
    return losses.mean()


def small_tasks(n_tasks=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tasks, 9, 2, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(-1, keepdim=True)) + 0.1 * torch.randn(n_tasks, 9, 1, generator=g, dtype=torch.float64)
    return ml.TaskBatch((x[:, :4], y[:, :4]), (x[:, 4:], y[:, 4:]))


def finite_differences(objective, params, eps=1e-6):
    """Central differences of ``objective(params)`` in every entry of every parameter."""
    out = {}
    for name, p in params.items():
        numeric = torch.zeros_like(p)
        for i in range(p.numel()):
            shifted = []
            for sign in (1, -1):
                q = {k: v.detach().clone() for k, v in params.items()}
                q[name].view(-1)[i] += sign * eps
                shifted.append(objective(q).item())
            numeric.view(-1)[i] = (shifted[0] - shifted[1]) / (2 * eps)
        out[name] = numeric
    return out


@pytest.mark.parametrize("inner_steps", [1, 3])
def test_meta_gradient_matches_central_finite_differences(inner_steps):
    model, tasks = tanh_mlp(), small_tasks()
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    grads = torch.autograd.grad(meta_objective(model, params, tasks, inner_steps), list(params.values()))
    numeric = finite_differences(lambda q: meta_objective(model, q, tasks, inner_steps), params)
    for (name, _), g in zip(params.items(), grads):
        assert torch.allclose(g, numeric[name], rtol=1e-6, atol=1e-8), name


@pytest.mark.parametrize("backend, kernel", [("loop", "fused"), ("vmap", "elementary"), ("compile", "elementary")])
def test_each_backends_batch_norm_kernel_gives_the_finite_difference_meta_gradient(backend, kernel, monkeypatch):
    # Conv4's BatchNorm runs the fused F.batch_norm in the eager loop and the elementary-op formula
    # under vmap and in the compile backend's graph (models.BatchNorm): the second-order
    # meta-gradient through each matches float64 central differences, entry by entry (the conv
    # biases' is 0: BatchNorm cancels them). The compile backend's graph is compiled by Inductor
    # (a minute on a busy 2-core CPU the first time, then from Inductor's cache).
    calls = []
    elementary, fused = ml.models.batch_norm_formula, torch.nn.functional.batch_norm
    monkeypatch.setattr(ml.models, "batch_norm_formula", lambda *a: calls.append("elementary") or elementary(*a))
    monkeypatch.setattr(torch.nn.functional, "batch_norm", lambda *a, **k: calls.append("fused") or fused(*a, **k))
    torch.manual_seed(0)
    model = ml.Conv4(2, filters=2, image_size=8).double()
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(2).repeat(2).expand(2, -1)
    tasks = ml.TaskBatch((torch.rand(2, 4, 1, 8, 8, generator=g, dtype=torch.float64), labels),
                         (torch.rand(2, 4, 1, 8, 8, generator=g, dtype=torch.float64), labels))
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}

    def objective(p, backend="loop"):
        losses, _ = ml.meta_loss(model, p, tasks, F.cross_entropy, inner_steps=1, inner_lr=0.5, backend=backend)
        return losses.mean()

    grads = torch.autograd.grad(objective(params, backend), list(params.values()))
    assert set(calls) == {kernel}
    numeric = finite_differences(objective, params)
    for (name, _), got in zip(params.items(), grads):
        assert torch.allclose(got, numeric[name], rtol=1e-5, atol=1e-8), name


def test_finite_differences_tell_first_order_apart():
    model, tasks = tanh_mlp(), small_tasks()
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    second = torch.autograd.grad(meta_objective(model, params, tasks, 3), list(params.values()))
    first = torch.autograd.grad(meta_objective(model, params, tasks, 3, first_order=True), list(params.values()))
    assert max((a - b).abs().max().item() for a, b in zip(second, first)) > 1e-3


def test_adapt_without_steps_taken_is_identity_on_unadapted_parameters():
    model = tanh_mlp()
    params = dict(model.named_parameters())
    tasks = small_tasks()
    adapted = ml.adapt(model, params, (tasks.support[0][0], tasks.support[1][0]), sse_mean,
                       inner_steps=2, inner_lr=0.1, adapt_names=["2.weight", "2.bias"])
    assert adapted["0.weight"] is params["0.weight"] and adapted["0.bias"] is params["0.bias"]
    assert not torch.equal(adapted["2.weight"], params["2.weight"])


def test_zero_inner_steps_returns_the_parameters_themselves():
    model, task = tanh_mlp(), small_tasks(n_tasks=1).task(0)
    params = dict(model.named_parameters())
    adapted = ml.adapt(model, params, task.support, sse_mean, inner_steps=0, inner_lr=0.1)
    assert adapted.keys() == params.keys() and all(adapted[k] is params[k] for k in params)


def test_meta_sgd_learning_rate_gradient_is_minus_support_times_query_gradient():
    # phi = theta - lr * g_s, so dL_q(phi)/dlr = -g_s * grad L_q(phi), elementwise.
    model, tasks = tanh_mlp(), small_tasks(n_tasks=1)
    task = tasks.task(0)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    lrs = {k: torch.full_like(v, 0.2).requires_grad_() for k, v in params.items()}
    adapted = ml.adapt(model, params, task.support, sse_mean, inner_steps=1, inner_lr=lrs)
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


def support_gradients(model, params, data):
    p = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    grads = torch.autograd.grad(sse_mean(model_call(model, p, data[0]), data[1]), list(p.values()))
    return dict(zip(p, grads))


# --- inner optimizers ----------------------------------------------------------------------------


def test_sgd_update_is_minus_lr_times_gradient():
    g = torch.Generator().manual_seed(0)
    grads = {"a": torch.randn(3, 2, generator=g, dtype=torch.float64), "b": torch.randn(4, generator=g,
                                                                                       dtype=torch.float64)}
    sgd = ml.sgd()
    state = sgd.init(grads)
    lr = {"a": 0.3, "b": torch.full((4,), 0.05, dtype=torch.float64)}
    updates, state = sgd.update(grads, state, lr)
    for k, grad in grads.items():
        assert torch.equal(updates[k], -lr[k] * grad)


def test_reptile_sgd_displacement_is_inner_lr_times_sum_of_inner_gradients():
    # The old Reptile SGD loop, phi <- phi - lr * g, written out by hand.
    model, tasks = tanh_mlp(), small_tasks(n_tasks=1)
    data = tasks.task(0).support
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    phi = ml.adapt(model, params, data, sse_mean, inner_steps=4, inner_lr=0.05, first_order=True,
                   optimizer=ml.sgd())
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    current = {k: v.clone() for k, v in params.items()}
    for _ in range(4):
        grads = support_gradients(model, current, data)
        for k, g in grads.items():
            total[k] += g
            current[k] = current[k] - 0.05 * g
    for k in params:
        assert torch.allclose(params[k] - phi[k], 0.05 * total[k], rtol=1e-10, atol=1e-14)


def reference_adam(gradient_of, params, steps, lr, betas, eps):
    """Kingma and Ba's Adam with bias correction, float64, one entry of the formulas per line."""
    beta1, beta2 = betas
    phi = {k: v.detach().clone() for k, v in params.items()}
    m = {k: torch.zeros_like(v) for k, v in phi.items()}
    v = {k: torch.zeros_like(p) for k, p in phi.items()}
    for t in range(1, steps + 1):
        grads = gradient_of(phi)
        for k, g in grads.items():
            m[k] = beta1 * m[k] + (1 - beta1) * g
            v[k] = beta2 * v[k] + (1 - beta2) * g**2
            m_hat = m[k] / (1 - beta1**t)
            v_hat = v[k] / (1 - beta2**t)
            phi[k] = phi[k] - lr * m_hat / (torch.sqrt(v_hat) + eps)
    return phi


def test_adam_updates_match_a_hand_written_adam_over_several_steps():
    g = torch.Generator().manual_seed(0)
    sequence = [{"a": torch.randn(3, 2, generator=g, dtype=torch.float64),
                 "b": torch.randn(4, generator=g, dtype=torch.float64)} for _ in range(6)]
    start = {k: torch.zeros_like(v) for k, v in sequence[0].items()}
    betas, eps, lr = (0.8, 0.99), 1e-3, 0.07
    grads = iter(sequence)
    want = reference_adam(lambda phi: next(grads), start, 6, lr, betas, eps)
    adam = ml.adam(betas=betas, eps=eps)
    state, got = adam.init(start), dict(start)
    for grads in sequence:
        updates, state = adam.update(grads, state, dict.fromkeys(start, lr))
        got = {k: got[k] + updates[k] for k in got}
    assert state["t"] == 6
    for k in start:
        assert torch.allclose(got[k], want[k], rtol=1e-12, atol=1e-15), k
    # the same gradients through SGD land elsewhere: the comparison can fail
    assert not torch.allclose(got["a"], -lr * sum(s["a"] for s in sequence), rtol=1e-3)


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.0, 0.999)])
def test_adam_in_adapt_matches_a_hand_written_adam_on_the_support_loss(betas):
    model, task = tanh_mlp(), small_tasks(n_tasks=1).task(0)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    got = ml.adapt(model, params, task.support, sse_mean, inner_steps=5, inner_lr=0.02,
                   optimizer=ml.adam(betas=betas, eps=1e-8))
    want = reference_adam(lambda phi: support_gradients(model, phi, task.support), params, 5, 0.02, betas, 1e-8)
    for k in params:
        assert torch.allclose(got[k], want[k], rtol=1e-12, atol=1e-15), k


def test_reptile_adam_first_step_moves_every_entry_by_inner_lr():
    # Adam's first bias-corrected step is lr * g / (|g| + eps): each entry moves by ~lr.
    model, tasks = tanh_mlp(), small_tasks(n_tasks=1)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    phi = ml.adapt(model, params, tasks.task(0).support, sse_mean, inner_steps=1, inner_lr=0.01, first_order=True,
                   optimizer=ml.adam(betas=(0.0, 0.999), eps=1e-12))
    for k in params:
        assert torch.allclose((params[k] - phi[k]).abs(), torch.full_like(phi[k], 0.01), rtol=1e-6)


@pytest.mark.parametrize("inner_steps", [2, 3])
def test_second_order_meta_gradient_through_adam_matches_central_finite_differences(inner_steps):
    model, tasks = tanh_mlp(), small_tasks()
    adam = ml.adam(betas=(0.9, 0.99), eps=1e-8)
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}

    def objective(p, first_order=False):
        return meta_objective(model, p, tasks, inner_steps, alpha=0.05, optimizer=adam, first_order=first_order)

    grads = torch.autograd.grad(objective(params), list(params.values()))
    numeric = finite_differences(objective, params)
    for (name, _), g in zip(params.items(), grads):
        assert torch.allclose(g, numeric[name], rtol=1e-6, atol=1e-8), name
    first = torch.autograd.grad(objective(params, first_order=True), list(params.values()))
    assert max((a - b).abs().max().item() for a, b in zip(grads, first)) > 1e-3


def test_second_order_adam_survives_a_zero_gradient_entry():
    # d sqrt(v)/dv is infinite at v = 0: a support-gradient entry that is exactly 0 (a BatchNorm-ed
    # conv bias, a dead ReLU) made the whole second-order meta-gradient through ml.adam NaN.
    # The loss does not depend on w[1]: its inner gradient is exactly 0 and Adam leaves it alone,
    # so d phi / d w is finite: [1 - O(eps), 1].
    model = nn.Linear(2, 1, bias=False).double()
    w = torch.tensor([[1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    support = (torch.tensor([[1.0, 0.0]], dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64))
    phi = ml.adapt(model, {"weight": w}, support, sse_mean, inner_steps=1, inner_lr=0.1, optimizer=ml.adam())
    (grad,) = torch.autograd.grad(phi["weight"].sum(), w)
    assert torch.isfinite(grad).all()
    assert grad[0, 1] == 1.0  # w[1] passes through the step untouched


def test_inner_loop_yields_every_state_from_the_parameters_to_adapts_result():
    model, task = tanh_mlp(), small_tasks(n_tasks=1).task(0)
    params = dict(model.named_parameters())
    inner = dict(inner_steps=4, inner_lr=0.02, optimizer=ml.adam(), inner_batch_size=3)
    states = list(ml.inner_loop(model, params, task.support, sse_mean, generator=ml.generator(5), **inner))
    assert len(states) == 5
    assert all(states[0][k] is params[k] for k in params)
    last = ml.adapt(model, params, task.support, sse_mean, generator=ml.generator(5), **inner)
    assert all(torch.equal(states[-1][k], last[k]) for k in params)
    assert all(not torch.equal(a["0.weight"], b["0.weight"]) for a, b in zip(states, states[1:]))
    # mini-batches follow the generator: another seed, another path
    other = ml.adapt(model, params, task.support, sse_mean, generator=ml.generator(6), **inner)
    assert not torch.equal(other["0.weight"], last["0.weight"])


def test_inner_loop_checks_its_arguments_when_called():
    model, task = tanh_mlp(), small_tasks(n_tasks=1).task(0)
    with pytest.raises(ml.ConfigError, match=r"inner_steps = -1 is not allowed"):
        ml.inner_loop(model, dict(model.named_parameters()), task.support, sse_mean, inner_steps=-1, inner_lr=0.1)
    with pytest.raises(ml.ConfigError, match=r"optimizer = 'adam' is not allowed"):
        ml.inner_loop(model, dict(model.named_parameters()), task.support, sse_mean, inner_steps=1, inner_lr=0.1,
                      optimizer="adam")


@pytest.mark.parametrize("kw, match", [
    (dict(betas=(1.0, 0.999)), r"betas\[0\] = 1.0 is not allowed"),
    (dict(betas=(0.9, -0.1)), r"betas\[1\] = -0.1 is not allowed"),
    (dict(eps=0.0), r"eps = 0.0 is not allowed"),
])
def test_adam_refuses_bad_hyperparameters_by_name(kw, match):
    with pytest.raises(ml.ConfigError, match=match):
        ml.adam(**kw)


def test_reptile_meta_gradient_averages_task_displacements():
    model, tasks = tanh_mlp(), small_tasks(n_tasks=3)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    data = list(zip(*tasks.support))
    direction, phis = ml.reptile_meta_gradient(model, params, data, sse_mean, inner_steps=2, inner_lr=0.1)
    for k in params:
        want = torch.stack([params[k] - phi[k] for phi in phis]).mean(0)
        assert torch.allclose(direction[k], want, rtol=1e-12)
    # With one inner step Reptile's direction is alpha times the joint-training gradient.
    direction, _ = ml.reptile_meta_gradient(model, params, data, sse_mean, inner_steps=1, inner_lr=0.1)
    p = {k: v.clone().requires_grad_() for k, v in params.items()}
    joint = sum(sse_mean(model_call(model, p, x), y) for x, y in data) / len(data)
    for (k, _), g in zip(p.items(), torch.autograd.grad(joint, list(p.values()))):
        assert torch.allclose(direction[k], 0.1 * g, rtol=1e-10, atol=1e-14)
    with pytest.raises(ml.ConfigError, match="task_data is empty"):
        ml.reptile_meta_gradient(model, params, [], sse_mean, inner_steps=1, inner_lr=0.1)
