"""Task-aware modulation (mmtl_lib.mmaml): FiLM at the identity, the modulated meta-objective by
either backend, the meta-gradient reaching the encoder through the inner loop, and MMAML's tasks."""

import math

import torch
import torch.nn.functional as F
from torch.func import functional_call

import mmtl_lib as ml


def mmaml_setup(dtype=torch.float32):
    torch.manual_seed(0)
    model = ml.FiLMMLP(1, (8, 8), 1).to(dtype)
    encoder = ml.SetEncoder(1, 1, model.modulation_shapes(), hidden=8).to(dtype)
    tasks = ml.MultimodalFunctions(5, 6, dtype=dtype).sample(4, generator=ml.generator(0))
    return model, encoder, tasks


def move_off_identity(encoder):
    """A modulation away from the identity and different per task, so that it matters."""
    with torch.no_grad():
        encoder.out.weight.normal_(0, 0.3)
        encoder.out.bias.normal_(0, 0.3)


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
    # float64, so that agreement is exact up to summation order and any real difference shows.
    model, encoder, tasks = mmaml_setup(torch.float64)
    move_off_identity(encoder)
    learner = ml.MMAML(model, encoder, F.mse_loss, inner_lr=0.01, inner_steps=2, inner_grad_clip=5.0)
    params = dict(model.named_parameters())
    wrt = [*params.values(), *encoder.parameters()]
    results = {}
    for backend, chunk in (("loop", None), ("vmap", None), ("vmap", 3)):
        losses, predictions = ml.meta_loss(model, params, tasks, F.mse_loss, task_buffers=learner.task_buffers,
                                           inner_steps=2, inner_lr=0.01, inner_grad_clip=5.0, backend=backend,
                                           chunk_size=chunk)
        results[(backend, chunk)] = (losses, predictions, torch.autograd.grad(losses.mean(), wrt))
    l0, p0, g0 = results[("loop", None)]
    encoder_grads = dict(zip([n for n, _ in encoder.named_parameters()], g0[len(params):]))
    assert all(g.abs().sum() > 0 for g in encoder_grads.values())  # the encoder is in the comparison
    for key, (losses, predictions, grads) in results.items():
        assert torch.allclose(losses, l0, rtol=1e-10) and torch.allclose(predictions, p0, rtol=1e-10, atol=1e-12)
        for a, b in zip(grads, g0):
            assert torch.allclose(a, b, rtol=1e-8, atol=1e-12), key


def test_mmaml_meta_backward_is_the_gradient_of_the_modulated_meta_loss():
    model, encoder, tasks = mmaml_setup(torch.float64)
    move_off_identity(encoder)
    learner = ml.MMAML(model, encoder, F.mse_loss, inner_lr=0.01, inner_steps=2, inner_grad_clip=5.0)
    losses, _ = ml.meta_loss(model, dict(model.named_parameters()), tasks, F.mse_loss,
                             task_buffers=learner.task_buffers, inner_steps=2, inner_lr=0.01, inner_grad_clip=5.0)
    want = torch.autograd.grad(losses.mean(), learner.meta_parameters())
    for backend in ("loop", "vmap"):
        learner.backend = backend
        for p in learner.meta_parameters():
            p.grad = None
        got, _ = learner.meta_backward(tasks)
        assert torch.allclose(got, losses.detach(), rtol=1e-12)
        for p, w in zip(learner.meta_parameters(), want):
            assert torch.allclose(p.grad, w, rtol=1e-9, atol=1e-12), backend


def test_meta_gradient_reaches_the_encoder_through_the_inner_loop():
    model, encoder, tasks = mmaml_setup(torch.float64)
    move_off_identity(encoder)
    params = {k: v.detach() for k, v in model.named_parameters()}
    inner = dict(inner_steps=2, inner_lr=0.05)

    def modulation(enc, support):
        x, y = support
        return {k: v[0] for k, v in functional_call(encoder, enc, (x[None], y[None])).items()}

    def objective(enc):
        losses, _ = ml.meta_loss(model, params, tasks, F.mse_loss, task_buffers=lambda s: modulation(enc, s),
                                 backend="loop", **inner)
        return losses.sum()

    def objective_without_inner_path(enc):
        # the query pass sees the modulation, the inner loop only its value
        total = 0
        for i in range(tasks.n_tasks):
            task = tasks.task(i)
            buffers = modulation(enc, task.support)
            frozen = {k: v.detach() for k, v in buffers.items()}
            phi = ml.adapt(model, params, task.support, F.mse_loss, buffers=frozen, **inner)
            total = total + F.mse_loss(ml.forward(model, phi, task.query[0], buffers), task.query[1])
        return total

    enc = {k: v.detach().clone().requires_grad_() for k, v in encoder.named_parameters()}
    (got,) = torch.autograd.grad(objective(enc), enc["out.bias"])
    (cut,) = torch.autograd.grad(objective_without_inner_path(enc), enc["out.bias"])
    eps = 1e-6
    want = torch.zeros_like(got)
    for i in range(want.numel()):
        shifted = []
        for sign in (1, -1):
            e = {k: v.detach().clone() for k, v in enc.items()}
            e["out.bias"][i] += sign * eps
            shifted.append(objective(e).item())
        want[i] = (shifted[0] - shifted[1]) / (2 * eps)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-9)
    assert not torch.allclose(cut, want, rtol=1e-3)


def test_mmaml_trains_its_encoder_and_adapts_with_the_modulation_fixed():
    model, encoder, tasks = mmaml_setup()
    learner = ml.MMAML(model, encoder, F.mse_loss, inner_lr=0.01, inner_steps=2, inner_grad_clip=10.0)
    assert learner.name == "mmaml" and learner.backend == "vmap"
    assert len(learner.meta_parameters()) == len(list(model.parameters())) + len(list(encoder.parameters()))
    learner.meta_backward(tasks)
    assert encoder.out.weight.grad is not None and encoder.out.weight.grad.abs().sum() > 0
    support = tasks.task(0).support
    adapted = learner.adapt(support)
    modulation = encoder(support[0][None], support[1][None])
    assert set(adapted.buffers) == set(model.modulation_shapes())
    for k, v in adapted.buffers.items():
        assert torch.equal(v, modulation[k][0].detach())
    assert set(adapted.params) == {n for n, _ in model.named_parameters()}
    assert not torch.equal(adapted.params["head.weight"], model.head.weight)
    result = ml.evaluate(learner, tasks, inner_steps=[0, 2])
    assert result[2].shape == (4,) and torch.isfinite(result[2]).all()
    state = learner.state_dict()
    assert set(state) == {"model", "encoder"}


def test_multimodal_functions_hit_the_ends_of_the_papers_ranges():
    x = torch.linspace(-5, 5, 11)[None, :, None]
    zeros, ones = torch.zeros(1, 3), torch.ones(1, 3)
    target = ml.MultimodalFunctions.target
    assert torch.allclose(target(x, torch.tensor([0]), zeros), 0.1 * torch.sin(x))
    assert torch.allclose(target(x, torch.tensor([0]), ones), 5.0 * torch.sin(x - math.pi))
    assert torch.allclose(target(x, torch.tensor([1]), zeros), -3 * x - 3)
    assert torch.allclose(target(x, torch.tensor([1]), ones), 3 * x + 3)
    half = torch.full((1, 3), 0.5)
    assert torch.allclose(target(x, torch.tensor([2]), zeros), -0.15 * (x + 3) ** 2 - 3)
    assert torch.allclose(target(x, torch.tensor([2]), half), 0.02 * x**2)  # |a| >= 0.02 even at the middle
    tasks = ml.MultimodalFunctions(4, 2, modes=("linear",), noise_std=0.0).sample(3, generator=ml.generator(0))
    assert (tasks.info["mode"] == 1).all() and tasks.support[0].shape == (3, 4, 1)
    assert tasks.query[0].shape == (3, 2, 1)
