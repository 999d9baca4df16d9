"""Recomputed inner steps (gradient checkpointing): the same meta-gradient as the stored graph, to
float64 round-off, on both backends and through every inner-loop option; less memory, measured by
``benchmarks/memory.py``'s exact measures; bad combinations refused by name."""

import importlib
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import conv4, image_tasks
from torch import nn

import mmtl_lib as ml

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def double(tasks):
    return ml.TaskBatch((tasks.support[0].double(), tasks.support[1]), (tasks.query[0].double(), tasks.query[1]))


def meta_gradient(model, params, tasks, wrt=(), **kw):
    """Losses and the gradient of their mean w.r.t. ``params`` (and ``wrt``) through ``meta_loss``."""
    losses, _ = ml.meta_loss(model, params, tasks, F.cross_entropy, **kw)
    return losses, torch.autograd.grad(losses.mean(), list(params.values()) + list(wrt))


def assert_same_gradients(got, want, rtol=1e-10):
    # Relative to the largest entry: conv biases before BatchNorm have meta-gradients that are 0
    # up to rounding, where only a scale-aware tolerance makes sense.
    scale = max(w.abs().max().item() for w in want)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("backend", ["loop", "vmap"])
@pytest.mark.parametrize("inner_steps", [1, 2, 3, 4, 5])
def test_recomputed_steps_give_the_stored_second_order_meta_gradient(inner_steps, backend):
    model, tasks = conv4().double(), double(image_tasks())
    params = dict(model.named_parameters())
    kw = dict(inner_steps=inner_steps, inner_lr=0.4, backend=backend)
    stored_losses, stored = meta_gradient(model, params, tasks, **kw)
    losses, recomputed = meta_gradient(model, params, tasks, recompute=True, **kw)
    assert torch.equal(losses, stored_losses)  # the forward pass runs the same operations
    assert_same_gradients(recomputed, stored)
    _, first = meta_gradient(model, params, tasks, first_order=True, **kw)
    assert max((a - b).abs().max().item() for a, b in zip(first, stored)) > 1e-3  # second order, not first


def tanh_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 9, 2, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(-1, keepdim=True))
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    return model, params, ml.TaskBatch((x[:, :4], y[:, :4]), (x[:, 4:], y[:, 4:]))


def mse(prediction, y):
    return ((prediction - y) ** 2).mean()


def test_recomputed_meta_gradient_matches_central_finite_differences():
    model, params, tasks = tanh_problem()

    def objective(p):
        return ml.meta_loss(model, p, tasks, mse, inner_steps=3, inner_lr=0.3, recompute=True)[0].mean()

    grads = torch.autograd.grad(objective(params), list(params.values()))
    for (name, p), g in zip(params.items(), grads):
        numeric = torch.zeros_like(p)
        for i in range(p.numel()):
            shifted = []
            for sign in (1, -1):
                q = {k: v.detach().clone() for k, v in params.items()}
                q[name].view(-1)[i] += sign * 1e-6
                shifted.append(objective(q).item())
            numeric.view(-1)[i] = (shifted[0] - shifted[1]) / 2e-6
        assert torch.allclose(g, numeric, rtol=1e-6, atol=1e-8), name


@pytest.mark.parametrize("backend", ["loop", "vmap"])
def test_recomputed_steps_can_be_differentiated_twice(backend):
    # The gradient of the squared meta-gradient norm: the recomputation's backward is itself
    # recorded when the outer backward asks for a graph.
    model, params, tasks = tanh_problem()
    out = []
    for recompute in (False, True):
        losses, _ = ml.meta_loss(model, params, tasks, mse, inner_steps=3, inner_lr=0.3, recompute=recompute,
                                 backend=backend)
        grads = torch.autograd.grad(losses.mean(), list(params.values()), create_graph=True)
        out.append(torch.autograd.grad(sum((g * g).sum() for g in grads), list(params.values())))
    assert_same_gradients(out[1], out[0])


@pytest.mark.parametrize("variant", ["adam", "clip", "anil", "meta_sgd", "lslr", "per_step_batch_norm",
                                     "inner_batch_size"])
def test_recomputed_steps_agree_through_every_inner_loop_option(variant):
    model = conv4(bn_steps=3 if variant == "per_step_batch_norm" else None).double()
    tasks = double(image_tasks(k_shot=2))
    params = dict(model.named_parameters())
    kw, wrt, rtol = dict(inner_steps=3, inner_lr=0.4), [], 1e-10
    if variant == "adam":
        kw.update(inner_lr=0.01, optimizer=ml.adam())
        rtol = 1e-8  # Adam's division by sqrt(v) amplifies the round-off of another summation order
    elif variant == "clip":
        kw["inner_grad_clip"] = 0.1
    elif variant == "anil":
        kw["adapt_names"] = ml.head_names(model)
    elif variant == "meta_sgd":
        kw["inner_lr"] = {k: torch.full_like(v, 0.4, requires_grad=True) for k, v in params.items()}
        wrt = list(kw["inner_lr"].values())
    elif variant == "lslr":
        rates = {k: torch.full((3,), 0.4, dtype=torch.float64, requires_grad=True) for k in params}
        kw["inner_lr"] = [{k: r[j] for k, r in rates.items()} for j in range(3)]
        wrt = list(rates.values())
    elif variant == "per_step_batch_norm":
        kw["step_buffers"] = ml.models.step_buffers(model)
    elif variant == "inner_batch_size":
        # meta_loss has no generator argument; adapt one task directly, mini-batches of 3 of 6
        task = tasks.task(0)
        out = []
        for recompute in (False, True):
            phi = ml.adapt(model, params, task.support, F.cross_entropy, inner_steps=3, inner_lr=0.4,
                           inner_batch_size=3, generator=ml.generator(0), recompute=recompute)
            loss = F.cross_entropy(ml.forward(model, phi, task.query[0]), task.query[1])
            out.append(torch.autograd.grad(loss, list(params.values())))
        assert_same_gradients(out[1], out[0])
        return
    stored_losses, stored = meta_gradient(model, params, tasks, wrt, **kw)
    losses, recomputed = meta_gradient(model, params, tasks, wrt, recompute=True, **kw)
    assert torch.equal(losses, stored_losses)
    assert_same_gradients(recomputed, stored, rtol)


def test_inner_loop_yields_the_same_states_when_recomputing():
    model, params, tasks = tanh_problem()
    task = tasks.task(0)
    stored = list(ml.inner_loop(model, params, task.support, mse, inner_steps=4, inner_lr=0.1, optimizer=ml.adam()))
    recomputed = list(ml.inner_loop(model, params, task.support, mse, inner_steps=4, inner_lr=0.1,
                                    optimizer=ml.adam(), recompute=True))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(stored, recomputed) for k in params)


@pytest.mark.parametrize("backend", ["loop", "vmap"])
def test_maml_recompute_inner_fills_the_same_grad(backend):
    tasks = image_tasks()
    grads = []
    for recompute in (False, True):
        learner = ml.MAML(conv4(), F.cross_entropy, inner_lr=0.4, inner_steps=3, backend=backend,
                          recompute_inner=recompute)
        learner.meta_backward(tasks)
        grads.append([p.grad for p in learner.meta_parameters()])
    assert_same_gradients(grads[1], grads[0], rtol=1e-5)  # float32


def test_maml_plus_plus_recomputes_only_once_second_order():
    # first_order_iterations: the first meta-iteration is first order, where there is nothing to
    # recompute; recompute_inner must not make it fail.
    tasks = image_tasks()
    learner = ml.MAML(conv4(bn_steps=2), F.cross_entropy, inner_lr=0.4, inner_steps=2, learn_step_lrs=True,
                      first_order_iterations=1, recompute_inner=True)
    for _ in range(2):
        losses, _ = learner.meta_backward(tasks)
        assert torch.isfinite(losses).all()
    assert learner.meta_iteration == 2


# --- the memory it saves, measured --------------------------------------------------------------


@pytest.fixture
def memory(monkeypatch):
    """``benchmarks/memory.py``, imported as its script imports (``common`` from its folder)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    yield importlib.import_module("memory")
    for name in ("memory", "common"):
        sys.modules.pop(name, None)


def measured(memory, inner_steps, **kw):
    """``(saved_bytes, peak_bytes)`` of one MAML meta-iteration on a small Conv4."""
    tasks = image_tasks(n_tasks=2)
    learner = ml.MAML(conv4(), F.cross_entropy, inner_lr=0.4, inner_steps=inner_steps, **kw)
    with memory.LiveTensorBytes() as live:
        learner.meta_backward(tasks)
    with memory.saved_at_backward() as sizes:
        learner.meta_backward(tasks)
    assert len(sizes) == tasks.n_tasks  # the loop backend calls backward once per task
    return max(sizes), live.peak


def test_recomputing_cuts_the_bytes_saved_for_backward_from_three_inner_steps(memory):
    param_bytes = sum(p.numel() * p.element_size() for p in conv4().parameters())
    saved, peak = {}, {}
    for k in (1, 3, 4, 5):
        for recompute in (False, True):
            saved[k, recompute], peak[k, recompute] = measured(memory, k, recompute_inner=recompute)
    for k in (3, 4, 5):
        assert saved[k, True] < saved[k, False] and peak[k, True] < peak[k, False], k
    # stored: each step adds its graph, several times the parameters; recomputed: one copy of
    # the parameters (phi_j) per step and nothing else
    assert saved[4, False] - saved[3, False] > 3 * param_bytes
    assert saved[4, True] - saved[3, True] == saved[5, True] - saved[4, True] == param_bytes
    # the measures are exact: the same meta-iteration measures the same
    assert measured(memory, 3, recompute_inner=True) == (saved[3, True], peak[3, True])


def test_live_tensor_bytes_counts_each_storage_once_until_it_is_freed(memory):
    with memory.LiveTensorBytes() as live:
        a = torch.ones(1000)  # 4,000 bytes
        view, b = a.view(10, 100), a.add_(1)  # a view and an in-place result: nothing new
        c = torch.ones(500)
        assert (live.now, live.peak) == (6000, 6000)
        del c
        assert (live.now, live.peak) == (4000, 6000)
        del a, view, b
        assert live.now == 0


def test_memory_benchmark_smoke(memory, capsys):
    report = memory.main(["--filters", "4", "--inner-steps", "1,3", "--n-query", "2", "--meta-batch-size", "2",
                          "--no-rss"])
    out = capsys.readouterr().out
    assert "saved for backward, MB" in out and "recomputed vs stored meta-gradient" in out
    rows = {(r["inner_steps"], r["mode"]): r for r in report["rows"]}
    assert set(rows) == {(k, m) for k in (1, 3) for m in ("second", "first", "recompute")}
    assert rows[3, "recompute"]["saved_bytes"] < rows[3, "second"]["saved_bytes"]
    assert rows[3, "first"]["saved_bytes"] == rows[1, "first"]["saved_bytes"]  # first order: flat
    assert rows[3, "recompute"]["grad_difference"] < 1e-4
    # the fresh-process RSS cross-check, run here in-process
    memory.main(["--child-mode", "recompute", "--child-steps", "2", "--filters", "4", "--n-query", "2"])
    assert '"rss_peak"' in capsys.readouterr().out


# --- bad input ----------------------------------------------------------------------------------


def test_recompute_is_refused_where_it_cannot_apply():
    model, params, tasks = tanh_problem()
    task = tasks.task(0)
    inner = dict(inner_steps=2, inner_lr=0.1)
    with pytest.raises(ml.ConfigError, match=r"recompute = True is not allowed with first_order = True"):
        ml.inner_loop(model, params, task.support, mse, first_order=True, recompute=True, **inner)
    with pytest.raises(ml.ConfigError, match=r"recompute = 'yes' is not allowed: it must be True or False"):
        ml.inner_loop(model, params, task.support, mse, recompute="yes", **inner)
    running = ml.Conv4(3, filters=4, image_size=14, batch_norm="running")
    images = image_tasks().task(0)
    with pytest.raises(ml.ConfigError, match=r"not allowed for a model with running BatchNorm statistics"):
        ml.adapt(running, dict(running.named_parameters()), images.support, F.cross_entropy, recompute=True, **inner)
    with pytest.raises(ml.ConfigError, match=r"recompute_inner = True is not allowed with first_order = True"):
        ml.MAML(conv4(), F.cross_entropy, inner_lr=0.4, inner_steps=2, first_order=True, recompute_inner=True)
    with pytest.raises(ml.ConfigError, match=r"recompute_inner = 1 is not allowed: it must be True or False"):
        ml.MAML(conv4(), F.cross_entropy, inner_lr=0.4, inner_steps=2, recompute_inner=1)
    with pytest.raises(ml.ConfigError, match=r"recompute_inner = True is not allowed for a model with running"):
        ml.MAML(running, F.cross_entropy, inner_lr=0.4, inner_steps=2, backend="loop", recompute_inner=True)
    with pytest.raises(ml.ConfigError, match=r"recompute_inner = True is not allowed with backend = 'compile'"):
        ml.MAML(conv4(), F.cross_entropy, inner_lr=0.4, inner_steps=2, backend="compile", recompute_inner=True)


def test_config_plumbs_recompute_inner_and_refuses_it_where_ignored(no_data):
    config = ml.preset("maml-5w1s", recompute_inner=True)
    assert ml.build_learner(config, torch.device("cpu")).recompute_inner is True
    assert ml.build_learner(ml.preset("maml-5w1s"), torch.device("cpu")).recompute_inner is False
    for name in ("fomaml-5w1s", "reptile-5w1s"):
        with pytest.raises(ml.ConfigError, match=r"these settings would be ignored: recompute_inner \(used by maml, "
                                                 r"metasgd, anil, maml\+\+, protomaml, not "):
            ml.preset(name, recompute_inner=True)
    with pytest.raises(ml.ConfigError, match=r"recompute_inner = 'yes' is not allowed"):
        ml.preset("maml-5w1s", recompute_inner="yes")
    with pytest.raises(ml.ConfigError, match=r"recompute_inner \(used by backend='loop' and 'vmap', not 'compile'\)"):
        ml.preset("maml-5w1s", backend="compile", recompute_inner=True)
